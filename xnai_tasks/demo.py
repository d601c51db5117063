"""``make demo``: start the embedded stack, have every role do real work on the real models, print it, stop.

cline writes a documentation paragraph and Python code (with its validation report), grok weighs two
options, curation indexes three documents and answers a paraphrased query from them, and every role's
``health`` shows who answered, on which CPUs, and which models it holds.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

from xnai_tasks import constants as c
from xnai_tasks.client import Client
from xnai_tasks.settings import Settings
from xnai_tasks.supervisor import Stack, StopRequested, raise_on_stop_signals

TASK_TIMEOUT_S = 300.0

DOCUMENTS = [
    {
        "id": "prefork",
        "text": "A Celery prefork worker starts a parent process that forks a pool of child processes. "
        "Models loaded by the parent before the fork are shared with every child through copy-on-write pages.",
    },
    {
        "id": "redis",
        "text": "Redis keeps the task queues as lists. With appendfsync everysec, at most one second of "
        "writes is lost when the machine loses power.",
    },
    {
        "id": "bananas",
        "text": "Bananas are rich in potassium and easy to carry, which makes them a popular snack for hikers.",
    },
]
QUERY = "How do child processes get the model that the parent loaded?"


def run_demo(settings: Settings) -> int:
    """Run the demo; 0 when every role answered."""
    from xnai_tasks.celery_app import app

    raise_on_stop_signals()
    started = time.monotonic()
    try:
        with Stack(settings, flower=True) as stack:
            stack.wait_workers(app)
            print(f"stack up in {time.monotonic() - started:.1f} s (Redis, 4 workers, beat, Flower)\n", flush=True)
            client = Client(settings)
            try:
                show_work(client)
                handles = {role: client.submit(role, "health") for role in c.ROLES}
                answers = {role: handle.get(timeout=TASK_TIMEOUT_S) for role, handle in handles.items()}
            finally:
                client.close()
    except StopRequested:
        return 130
    print_health(answers)
    print("\neverything stopped; the demo is done")
    return 0


def _call(client: Client, role: str, task: str, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = client.submit(role, task, **kwargs).get(timeout=TASK_TIMEOUT_S)
    return result


def _wrap(text: str) -> str:
    return "\n".join(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="  ") for line in text.split("\n"))


def _llm_line(result: dict[str, Any]) -> str:
    t = result["timings"]
    return (
        f"  [{result['model']}, pid {result['pid']}: {result['completion_tokens']} tokens "
        f"in {t['generate_s']:.2f} s, {t['tokens_per_s']} tokens/s]"
    )


def show_work(client: Client) -> None:
    """Real work on every worker role, printed as it comes."""
    docs = _call(client, "cline", "generate_docs", topic="the prefork pool of a Celery worker", max_tokens=96, seed=3)
    print("cline.generate_docs: a paragraph about the prefork pool (small base model, printed as generated)")
    print(_wrap(docs["text"]))
    print(_llm_line(docs) + "\n", flush=True)

    code = _call(
        client,
        "cline",
        "generate_code",
        spec="a function that returns the n-th Fibonacci number",
        max_tokens=128,
        seed=1,
    )
    report = code["validation"]
    verdict = (
        "parses and compiles (not run: whether it does what was asked is not checked)"
        if report.get("valid")
        else f"does not validate: {report.get('error')}"
    )
    print(f"cline.generate_code: python, validation: {verdict}")
    print(textwrap.indent(code["code"], "  | "))
    print(_llm_line(code) + "\n", flush=True)

    analysis = _call(
        client,
        "grok",
        "analyze",
        question="Which database should a small offline desktop app use?",
        options=[
            {"name": "SQLite", "description": "An embedded database stored in one file, with no server to run."},
            {"name": "PostgreSQL", "description": "A client-server database that needs a running server process."},
        ],
        max_tokens=48,
        seed=1,
    )
    print(f"grok.analyze: recommends {analysis['recommendation']} ({analysis['method']})")
    for option in analysis["options"]:
        print(f"  {option['name']}: relevance {option['relevance']}")
        print(_wrap("  " + (option["assessment"] or "")))
    print()

    indexed = _call(client, "curation", "index", documents=DOCUMENTS)
    found = _call(client, "curation", "search", query=QUERY, k=2)
    print(f"curation.index: {indexed['documents']} documents, {indexed['chunks']} chunks ({indexed['model']})")
    print(f"curation.search: {QUERY!r}")
    for hit in found["hits"]:
        print(f"  {hit['score']:.3f}  {hit['id']}: {hit['chunk'][:90]}")
    print(flush=True)


def print_health(answers: dict[str, dict[str, Any]]) -> None:
    """One line per role: who answered, where, how much memory, which models in which mode."""
    print(f"{'role':10}{'answered by':16}{'pid':>8}  {'cpus':6}{'rss MB':>8}  models")
    for role, facts in answers.items():
        cpus = ",".join(str(cpu) for cpu in facts["cpu_affinity"])
        models = ", ".join(
            f"{m['name']} ({m['mode']}, {'loaded' if m['loaded'] else 'not loaded'}, {m['size_bytes'] / 1e6:.0f} MB)"
            for m in facts["models"]
        )
        print(
            f"{role:10}{facts['hostname']:16}{facts['pid']:>8}  {cpus:6}"
            f"{facts['rss_bytes'] / 1e6:>8.1f}  {models or '-'}"
        )

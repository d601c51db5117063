"""``make demo``: start the embedded stack, have every role do real work on the real models, print it, stop.

curation indexes four documents into the memory bank and answers a paraphrased query from them; then,
retrieval first, cline writes a documentation paragraph grounded in the bank's chunks about its topic and
Python code (with its validation report), and grok weighs two options from the evidence (their descriptions
and the bank's chunks); then the copilot runs the ``research`` workflow on those documents (its steps, its
answer, and that answer's provenance verified in the bank); every role's ``health`` shows who answered, on
which CPUs, and which models it holds.

Each step is one line with the seconds since the start; while a step waits, a terminal shows the seconds
it has waited on that line. First it says how each LLM was found to run on this host (llama.cpp's
defaults, or the safe options after a probe crashed); when cline's LLM cannot run at all, or a step fails
or is refused, the demo stops at once with the reason instead of waiting. The workers', Redis's and
Flower's own output goes to files under ``XNAI_HOME/logs``, not to the terminal: the demo prints only its
own story.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from xnai_tasks.client.grounding import bank_context
from xnai_tasks.client.sync import Client
from xnai_tasks.core import constants as c
from xnai_tasks.errors import XnaiError
from xnai_tasks.ops.supervisor import Stack, StopRequested, raise_on_stop_signals
from xnai_tasks.settings import Settings

#: No step of the demo waits longer than this: a task whose worker keeps dying fails long before.
TASK_TIMEOUT_S = 120.0
#: Lines of generated code and of generated prose printed (the rest is counted): the demo's length must not
#: depend on the model's mood (tests/test_demo.py: at most 60 lines in all).
CODE_LINES_SHOWN = 6
PROSE_LINES_SHOWN = 3

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
        "id": "sqlite",
        "text": "SQLite is an embedded database: the whole database is one file and no server process runs. "
        "PostgreSQL needs a server process to be installed, started and kept running.",
    },
    {
        "id": "bananas",
        "text": "Bananas are rich in potassium and easy to carry, which makes them a popular snack for hikers.",
    },
]
QUERY = "How do child processes get the model that the parent loaded?"


class Steps:
    """Prints one line per step with the seconds since the demo started."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.tty = sys.stdout.isatty()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", flush=True)

    @contextmanager
    def waiting(self, text: str) -> Iterator[None]:
        """Say ``text``; on a terminal, count the seconds on that line until the block ends."""
        if not self.tty:
            self.say(text)
            yield
            return
        start = time.monotonic()
        done = threading.Event()

        def tick() -> None:
            while True:
                line = f"[{time.monotonic() - self.started:6.1f} s] {text} {time.monotonic() - start:.0f} s"
                sys.stdout.write(f"\r{line}\033[K")
                sys.stdout.flush()
                if done.wait(0.5):
                    return

        ticker = threading.Thread(target=tick, name="xnai-demo-ticker", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            sys.stdout.write("\n")
            sys.stdout.flush()


class DemoStopped(XnaiError):
    """A role cannot do its part of the demo; the message says which and why."""

    exit_code = 3


def run_demo(settings: Settings) -> int:
    """Run the demo; 0 when every role answered, else the exit code of what stopped it, with its reason."""
    from xnai_tasks.core.celery_app import app

    raise_on_stop_signals()
    steps = Steps()
    steps.say(f"starting Redis, 4 workers, beat and Flower (their output and logs: {settings.log_dir})")
    try:
        with Stack(settings, flower=True, output_dir=settings.log_dir) as stack:
            with steps.waiting("waiting for the workers (each probes and loads its models) ..."):
                stack.wait_workers(app)
            steps.say("stack up")
            client = Client(settings)
            try:
                check_models(client, steps)
                show_work(client, steps)
                show_research(client, steps)
                with steps.waiting("health of every role ..."):
                    handles = [client.submit(role, "health") for role in c.ROLES]
                    answers = {
                        role: handle.get(timeout=TASK_TIMEOUT_S) for role, handle in zip(c.ROLES, handles, strict=True)
                    }
                    # A pending result left for the garbage collector would reach for Redis after it stopped.
                    del handles
            finally:
                client.close()
    except StopRequested:
        return 130
    except XnaiError as exc:
        steps.say(f"stopped: {exc}")
        return exc.exit_code
    print_health(answers)
    steps.say("everything stopped; the demo is done")
    return 0


def check_models(client: Client, steps: Steps) -> None:
    """Say how each LLM was found to run here; stop at once when one cannot run at all."""
    for role in ("cline", "grok"):
        facts = client.submit(role, "health").get(timeout=TASK_TIMEOUT_S)
        for model in facts["models"]:
            if model["kind"] != "gguf":
                continue
            probe = model.get("probe") or {}
            if model.get("unavailable"):
                if role == "cline":
                    raise DemoStopped(f"cline cannot generate: its LLM {model['name']} {model['unavailable']}")
                steps.say(f"{role}: LLM {model['name']} {model['unavailable']}: grok answers degraded")
                continue
            options = ", ".join(f"{k}={v}" for k, v in sorted(model["load_options"].items())) or "defaults"
            steps.say(f"{role}: LLM {model['name']} {probe.get('reason', 'not probed')} (loaded with {options})")


def _call(client: Client, steps: Steps, role: str, task: str, **kwargs: Any) -> dict[str, Any]:
    start = time.monotonic()
    with steps.waiting(f"{role}.{task} ..."):
        result: dict[str, Any] = client.submit(role, task, **kwargs).get(timeout=TASK_TIMEOUT_S)
    steps.say(f"{role}.{task} answered in {time.monotonic() - start:.1f} s")
    return result


def _wrap(text: str) -> str:
    return "\n".join(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="  ") for line in text.split("\n"))


def _head(text: str, lines: int) -> str:
    """The first ``lines`` lines of ``text`` and how many were left out (a model's output varies in length)."""
    kept = text.splitlines()
    if len(kept) <= lines:
        return text
    return "\n".join([*kept[:lines], f"... ({len(kept) - lines} more lines)"])


def _llm_line(result: dict[str, Any]) -> str:
    t = result["timings"]
    return (
        f"  [{result['model']}, pid {result['pid']}: {result['completion_tokens']} tokens "
        f"in {t['generate_s']:.2f} s, {t['tokens_per_s']} tokens/s]"
    )


def show_work(client: Client, steps: Steps) -> None:
    """Real work on every worker role, printed as it comes: the bank first, so cline and grok can use it."""
    indexed = _call(client, steps, "curation", "index", documents=DOCUMENTS)
    found = _call(client, steps, "curation", "search", query=QUERY, k=2)
    print(f"curation.index: {indexed['documents']} documents, {indexed['chunks']} chunks ({indexed['model']})")
    print(f"curation.search: {QUERY!r}")
    for hit in found["hits"]:
        print(f"  {hit['score']:.3f}  {hit['id']}: {hit['chunk'][:90]}")
    print(flush=True)

    topic = "the prefork pool of a Celery worker"
    notes = bank_context(client, topic)
    docs = _call(client, steps, "cline", "generate_docs", topic=topic, context=notes or None, max_tokens=96, seed=3)
    grounding = f"grounded in {len(notes.splitlines())} bank chunk(s)" if notes else "no bank chunk was relevant"
    print(f"cline.generate_docs: a paragraph about the prefork pool, {grounding} (small base model, as generated)")
    print(_head(_wrap(docs["text"]), PROSE_LINES_SHOWN))
    print(_llm_line(docs) + "\n", flush=True)

    code = _call(
        client,
        steps,
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
    print(textwrap.indent(_head(code["code"], CODE_LINES_SHOWN), "  | "))
    print(_llm_line(code) + "\n", flush=True)

    question = "Which database should a small offline desktop app use?"
    analysis = _call(
        client,
        steps,
        "grok",
        "analyze",
        question=question,
        context=bank_context(client, question) or None,
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
        print(_head(_wrap("  " + (option["assessment"] or "")), 1))
    print(f"  ({analysis['unsupported_sentences_dropped']} LLM sentence(s) the evidence did not support were dropped)")
    print(flush=True)


def show_research(client: Client, steps: Steps) -> None:
    """The research workflow on the demo's documents: its steps, its answer, and the answer's provenance."""
    from xnai_tasks.security.keyring import Keyring
    from xnai_tasks.workflow.provenance import verified_hits

    with steps.waiting("research workflow: curation searches, grok answers, cline writes up, curation indexes ..."):
        record = client.run("research", topic=QUERY, k=3, max_tokens=96, seed=3)
    done = [f"{s['name']} ({s['role']}) {s['seconds']:.1f} s {s['outcome']}" for s in record["steps"]]
    print(f"  research {record['state']}: " + " | ".join(done[:2]) + "\n  " + " | ".join(done[2:]))
    result = record["result"]
    print(_head(_wrap("answer: " + result["writeup"]), 1))
    found = client.submit("curation", "search", query=result["writeup"], k=3, cache="off").get(timeout=TASK_TIMEOUT_S)
    hits = [
        h for h in verified_hits(Keyring.load(client.settings.home), found["hits"]) if h["id"] == result["indexed_as"]
    ]
    origin = hits[0]["provenance"] if hits else {"verified": False, "reason": "not found in the bank"}
    print(
        f"  provenance in the bank: {origin.get('role')}.{origin.get('task')} task {str(origin.get('task_id'))[:8]}, "
        f"model {origin.get('model')}, run {str(origin.get('run_id'))[:8]}: "
        + ("signature verified" if origin["verified"] else f"NOT verified ({origin['reason']})"),
        flush=True,
    )


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

"""Workflows on the session stack (real workers, real models): research, code (its retry path), review (its parallel
steps one signed Celery group), a failing step that cancels the rest of its group, provenance checked at search time
(and a tampered chunk caught), ``xnai run`` and ``xnai runs`` as subprocesses, and the beat schedule read from
XNAI_SCHEDULE.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest

from celeryconfig import build
from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import SettingsError, UnknownWorkflowError, UsageError, WorkflowFailedError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security import redis_urls
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.settings import Settings
from xnai_tasks.workflow.provenance import verified_hits, verify_chunk
from xnai_tasks.workflow.run import Run
from xnai_tasks.workflow.schedule import beat_entries, parse_schedule
from xnai_tasks.workflow.store import store_of

from support import run_xnai

pytestmark = pytest.mark.slow  # the LLM roles generate for real

DOCUMENTS = [
    {
        "id": "wf-prefork",
        "text": "A Celery prefork worker starts a parent process that forks a pool of child processes. "
        "Models loaded by the parent before the fork are shared with every child through copy-on-write pages.",
    },
    {
        "id": "wf-sqlite",
        "text": "SQLite is an embedded database: the whole database is one file and no server process runs. "
        "PostgreSQL needs a server process to be installed, started and kept running.",
    },
]
TOPIC = "How do the child processes of a Celery prefork worker get the model the parent loaded?"
SMALL = {"max_tokens": 40, "seed": 1}
BROKEN = "def fibonacci(n):\n    return fibonacci(n - 1) +\n"


def names(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [(step["name"], step["role"]) for step in record["steps"]]


@pytest.fixture(scope="module")
def research(client: Client) -> dict[str, Any]:
    """One research run over the test documents (shared: the model calls are the slow part)."""
    client.submit("curation", "index", documents=DOCUMENTS).get(timeout=120)
    return client.run("research", topic=TOPIC, k=3, **SMALL)


@pytest.fixture
def admin(stack_settings: Settings) -> Iterator[Any]:
    conn = broker.connect(redis_urls.connection_url(stack_settings, "admin"))
    yield conn
    conn.close()


def test_research_searches_answers_writes_up_and_indexes(research: dict[str, Any]) -> None:
    # Given the bank holds the test documents; When research runs (fixture)
    # Then curation, grok, cline and curation ran in that order, and the write-up went into the bank
    assert research["state"] == "succeeded"
    assert names(research) == [
        ("search", "curation"),
        ("synthesize", "grok"),
        ("document", "cline"),
        ("index", "curation"),
    ]
    assert all(step["task_id"] and step["seconds"] > 0 for step in research["steps"])
    assert all(step["group_id"] is None for step in research["steps"])  # sequential: single submits, no canvas
    result = research["result"]
    assert result["answer"] and result["writeup"]
    assert "wf-prefork" in [source["id"] for source in result["sources"]]  # grok was given the relevant chunk
    assert result["indexed_as"] == f"workflow:{research['run_id']}"
    assert result["provenance"]["step"] == "document" and result["provenance"]["role"] == "cline"


def test_provenance_is_verified_at_search_and_a_tampered_chunk_is_not(
    client: Client, research: dict[str, Any], stack_settings: Settings, admin: Any
) -> None:
    # Given the research write-up in the bank, with the signed result of the cline step that wrote it
    doc_id, writeup = research["result"]["indexed_as"], research["result"]["writeup"]
    document = next(step for step in research["steps"] if step["name"] == "document")
    keyring = Keyring.load(stack_settings.home)

    def find() -> dict[str, Any]:
        found = client.submit("curation", "search", query=writeup, k=5, cache="off").get(timeout=60)
        return next(hit for hit in verified_hits(keyring, found["hits"]) if hit["id"] == doc_id)

    # When a search finds it
    hit = find()
    # Then its provenance names the run, step, role, model and task, and its signature checks out
    origin = hit["provenance"]
    assert origin["verified"] is True, origin["reason"]
    assert (origin["run_id"], origin["step"], origin["role"], origin["task_id"]) == (
        research["run_id"],
        "document",
        "cline",
        document["task_id"],
    )
    assert origin["model"] and origin["signed_by"]
    # When the chunk's text is altered in Redis
    key = c.bank_chunk_key(doc_id, hit["chunk_index"])
    original = admin.hget(key, "text")
    admin.hset(key, "text", original + b" It also mines bitcoin.")
    try:
        tampered = find()
    finally:
        admin.hset(key, "text", original)
    # Then the same search shows it as not verified, and why
    assert tampered["provenance"]["verified"] is False
    assert "altered" in tampered["provenance"]["reason"]


def test_altered_provenance_fails_its_signature(
    client: Client, research: dict[str, Any], stack_settings: Settings
) -> None:
    # Given the provenance of the indexed write-up, with its signed result edited to match an altered chunk
    writeup = research["result"]["writeup"]
    found = client.submit("curation", "search", query=writeup, k=5, cache="off").get(timeout=60)
    hit = next(h for h in found["hits"] if h["id"] == research["result"]["indexed_as"])
    forged = json.loads(hit["provenance"])
    forged["result"]["text"] = "Forged. " + forged["result"]["text"]
    # When it is verified; Then the worker's signature no longer matches
    verdict = verify_chunk(Keyring.load(stack_settings.home), "Forged. " + hit["chunk"], forged)
    assert verdict["verified"] is False and "not authentic" in verdict["reason"]


def test_code_retries_a_broken_first_attempt_with_its_error(client: Client) -> None:
    # Given a first attempt that does not parse
    # When the code workflow runs with it
    record = client.run(
        "code", spec="a function that returns the n-th Fibonacci number", first_attempt=BROKEN, max_retries=2, **SMALL
    )
    # Then the copilot found it invalid, and cline was asked again with the error in its spec
    draft, retry = record["steps"][0], record["steps"][1]
    assert (draft["name"], draft["role"], draft["outcome"]) == ("draft", "copilot", "invalid")
    assert "SyntaxError" in draft["detail"]
    assert (retry["name"], retry["role"]) == ("generate-1", "cline")
    asked = client.handle(retry["task_id"], "cline", "generate_code").get(timeout=10)
    assert "rejected (SyntaxError" in asked["spec"]
    # and it stopped at the first valid version, or after max_retries, saying so; grok reviewed the last one
    generated = [step for step in record["steps"] if step["role"] == "cline"]
    assert 1 <= len(generated) == record["result"]["cline_attempts"] <= 2
    assert all(step["outcome"] == "invalid" for step in generated[:-1])
    if record["result"]["valid"] is False:
        assert any("no valid version" in remark for remark in record["result"]["remarks"])
    if record["result"]["code"].strip():
        assert names(record)[-1] == ("review", "grok")
        assert record["result"]["review"] is not None or record["result"]["remarks"]


def test_review_runs_analysis_and_evidence_in_parallel_and_merges(client: Client, research: dict[str, Any]) -> None:
    # Given the bank holds the SQLite document (indexed by the research fixture)
    options = [
        {"name": "SQLite", "description": "An embedded database stored in one file, with no server to run."},
        {"name": "PostgreSQL", "description": "A client-server database that needs a running server process."},
    ]
    # When review runs
    record = client.run("review", options=options, question="Which database suits a small offline app?", **SMALL)
    # Then grok analyzed while curation searched once per option, and each option carries its bank evidence
    assert sorted(names(record)) == [
        ("analyze", "grok"),
        ("evidence:PostgreSQL", "curation"),
        ("evidence:SQLite", "curation"),
    ]
    # and the three went out as one signed Celery group: one group id, recorded with each step of the stored run
    stored = store_of(client).load(record["run_id"])
    assert stored is not None
    groups = {step["group_id"] for step in stored["steps"]}
    assert len(groups) == 1 and None not in groups
    # and each step's result is still verified by its role's signature, its worker having run it as a group member
    for step in stored["steps"]:
        handle = client.handle(step["task_id"], step["role"], step["task"])
        assert handle.get(timeout=10) is not None
        assert handle.stored().get("group_id") == step["group_id"]
    merged = {row["name"]: row for row in record["result"]["options"]}
    assert set(merged) == {"SQLite", "PostgreSQL"}
    assert "wf-sqlite" in [e["id"] for e in merged["SQLite"]["evidence"]]
    assert record["result"]["recommendation"] in merged


def test_a_failed_step_cancels_the_others_and_names_itself(client: Client) -> None:
    # Given a review grok refuses to analyze (one option is not a choice)
    # When it runs
    with pytest.raises(WorkflowFailedError) as failed:
        client.run("review", options=["SQLite"], question="Which database?", **SMALL)
    # Then the error names the failed step, and the evidence step still out was cancelled (revoked)
    assert failed.value.step == "analyze" and "step analyze (grok.analyze) failed" in str(failed.value)
    record = store_of(client).load(failed.value.run_id)
    assert record is not None and record["state"] == "failed"
    outcomes = {step["name"]: step["outcome"] for step in record["steps"]}
    assert outcomes == {"analyze": "failed", "evidence:SQLite": "cancelled"}
    # and the cancelled one was a member of the failed step's group
    groups = {step["group_id"] for step in record["steps"]}
    assert len(groups) == 1 and None not in groups


def test_a_step_that_times_out_is_skipped_if_optional_and_fails_the_run_if_not(client: Client) -> None:
    # Given a run whose steps take longer than their timeout (grok's echo with a delay)
    run = Run(client, "probe", "probe-run")
    # When an optional one times out; Then it is skipped, recorded and remarked, and its task revoked
    assert run.step("slow", "grok", "echo", timeout_s=0.3, optional=True, value=1, delay_s=1.5) is None
    assert run.steps[-1].outcome == "skipped (timed out)" and "timed out and was skipped" in run.remarks[-1]
    # When a required one times out; Then the run fails naming it
    with pytest.raises(WorkflowFailedError, match=r"step slower \(grok\.echo\) timed out"):
        run.step("slower", "grok", "echo", timeout_s=0.3, value=2, delay_s=1.5)
    assert run.steps[-1].outcome == "timed out"


def test_unknown_workflow_or_arguments_are_refused_before_anything_runs(
    client: Client, stack_settings: Settings
) -> None:
    # Given the runs recorded so far
    before = len(store_of(client).recent())
    # When an unknown workflow or an unknown argument is asked for
    with pytest.raises(UnknownWorkflowError, match="workflows: code, research, review"):
        client.run("nope")
    with pytest.raises(UsageError, match="workflow research takes"):
        client.run("research", subject="x")
    cli = run_xnai(["run", "research", "--kwargs", '{"subject": "x"}', "--wait"], stack_settings)
    # Then each is refused in one line, exit 2, and no run was started
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "workflow research takes" in cli.stderr
    assert len(store_of(client).recent()) == before


def test_xnai_run_research_json_then_xnai_runs(
    stack: Stack, stack_settings: Settings, research: dict[str, Any]
) -> None:
    # Given the stack; When `xnai run research --wait --json` runs (on the copilot worker) as a subprocess
    kwargs = json.dumps({"topic": "What is shared between the parent and the child processes?", "k": 2} | SMALL)
    done = run_xnai(["run", "research", "--kwargs", kwargs, "--wait", "--json"], stack_settings, timeout=600)
    # Then it prints one object: workflow, state, each step's name, role, task id, outcome, seconds, and the result
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["workflow"], out["state"]) == ("research", "succeeded")
    assert [step["name"] for step in out["steps"]] == ["search", "synthesize", "document", "index"]
    assert all({"name", "role", "task_id", "outcome", "seconds", "group_id"} <= set(step) for step in out["steps"])
    assert out["result"]["answer"]
    # When `xnai runs --json`; Then both runs are listed, newest first, with their state
    listed = run_xnai(["runs", "--json"], stack_settings)
    assert listed.returncode == 0, listed.stderr
    runs = {run["run_id"]: run["state"] for run in json.loads(listed.stdout)}
    assert runs[out["run_id"]] == "succeeded" and runs[research["run_id"]] == "succeeded"
    assert json.loads(listed.stdout)[0]["run_id"] == out["run_id"]
    text = run_xnai(["runs"], stack_settings)
    assert out["run_id"] in text.stdout and "succeeded" in text.stdout


def test_xnai_run_watches_a_failing_run_and_exits_4_naming_the_step(stack: Stack, stack_settings: Settings) -> None:
    # Given a review grok refuses to analyze; When `xnai run review --wait` watches it
    kwargs = json.dumps({"options": ["SQLite"], "question": "Which database?"} | SMALL)
    done = run_xnai(["run", "review", "--kwargs", kwargs, "--wait"], stack_settings, timeout=300)
    # Then each step is printed as it ends (role, seconds, outcome), and one line says which step failed: exit 4
    assert done.returncode == 4, done.stdout + done.stderr
    assert "step analyze (grok.analyze) failed" in done.stderr and done.stderr.count("\n") == 1
    lines = done.stdout.splitlines()
    assert any(line.split()[:2] == ["analyze", "grok"] and " failed" in line for line in lines), done.stdout
    assert any(line.split()[:2] == ["evidence:SQLite", "curation"] and "cancelled" in line for line in lines)


def test_beat_runs_the_workflows_of_xnai_schedule(stack_settings: Settings) -> None:
    # Given a schedule of one research workflow every hour
    raw = json.dumps({"nightly": {"workflow": "research", "kwargs": {"topic": "prefork"}, "every_s": 3600}})
    settings = dataclasses.replace(stack_settings, schedule=parse_schedule(raw))
    # When Celery's configuration is built; Then beat sends copilot.run_workflow with it every hour
    entry = build(settings)["beat_schedule"]["workflow-nightly"]
    assert entry["task"] == "copilot.run_workflow" and entry["schedule"] == 3600.0
    assert entry["kwargs"] == {"workflow": "research", "kwargs": {"topic": "prefork"}, "schedule": "nightly"}
    assert beat_entries(None) == {}
    # and a bad schedule is refused in one line naming the variable
    for bad in ("[1]", '{"n": {"workflow": "research", "every_s": 1}}', '{"n": {"flow": "x"}}'):
        with pytest.raises(SettingsError, match="XNAI_SCHEDULE"):
            Settings.from_env({"XNAI_HOME": str(stack_settings.home), "XNAI_SCHEDULE": bad})

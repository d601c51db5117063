"""Workflows run by the async client (``await AsyncClient.run``) on the session stack (real workers, real models), on
asyncio and trio: a review end to end, a run cancelled midway (a cancel scope, a failing sibling) that leaves none
of its steps queued or running, a failing step that names itself and cancels the steps still out, and Flower
showing a run's tasks under the run id and a group's members under the group id.
"""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial
from typing import Any

import anyio
import pytest
from celery import Celery

from xnai_tasks import AsyncClient
from xnai_tasks.client.asynchronous import AsyncTaskHandle
from xnai_tasks.client.sync import Client
from xnai_tasks.core import constants as c
from xnai_tasks.core.nodes import workers_online
from xnai_tasks.errors import TaskRevokedError, UsageError, WorkflowFailedError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings
from xnai_tasks.workflow import catalogue
from xnai_tasks.workflow.async_run import AsyncRun
from xnai_tasks.workflow.ledger import Steps
from xnai_tasks.workflow.run import drive
from xnai_tasks.workflow.spec import Step, Workflow
from xnai_tasks.workflow.store import store_of

from support import admin_connection, run_xnai, wait_flower_success

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the LLM roles generate for real

BACKENDS = [pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")]
SMALL = {"max_tokens": 40, "seed": 1}
DOCUMENTS = [
    {
        "id": "awf-sqlite",
        "text": "SQLite is an embedded database: the whole database is one file and no server process runs. "
        "PostgreSQL needs a server process to be installed, started and kept running.",
    },
]
OPTIONS = [
    {"name": "SQLite", "description": "An embedded database stored in one file, with no server to run."},
    {"name": "PostgreSQL", "description": "A client-server database that needs a running server process."},
]
QUESTION = "Which database suits a small offline app?"
#: Seconds each curation process is kept busy, so that a step sent meanwhile waits in the queue.
BUSY_S = 8.0


async def review(settings: Settings) -> dict[str, Any]:
    async with AsyncClient(settings) as client:
        with anyio.fail_after(600):
            return await client.run("review", options=OPTIONS, question=QUESTION, **SMALL)


@pytest.fixture(scope="module")
def indexed(client: Client) -> None:
    """The bank holds the SQLite document the review finds evidence in."""
    client.submit("curation", "index", documents=DOCUMENTS).get(timeout=120)


@pytest.fixture(scope="module")
def reviewed(indexed: None, stack_settings: Settings) -> dict[str, Any]:
    """One review run by the async client on asyncio (shared: the model calls are the slow part)."""
    return anyio.run(review, stack_settings, backend="asyncio")


def check_review(record: dict[str, Any]) -> None:
    """A review's record: grok analyzed while curation searched once per option, as one group, and merged."""
    assert record["state"] == "succeeded", record.get("error")
    assert {"workflow", "run_id", "state", "steps", "result", "error", "seconds"} <= set(record)
    assert sorted((s["name"], s["role"]) for s in record["steps"]) == [
        ("analyze", "grok"),
        ("evidence:PostgreSQL", "curation"),
        ("evidence:SQLite", "curation"),
    ]
    assert all({"name", "role", "task_id", "outcome", "seconds", "group_id"} <= set(s) for s in record["steps"])
    assert all(s["task_id"] and s["outcome"] in ("ok", "degraded") for s in record["steps"])
    groups = {s["group_id"] for s in record["steps"]}
    assert len(groups) == 1 and None not in groups
    merged = {row["name"]: row for row in record["result"]["options"]}
    assert set(merged) == {"SQLite", "PostgreSQL"}
    assert "awf-sqlite" in [e["id"] for e in merged["SQLite"]["evidence"]]


def test_review_runs_on_asyncio_and_is_listed_by_xnai_runs(
    reviewed: dict[str, Any], client: Client, stack_settings: Settings
) -> None:
    # Given a review awaited with AsyncClient.run on asyncio (fixture)
    # Then its record is what Client.run returns: its steps, one group, the merged result
    check_review(reviewed)
    # and it is recorded in the same store: `xnai runs` lists it as succeeded
    stored = store_of(client).load(reviewed["run_id"])
    assert stored is not None and stored["state"] == "succeeded" and len(stored["steps"]) == 3
    listed = run_xnai(["runs", "--json"], stack_settings)
    assert listed.returncode == 0, listed.stderr
    states = {run["run_id"]: run["state"] for run in json.loads(listed.stdout)}
    assert states[reviewed["run_id"]] == "succeeded"


@pytest.mark.parametrize("anyio_backend", [pytest.param("trio", id="trio")])
async def test_review_runs_on_trio(anyio_backend: str, indexed: None, stack_settings: Settings) -> None:
    # Given the same review; When it is awaited on trio; Then it runs end to end with its steps
    check_review(await review(stack_settings))


def test_flower_shows_a_runs_tasks_under_the_run_and_a_groups_members_under_the_group(
    reviewed: dict[str, Any], stack: Stack, stack_settings: Settings
) -> None:
    # Given the review's three steps, sent as one Celery group
    for step in reviewed["steps"]:
        # When Flower's task API is asked about each
        info = wait_flower_success(stack_settings, step["task_id"], within_s=60)
        # Then each task has the run id as its root and its group's id as its parent
        assert info is not None and info["state"] == "SUCCESS", info
        assert (info["root_id"], info["parent_id"]) == (reviewed["run_id"], step["group_id"])


@pytest.mark.parametrize("anyio_backend", [pytest.param("asyncio", id="asyncio")])
async def test_flower_links_sequential_steps_to_the_step_before(
    anyio_backend: str, stack: Stack, stack_settings: Settings
) -> None:
    # Given a run of a step, a group of two, then a step (grok's echo: no model)
    async with AsyncClient(stack_settings) as client:
        run = AsyncRun(client, "probe", f"probe-{time.time_ns()}")
        with anyio.fail_after(120):
            await run.step("first", "grok", "echo", value=1)
            await run.parallel(
                Step("left", "grok", "echo", {"value": 2}), Step("right", "curation", "echo", {"value": 3})
            )
            await run.step("last", "grok", "echo", value=4)
    ids = {record.name: record.task_id for record in run.steps}
    group_id = next(record.group_id for record in run.steps if record.name == "left")
    # When Flower is asked about each task
    seen = {}
    for name, task_id in ids.items():
        info = await anyio.to_thread.run_sync(lambda t=task_id: wait_flower_success(stack_settings, t, 60))
        assert info is not None and info["state"] == "SUCCESS", info
        seen[name] = (info["root_id"], info["parent_id"])
    # Then all share the run as root; each step's parent is what came before it: the step, or the group
    assert seen == {
        "first": (run.id, None),
        "left": (run.id, group_id),
        "right": (run.id, group_id),
        "last": (run.id, group_id),
    }


def running(app: Celery, role: str) -> dict[str, str]:
    """The tasks ``role``'s workers run now: id -> name."""
    nodes = workers_online(app).get(role, [])
    active = app.control.inspect(destination=nodes, timeout=1.0, limit=len(nodes)).active() or {}
    return {str(task["id"]): str(task["name"]) for tasks in active.values() for task in tasks}


async def wait_running(app: Celery, role: str, name: str) -> str:
    """The id of the first ``name`` task seen running on ``role``'s workers."""
    with anyio.fail_after(300):
        while True:
            now = await anyio.to_thread.run_sync(running, app, role)
            if name in now.values():
                return next(task_id for task_id, task in now.items() if task == name)
            await anyio.sleep(0.1)


async def wait_stopped(app: Celery, role: str, task_id: str) -> bool:
    """True once ``task_id`` no longer runs on ``role``'s workers (30 s at most)."""
    with anyio.move_on_after(30):
        while task_id in await anyio.to_thread.run_sync(running, app, role):
            await anyio.sleep(0.2)
        return True
    return False


async def busy(client: AsyncClient, control_app: Celery, role: str) -> list[AsyncTaskHandle]:
    """Every process of ``role`` sleeps BUSY_S: a step of ``role`` sent now waits in the queue until then."""
    processes = await pool_size(control_app, role)
    return [await client.submit(role, "echo", value=i, delay_s=BUSY_S) for i in range(processes)]


async def pool_size(control_app: Celery, role: str) -> int:
    stats = await anyio.to_thread.run_sync(lambda: control_app.control.inspect(timeout=2).stats() or {})
    return sum(int(s["pool"]["max-concurrency"]) for node, s in stats.items() if node.startswith(f"{role}@"))


async def wait_step(client: Client, topic: str, name: str) -> None:
    """Until the run of research ``topic`` has recorded step ``name``."""
    store = store_of(client)
    with anyio.fail_after(120):
        while True:
            runs = await anyio.to_thread.run_sync(store.recent, 20)
            run = next((r for r in runs if r["kwargs"].get("topic") == topic), None)
            if run is not None and name in [step["name"] for step in run["steps"]]:
                return
            await anyio.sleep(0.05)


def queued(settings: Settings, *roles: str) -> dict[str, int]:
    with admin_connection(settings) as conn:
        return {role: sum(conn.llen(key) for key in c.queue_keys(c.queue_for(role))) for role in roles}


@pytest.mark.parametrize("anyio_backend", [pytest.param("asyncio", id="asyncio")])
async def test_a_research_cancelled_by_its_cancel_scope_leaves_no_step_queued(
    anyio_backend: str, stack_settings: Settings, client: Client, control_app: Celery
) -> None:
    topic = f"What does a prefork worker share with its children? ({time.time_ns()})"
    async with AsyncClient(stack_settings) as aclient:
        # Given busy grok workers, and a research run (curation searches, then grok synthesizes, cline writes up...)
        grok = await busy(aclient, control_app, "grok")
        with anyio.CancelScope() as scope, anyio.fail_after(300):
            async with anyio.create_task_group() as group:
                group.start_soon(partial(aclient.run, "research", topic=topic, k=2, **SMALL))
                # When its caller's cancel scope is cancelled once the search is done (grok's step is queued)
                await wait_step(client, topic, "search")
                scope.cancel()
        with anyio.fail_after(120):
            for handle in grok:
                await handle.get()
    # Then the run is recorded cancelled: search done, synthesize cancelled, nothing after it sent
    record = next(r for r in store_of(client).recent(20) if r["kwargs"].get("topic") == topic)
    assert record["state"] == "cancelled"
    assert [(s["name"], s["outcome"]) for s in record["steps"]] == [("search", "ok"), ("synthesize", "cancelled")]
    # and grok never ran its step: it is stored REVOKED, and no queue holds a step of the run
    handle = client.handle(record["steps"][1]["task_id"], "grok", "synthesize")
    with pytest.raises(TaskRevokedError):
        await anyio.to_thread.run_sync(lambda: handle.get(timeout=60))
    assert queued(stack_settings, "curation", "grok", "cline") == {"curation": 0, "grok": 0, "cline": 0}


async def slow_probe(run: Steps, processes: int, delay_s: float) -> dict[str, Any]:
    """A quick step, then more slow curation steps than curation has processes, then one more step."""
    await run.step("quick", "grok", "echo", value="quick")
    slow = [Step(f"slow-{i}", "curation", "echo", {"value": i, "delay_s": delay_s}) for i in range(processes + 1)]
    await run.parallel(*slow)
    await run.step("never", "grok", "echo", value="never")
    return {}


@pytest.fixture
def probe_workflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A workflow of echo steps that take a minute, known by name in this process."""
    monkeypatch.setitem(catalogue.WORKFLOWS, "slow-probe", Workflow("slow-probe", slow_probe))


@pytest.mark.parametrize("anyio_backend", [pytest.param("trio", id="trio")])
async def test_a_run_cancelled_by_a_failing_sibling_kills_its_running_steps_and_drops_the_queued(
    anyio_backend: str, probe_workflow: None, stack_settings: Settings, client: Client, control_app: Celery
) -> None:
    # Given a run whose group has a slow step (60 s) for every curation process and one more, waiting in the queue
    processes = await pool_size(control_app, "curation")
    async with AsyncClient(stack_settings) as aclient:

        async def fail_once_running() -> None:
            await wait_running(control_app, "curation", "curation.echo")
            raise RuntimeError("a sibling fails")

        # When a task in the caller's task group fails while they run
        with pytest.raises(BaseExceptionGroup), anyio.fail_after(300):
            async with anyio.create_task_group() as group:
                group.start_soon(partial(aclient.run, "slow-probe", processes=processes, delay_s=60.0))
                group.start_soon(fail_once_running)
    # Then the run is recorded cancelled, with every slow step cancelled and the last one never sent
    record = store_of(client).recent(1)[0]
    assert (record["workflow"], record["state"]) == ("slow-probe", "cancelled")
    outcomes = {s["name"]: s["outcome"] for s in record["steps"]}
    assert outcomes == {"quick": "ok"} | {f"slow-{i}": "cancelled" for i in range(processes + 1)}
    # and none runs any more (killed long before its 60 s), each is stored REVOKED, and no queue holds one
    for step in record["steps"][1:]:
        assert await wait_stopped(control_app, "curation", step["task_id"])
        handle = client.handle(step["task_id"], "curation", "echo")
        with pytest.raises(TaskRevokedError):
            await anyio.to_thread.run_sync(lambda h=handle: h.get(timeout=30))
    assert queued(stack_settings, "curation", "grok") == {"curation": 0, "grok": 0}


async def side_by_side(run: Steps) -> dict[str, Any]:
    """Two steps awaited at once by the driver's own task group: a quick one and a slower one."""
    async with anyio.create_task_group() as group:
        group.start_soon(partial(run.step, "slow", "curation", "echo", value="slow", delay_s=2.0))
        group.start_soon(partial(run.step, "quick", "grok", "echo", value="quick"))
    return {}


@pytest.mark.parametrize("anyio_backend", [pytest.param("asyncio", id="asyncio")])
async def test_steps_awaited_at_once_by_the_driver_each_end_on_their_own(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, stack_settings: Settings, client: Client
) -> None:
    # Given a workflow whose driver awaits two steps at once
    monkeypatch.setitem(catalogue.WORKFLOWS, "side-by-side", Workflow("side-by-side", side_by_side))
    # When it runs (the quick step ends while the slow one is still out)
    async with AsyncClient(stack_settings) as aclient:
        with anyio.fail_after(120):
            record = await aclient.run("side-by-side")
    # Then both steps ended ok: the quick step's end cancelled nothing of the other's
    assert record["state"] == "succeeded", record
    assert sorted((s["name"], s["outcome"]) for s in record["steps"]) == [("quick", "ok"), ("slow", "ok")]
    assert store_of(client).load(record["run_id"])["state"] == "succeeded"


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_failing_step_names_itself_and_the_steps_still_out_never_run(
    anyio_backend: str, stack_settings: Settings, client: Client, control_app: Celery
) -> None:
    async with AsyncClient(stack_settings) as aclient:
        # Given busy curation workers, and a review grok refuses to analyze (one option is not a choice)
        busy_tasks = await busy(aclient, control_app, "curation")
        # When it runs
        with pytest.raises(WorkflowFailedError) as failed, anyio.fail_after(120):
            await aclient.run("review", options=["SQLite"], question="Which database?", **SMALL)
        with anyio.fail_after(120):
            for handle in busy_tasks:
                await handle.get()
    # Then the error names the failed step, and the run is recorded failed
    assert failed.value.step == "analyze" and "step analyze (grok.analyze) failed" in str(failed.value)
    record = store_of(client).load(failed.value.run_id)
    assert record is not None and record["state"] == "failed"
    outcomes = {step["name"]: step["outcome"] for step in record["steps"]}
    assert outcomes == {"analyze": "failed", "evidence:SQLite": "cancelled"}
    # and the evidence step, still queued, was revoked: curation never ran it
    evidence = next(step for step in record["steps"] if step["name"] == "evidence:SQLite")
    handle = client.handle(evidence["task_id"], "curation", "search")
    with pytest.raises(TaskRevokedError):
        await anyio.to_thread.run_sync(lambda: handle.get(timeout=60))


@pytest.mark.parametrize("anyio_backend", [pytest.param("asyncio", id="asyncio")])
async def test_a_group_larger_than_max_in_flight_is_refused_unsent(
    anyio_backend: str, stack_settings: Settings
) -> None:
    sent: list[str] = []
    async with AsyncClient(stack_settings, max_in_flight=2) as client:
        # When three tasks are to be sent at once by a client allowing two out
        with pytest.raises(UsageError) as refused:
            await client.send(lambda: sent.append("sent") or [], count=3)
    # Then it is refused in one line naming the limit, and nothing was sent
    assert str(refused.value) == "3 tasks sent at once are more than max_in_flight (2)"
    assert not sent


def test_a_sync_run_refuses_a_driver_that_awaits_anything_but_its_steps() -> None:
    # Given a driver that awaits something a sync run cannot (an event loop's sleep)
    async def driver() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {}

    # When the sync runner drives it; Then it is refused in one line, and the coroutine is closed
    work = driver()
    with pytest.raises(RuntimeError, match=r"^a workflow driver awaited something other than its run's steps$"):
        drive(work)
    assert work.cr_frame is None  # closed: nothing of it runs later

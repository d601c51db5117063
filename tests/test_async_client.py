"""The async client (AnyIO, on asyncio and trio) over a real curation worker: hundreds of results awaited in one
event loop, timeouts and failing task groups that revoke what they waited for, forged results refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis

from xnai_tasks import AsyncClient
from xnai_tasks.client.asynchronous import AsyncTaskHandle
from xnai_tasks.client.sync import Client
from xnai_tasks.core import constants as c
from xnai_tasks.errors import ResultSignatureError, TaskRevokedError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security.keyring import load_signer
from xnai_tasks.security.result_signature import sign_result
from xnai_tasks.security.signature import SIG_HEADER
from xnai_tasks.settings import Settings

from support import admin_connection, running_stack, short_home

BACKENDS = [pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")]
#: Seconds each of the worker's two processes is kept busy, so that a task sent next waits in the queue.
BUSY_S = 2.0


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    made = Settings(
        home=short_home(), model_mode="lazy", llm_safe="off", plan_overrides='{"curation": {"processes": 2}}'
    )
    yield made
    shutil.rmtree(made.home, ignore_errors=True)


@pytest.fixture(scope="module")
def running(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings, ("curation",)) as stack:
        yield stack


@pytest.fixture(scope="module")
def sync_client(running: Stack, settings: Settings) -> Iterator[Client]:
    made = Client(settings)
    yield made
    made.close()


@pytest.fixture(scope="module")
def conn(running: Stack, settings: Settings) -> Iterator[redis.Redis]:
    with admin_connection(settings) as connection:
        yield connection


async def busy_worker(client: AsyncClient) -> list[AsyncTaskHandle]:
    """Both curation processes sleep BUSY_S: a task sent now waits in the queue until then."""
    return [await client.submit("curation", "echo", value=f"busy {i}", delay_s=BUSY_S) for i in range(2)]


async def revoked_by_the_worker(sync_client: Client, task_id: str) -> None:
    """The worker took the message, found it revoked and stored REVOKED instead of running it."""
    handle = sync_client.handle(task_id, "curation", "echo")
    with pytest.raises(TaskRevokedError):
        await anyio.to_thread.run_sync(lambda: handle.get(timeout=60))


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_200_results_are_awaited_concurrently_and_verified(
    anyio_backend: str, running: Stack, settings: Settings
) -> None:
    # Given an async client allowing 50 tasks out at once
    results: dict[int, Any] = {}
    async with AsyncClient(settings, max_in_flight=50) as client:

        async def one(i: int) -> None:
            handle = await client.submit("curation", "echo", value={"n": i})
            results[i] = await handle.get()

        # When 200 echo tasks are sent and awaited concurrently in one event loop
        with anyio.fail_after(180):
            async with anyio.create_task_group() as group:
                for i in range(200):
                    group.start_soon(one, i)
    # Then every result is the genuine, signed one of its own task
    assert results == {i: {"n": i} for i in range(200)}


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_timeout_revokes_the_task(
    anyio_backend: str, running: Stack, settings: Settings, sync_client: Client
) -> None:
    async with AsyncClient(settings) as client:
        # Given a busy worker and a task waiting behind it
        busy = await busy_worker(client)
        late = await client.submit("curation", "echo", value="too late")
        # When its wait times out
        with pytest.raises(TimeoutError), anyio.fail_after(0.5):
            await late.get()
        # Then the handle says it was revoked, and the busy tasks still finish
        with pytest.raises(TaskRevokedError):
            await late.get()
        with anyio.fail_after(60):
            assert [await h.get() for h in busy] == ["busy 0", "busy 1"]
    # And the worker never ran it: it is REVOKED
    await revoked_by_the_worker(sync_client, late.id)


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_failing_task_group_revokes_its_pending_tasks(
    anyio_backend: str, running: Stack, settings: Settings, sync_client: Client
) -> None:
    async with AsyncClient(settings) as client:
        # Given a busy worker and three tasks waited on in a task group
        busy = await busy_worker(client)
        pending: list[AsyncTaskHandle] = []

        async def fail_soon() -> None:
            await anyio.sleep(0.3)
            raise RuntimeError("a sibling fails")

        # When a sibling in the group fails
        with pytest.raises(BaseExceptionGroup):
            async with anyio.create_task_group() as group:
                for i in range(3):
                    handle = await client.submit("curation", "echo", value=f"pending {i}")
                    pending.append(handle)
                    group.start_soon(handle.get)
                group.start_soon(fail_soon)
        # Then every pending task was revoked, and the worker never runs them
        for handle in pending:
            with pytest.raises(TaskRevokedError):
                await handle.get()
        with anyio.fail_after(60):
            await busy[1].get()
    for handle in pending:
        await revoked_by_the_worker(sync_client, handle.id)


@pytest.mark.parametrize("anyio_backend", [pytest.param("asyncio", id="asyncio")])
async def test_a_forged_result_is_ignored_and_the_genuine_one_wins(
    anyio_backend: str, running: Stack, settings: Settings, conn: redis.Redis
) -> None:
    async with AsyncClient(settings) as client:
        # Given a task waiting behind a busy worker
        busy = await busy_worker(client)
        handle = await client.submit("curation", "echo", value="genuine")
        # When someone with Redis access publishes a final result for it with a bad signature
        signature = sign_result(load_signer(settings.home, "curation"), task_id=handle.id, status="SUCCESS", result="x")
        signature["sig"] = str(signature["sig"])[::-1]
        meta = {"task_id": handle.id, "status": "SUCCESS", "result": "forged", SIG_HEADER: signature}
        conn.publish(c.result_key("curation", handle.id), json.dumps(meta))
        # Then it is ignored: the genuine result arrives
        with anyio.fail_after(60):
            assert await handle.get() == "genuine"
            await busy[1].get()


@pytest.mark.parametrize("anyio_backend", [pytest.param("asyncio", id="asyncio")])
async def test_a_result_signed_by_another_role_is_refused(
    anyio_backend: str, running: Stack, settings: Settings, conn: redis.Redis, sync_client: Client
) -> None:
    async with AsyncClient(settings) as client:
        # Given a task for curation waiting behind a busy worker
        busy = await busy_worker(client)
        handle = await client.submit("curation", "echo", value="genuine")
        # When a result validly signed by the cline key is published for it
        signature = sign_result(load_signer(settings.home, "cline"), task_id=handle.id, status="SUCCESS", result="x")
        meta = {"task_id": handle.id, "status": "SUCCESS", "result": "x", SIG_HEADER: signature}
        conn.publish(c.result_key("curation", handle.id), json.dumps(meta))
        # Then the client refuses it as the sync client does: not authentic
        with pytest.raises(ResultSignatureError, match="not authentic"), anyio.fail_after(30):
            await handle.get()
        # And nothing is lost: the genuine result is stored, and the sync client accepts it (signed by curation)
        with anyio.fail_after(60):
            await busy[1].get()
    genuine = sync_client.handle(handle.id, "curation", "echo")
    assert await anyio.to_thread.run_sync(lambda: genuine.get(timeout=60)) == "genuine"


@pytest.mark.parametrize("anyio_backend", [pytest.param("asyncio", id="asyncio")])
async def test_submit_waits_while_max_in_flight_tasks_are_out(
    anyio_backend: str, running: Stack, settings: Settings
) -> None:
    async with AsyncClient(settings, max_in_flight=2) as client:
        # Given two tasks out, keeping the worker busy
        busy = await busy_worker(client)
        third: list[AsyncTaskHandle] = []

        async def submit_third() -> None:
            third.append(await client.submit("curation", "echo", value="third"))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                # When a third is submitted
                group.start_soon(submit_third)
                await anyio.wait_all_tasks_blocked()
                # Then it waits for a slot: nothing sent yet
                assert not third and client._limiter.statistics().tasks_waiting == 1
            # And it is sent once one of the two is done, and answers
            assert busy[0].done or busy[1].done
            assert await third[0].get() == "third"


@pytest.mark.parametrize("anyio_backend", [pytest.param("trio", id="trio")])
async def test_leaving_the_client_on_an_error_revokes_tasks_never_awaited(
    anyio_backend: str, running: Stack, settings: Settings, sync_client: Client
) -> None:
    # Given a busy worker and two tasks sent behind it that nobody awaits
    sent: list[AsyncTaskHandle] = []
    with pytest.raises(RuntimeError, match="the caller fails"):
        async with AsyncClient(settings) as client:
            busy = await busy_worker(client)
            sent += [await client.submit("curation", "echo", value=f"orphan {i}") for i in range(2)]
            # When the code using the client fails
            raise RuntimeError("the caller fails")
    # Then both were revoked: the worker never runs them (the busy ones, out too, are revoked as well)
    for handle in [*sent, *busy]:
        assert handle.done
    for handle in sent:
        await revoked_by_the_worker(sync_client, handle.id)

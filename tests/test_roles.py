"""Per-role queues with real worker processes: each role's task runs only on that role's worker."""

from __future__ import annotations

import json
import time

import psutil
import pytest
from celery import Celery

from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import UnknownRoleError, UnknownTaskError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.settings import Settings


@pytest.mark.parametrize("role", c.ROLES)
def test_health_is_answered_by_that_roles_worker(stack: Stack, client: Client, role: str) -> None:
    # When each role's health task is submitted
    facts = client.submit(role, "health").get(timeout=60)
    # Then that role's worker process (a pool child of that role's worker) answered with real facts
    assert facts["role"] == role
    assert facts["hostname"].startswith(f"{role}@")
    worker_pid = stack.children[role].pid
    assert psutil.Process(facts["pid"]).ppid() == worker_pid
    assert facts["cpu_affinity"] and facts["rss_bytes"] > 10_000_000
    assert facts["models"] and all(m["loaded"] for m in facts["models"])  # preloaded by the worker parent
    assert facts["celery_version"].startswith("5.")


def test_many_tasks_never_cross_roles(stack: Stack, client: Client) -> None:
    # Given 20 health tasks for every role, submitted interleaved
    handles = [(role, client.submit(role, "health")) for _ in range(20) for role in c.ROLES]
    # Then every answer comes from the role it was sent to
    for role, handle in handles:
        assert handle.get(timeout=60)["hostname"].startswith(f"{role}@")


def test_client_refuses_unknown_role_and_task(stack: Stack, client: Client) -> None:
    with pytest.raises(UnknownRoleError, match="unknown role"):
        client.submit("nobody", "health")
    with pytest.raises(UnknownTaskError, match="no task"):
        client.submit("cline", "synthesize_everything")


def test_a_task_pushed_into_another_roles_queue_is_refused(
    stack: Stack, stack_settings: Settings, control_app: Celery
) -> None:
    # Given a grok task forced into the cline queue, bypassing the routes
    conn = broker.connect(redis_urls.connection_url(stack_settings, acl.ADMIN))
    before = int(conn.hget(c.refused_counter_key("cline"), "wrong_queue") or 0)
    result = control_app.send_task("grok.echo", kwargs={"value": "moved"}, queue="cline", routing_key="cline")
    # When the cline worker receives it
    deadline = time.monotonic() + 30
    while int(conn.hget(c.refused_counter_key("cline"), "wrong_queue") or 0) == before:
        assert time.monotonic() < deadline, "the cline worker never refused the moved message"
        time.sleep(0.1)
    # Then it was not executed, it is counted, and its raw form is in cline's dead-letter list
    assert result.state == "PENDING"
    entries = [json.loads(raw) for raw in conn.lrange(c.dead_letter_key("cline"), 0, -1)]
    entry = next(e for e in entries if e["id"] == result.id)
    assert entry["reason"] == "wrong_queue" and "grok.echo" in entry["detail"]
    assert '"moved"' in entry["body"]
    assert broker.queue_depth(conn, "cline") == 0  # rejected, not requeued
    conn.close()
    # And one WARNING line with the reason and the id went to the JSON log
    log_lines = (stack_settings.log_dir / c.LOG_FILE).read_text().splitlines()
    refusals = [json.loads(line) for line in log_lines if result.id in line]
    assert any(r["level"] == "WARNING" and r.get("reason") == "wrong_queue" for r in refusals)

"""``xnai metrics`` over real workers: tasks, refusals and killed children are counted, on 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xnai_tasks.client.sync import Client
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import lazy_settings, metric_value, publish_raw, running_stack, scrape, wait_for_metric


@pytest.fixture(scope="module")
def settings() -> Settings:
    return lazy_settings(task_modules=("xnai_test_tasks",))


@pytest.fixture(scope="module")
def running(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings, ("curation",), metrics=True) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(running: Stack, settings: Settings) -> Iterator[Client]:
    import xnai_test_tasks  # noqa: F401  registers curation.die here too

    made = Client(settings)
    yield made
    made.close()


def test_every_task_is_counted_as_succeeded(client: Client, settings: Settings) -> None:
    # Given the count before
    before = metric_value(scrape(settings), "xnai_tasks_total", role="curation", task="echo", outcome="succeeded")
    # When N echo tasks run on the curation worker
    n = 5
    for handle in [client.submit("curation", "echo", value=i) for i in range(n)]:
        handle.get(timeout=60)
    # Then N more are counted as succeeded, with their durations and waits
    samples = wait_for_metric(
        settings, "xnai_tasks_total", before + n, role="curation", task="echo", outcome="succeeded"
    )
    assert metric_value(samples, "xnai_tasks_total", role="curation", task="echo", outcome="succeeded") == before + n
    assert metric_value(samples, "xnai_task_duration_seconds_count", role="curation", task="echo") >= n
    assert metric_value(samples, "xnai_task_queue_wait_seconds_count", role="curation") >= n
    assert metric_value(samples, "xnai_workers_online", role="curation") == 1
    assert metric_value(samples, "xnai_process_pss_bytes", role="curation") > 0


def test_unsigned_message_is_counted_as_refused(client: Client, settings: Settings) -> None:
    # Given the refusal counts before
    before = metric_value(scrape(settings), "xnai_refused_total", role="curation", reason="unsigned")
    # When an unsigned message is put on curation's queue
    app = create_app(settings, main="xnai_test_metrics_raw")
    try:
        publish_raw(app, task="curation.echo", queue="curation", kwargs={"value": "injected"})
    finally:
        app.close()
    # Then it is counted under reason "unsigned" and as a refused task
    samples = wait_for_metric(settings, "xnai_refused_total", before + 1, role="curation", reason="unsigned")
    assert metric_value(samples, "xnai_refused_total", role="curation", reason="unsigned") == before + 1
    assert metric_value(samples, "xnai_tasks_total", role="curation", task="unverified", outcome="refused") >= 1


def test_killed_child_is_counted_as_worker_lost(client: Client, settings: Settings, tmp_path: Path) -> None:
    # Given the count before
    before = metric_value(scrape(settings), "xnai_tasks_total", role="curation", task="die", outcome="worker_lost")
    # When a task kills its own pool process once, then succeeds on redelivery
    runs = tmp_path / "runs"
    client.submit("curation", "die", how="SIGKILL", runs_file=str(runs), times=1).get(timeout=90)
    # Then the death is counted as worker_lost, and the success after it survives the child's death
    samples = wait_for_metric(
        settings, "xnai_tasks_total", before + 1, role="curation", task="die", outcome="worker_lost"
    )
    assert metric_value(samples, "xnai_tasks_total", role="curation", task="die", outcome="worker_lost") == before + 1
    # (the result is stored before the child's task_postrun counts the success: wait for the count)
    samples = wait_for_metric(settings, "xnai_tasks_total", 1, role="curation", task="die", outcome="succeeded")
    assert metric_value(samples, "xnai_tasks_total", role="curation", task="die", outcome="succeeded") >= 1


def test_a_loaded_model_shows_and_counts_survive_a_killed_worker(
    client: Client, running: Stack, settings: Settings
) -> None:
    # Given the encoder loaded (lazily, in a pool child) by an embed task, and the successes counted so far
    client.submit("curation", "embed", texts=["a loaded model is visible"]).get(timeout=120)
    loaded = {"role": "curation", "model": "all-MiniLM-L6-v2"}
    embeds = {"role": "curation", "task": "embed", "outcome": "succeeded"}
    samples = wait_for_metric(settings, "xnai_tasks_total", 1, **embeds)  # counted after the result is stored
    assert metric_value(samples, "xnai_model_loaded", **loaded) == 1
    succeeded = metric_value(samples, "xnai_tasks_total", **embeds)
    assert succeeded >= 1
    # When the whole worker (parent and pool children) is killed with SIGKILL and the supervisor restarts it
    os.killpg(running.children["curation"].pid, signal.SIGKILL)
    said: list[str] = []
    deadline = time.monotonic() + 30
    while not any("restarted" in line for line in said) and time.monotonic() < deadline:
        running.restart_exited(said.append)
        time.sleep(0.2)
    app = create_app(settings, main="xnai_test_metrics_restart")
    try:
        running.wait_workers(app)
    finally:
        app.close()
    # Then no live process holds the model any more, and the counts from before the kill are still there
    samples = scrape(settings)
    assert metric_value(samples, "xnai_model_loaded", **loaded) == 0
    assert metric_value(samples, "xnai_tasks_total", role="curation", task="embed", outcome="succeeded") == succeeded
    # And the restarted worker counts on top of them
    client.submit("curation", "embed", texts=["counted again"]).get(timeout=120)
    samples = wait_for_metric(
        settings, "xnai_tasks_total", succeeded + 1, role="curation", task="embed", outcome="succeeded"
    )
    assert (
        metric_value(samples, "xnai_tasks_total", role="curation", task="embed", outcome="succeeded") == succeeded + 1
    )
    assert metric_value(samples, "xnai_model_loaded", **loaded) == 1


def test_labels_carry_no_host_pid_or_task_id(client: Client, settings: Settings) -> None:
    # Given a task that ran
    handle = client.submit("curation", "echo", value="labels")
    handle.get(timeout=60)
    # When every sample is read
    samples = scrape(settings)
    values = {v for _, labels in samples for _, v in labels}
    names = {k for _, labels in samples for k, _ in labels}
    # Then no label is a host name, a pid or a task id
    assert names <= {"role", "task", "outcome", "reason", "model", "le"}
    assert socket.gethostname() not in values
    assert handle.id not in values
    assert not any(v.isdigit() and int(v) > 1 for v in values if v != "+Inf")


def test_endpoint_binds_loopback_only(running: Stack, settings: Settings) -> None:
    # Given the metrics process
    import psutil

    proc = psutil.Process(running.children["metrics"].pid)
    scrape(settings)
    # When its listening sockets are listed
    listening = [conn.laddr for conn in proc.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]
    # Then it listens on 127.0.0.1:XNAI_METRICS_PORT and nowhere else
    assert [(addr.ip, addr.port) for addr in listening] == [("127.0.0.1", settings.metrics_port)]

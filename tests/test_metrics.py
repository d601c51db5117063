"""``xnai metrics`` over real workers: tasks, refusals and killed children are counted, on 127.0.0.1 only."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xnai_tasks.client.sync import Client
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import free_port, publish_raw, short_home

TESTS_DIR = str(Path(__file__).resolve().parent)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(
        home=short_home(),
        metrics_port=free_port(),
        model_mode="lazy",
        llm_safe="off",
        task_modules=("xnai_test_tasks",),
    )


@pytest.fixture(scope="module")
def running(settings: Settings) -> Iterator[Stack]:
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = TESTS_DIR  # the workers import tests/xnai_test_tasks.py
    try:
        with Stack(settings, roles=("curation",), flower=False, metrics=True) as stack:
            app = create_app(settings, main="xnai_test_metrics")
            stack.wait_workers(app)
            app.close()
            yield stack
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def client(running: Stack, settings: Settings) -> Iterator[Client]:
    import xnai_test_tasks  # noqa: F401  registers curation.die here too

    made = Client(settings)
    yield made
    made.close()


def scrape(settings: Settings) -> Samples:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=10) as r:
                text = r.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(settings: Settings, name: str, at_least: float, **labels: str) -> Samples:
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(settings)
        if value(samples, name, **labels) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def test_every_task_is_counted_as_succeeded(client: Client, settings: Settings) -> None:
    # Given the count before
    before = value(scrape(settings), "xnai_tasks_total", role="curation", task="echo", outcome="succeeded")
    # When N echo tasks run on the curation worker
    n = 5
    for handle in [client.submit("curation", "echo", value=i) for i in range(n)]:
        handle.get(timeout=60)
    # Then N more are counted as succeeded, with their durations and waits
    samples = wait_for(settings, "xnai_tasks_total", before + n, role="curation", task="echo", outcome="succeeded")
    assert value(samples, "xnai_tasks_total", role="curation", task="echo", outcome="succeeded") == before + n
    assert value(samples, "xnai_task_duration_seconds_count", role="curation", task="echo") >= n
    assert value(samples, "xnai_task_queue_wait_seconds_count", role="curation") >= n
    assert value(samples, "xnai_workers_online", role="curation") == 1
    assert value(samples, "xnai_process_pss_bytes", role="curation") > 0


def test_unsigned_message_is_counted_as_refused(client: Client, settings: Settings) -> None:
    # Given the refusal counts before
    before = value(scrape(settings), "xnai_refused_total", role="curation", reason="unsigned")
    # When an unsigned message is put on curation's queue
    app = create_app(settings, main="xnai_test_metrics_raw")
    try:
        publish_raw(app, task="curation.echo", queue="curation", kwargs={"value": "injected"})
    finally:
        app.close()
    # Then it is counted under reason "unsigned" and as a refused task
    samples = wait_for(settings, "xnai_refused_total", before + 1, role="curation", reason="unsigned")
    assert value(samples, "xnai_refused_total", role="curation", reason="unsigned") == before + 1
    assert value(samples, "xnai_tasks_total", role="curation", task="unverified", outcome="refused") >= 1


def test_killed_child_is_counted_as_worker_lost(client: Client, settings: Settings, tmp_path: Path) -> None:
    # Given the count before
    before = value(scrape(settings), "xnai_tasks_total", role="curation", task="die", outcome="worker_lost")
    # When a task kills its own pool process once, then succeeds on redelivery
    runs = tmp_path / "runs"
    client.submit("curation", "die", how="SIGKILL", runs_file=str(runs), times=1).get(timeout=90)
    # Then the death is counted as worker_lost, and the success after it survives the child's death
    samples = wait_for(settings, "xnai_tasks_total", before + 1, role="curation", task="die", outcome="worker_lost")
    assert value(samples, "xnai_tasks_total", role="curation", task="die", outcome="worker_lost") == before + 1
    assert value(samples, "xnai_tasks_total", role="curation", task="die", outcome="succeeded") >= 1


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

"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from xnai_tasks.core.constants import LOG_FILE
from xnai_tasks.settings import Settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def short_home() -> Path:
    """A fresh XNAI_HOME with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="xnai-t-", dir="/tmp"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_xnai(
    args: list[str], settings: Settings | None = None, *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``xnai`` command in a subprocess with the given settings (or raw environment)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
    if settings is not None:
        full_env.update(settings.to_env())
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "xnai_tasks", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def publish_raw(
    app: Any,
    *,
    task: str,
    queue: str,
    kwargs: dict[str, Any] | None = None,
    signer: Any = None,
    sign_queue: str | None = None,
    now: float | None = None,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    task_id: str | None = None,
) -> tuple[str, dict[str, Any], Any]:
    """Publish a task message straight to a queue, as anyone who can write to Redis could.

    The message is Celery's own protocol 2; it is signed with ``signer`` (over ``sign_queue`` or
    ``queue``) when given, then ``mutate`` may change its headers. Returns (task id, headers, body).
    """
    from xnai_tasks.security.message_signature import sign_message
    from xnai_tasks.security.signature import SIG_HEADER

    task_id = task_id or str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, args=(), kwargs=kwargs or {})
    headers = dict(message.headers)
    if signer is not None:
        headers[SIG_HEADER] = sign_message(
            signer, headers=headers, body=message.body, queue=sign_queue or queue, now=now
        )
    if mutate is not None:
        mutate(headers)
    resend(app, queue, headers, message.body)
    return task_id, headers, message.body


def resend(app: Any, queue: str, headers: dict[str, Any], body: Any) -> None:
    """Publish a body and headers as they are (no signing hook runs) to ``queue``."""
    target = app.amqp.queues[queue]
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=target.exchange,
            routing_key=target.routing_key,
            headers=headers,
            serializer="json",
            declare=[target],
            retry=True,
        )


def scrape(settings: Settings) -> Samples:
    """Every sample ``xnai metrics`` serves now, by (name, labels); retried while the endpoint starts."""
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


def metric_value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for_metric(settings: Settings, name: str, at_least: float, **labels: str) -> Samples:
    """Scrape until the sample reaches ``at_least`` (or 60 s pass); the last scrape."""
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(settings)
        if metric_value(samples, name, **labels) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


TESTS_DIR = str(Path(__file__).resolve().parent)


def lazy_settings(**overrides: Any) -> Settings:
    """Settings of a private stack on a fresh home: lazy models, no LLM probe, a free metrics port."""
    fields: dict[str, Any] = {
        "home": short_home(), "metrics_port": free_port(), "model_mode": "lazy", "llm_safe": "off",
    }  # fmt: skip
    return Settings(**{**fields, **overrides})


@contextmanager
def running_stack(settings: Settings, roles: tuple[str, ...], *, metrics: bool = False) -> Iterator[Any]:
    """A :class:`Stack` of ``roles`` (no Flower) whose workers all answer a ping.

    The workers can import ``tests/xnai_test_tasks.py`` (for settings whose ``task_modules`` name it).
    """
    from xnai_tasks.core.celery_app import create_app
    from xnai_tasks.ops.supervisor import Stack

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = TESTS_DIR
    try:
        with Stack(settings, roles=roles, flower=False, metrics=metrics) as stack:
            app = create_app(settings, main="xnai_test_ping")
            try:
                stack.wait_workers(app)
            finally:
                app.close()
            yield stack
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@contextmanager
def admin_connection(settings: Settings) -> Iterator[Any]:
    """A Redis connection as the embedded Redis's admin user (to look at or tamper with what is stored)."""
    from xnai_tasks.core import broker
    from xnai_tasks.security import acl, redis_urls

    conn = broker.connect(redis_urls.connection_url(settings, acl.ADMIN))
    try:
        yield conn
    finally:
        conn.close()


def flower_task_info(settings: Settings, task_id: str) -> dict[str, Any] | None:
    """What Flower's task API (basic auth from XNAI_HOME) knows of ``task_id``; None while it knows nothing."""
    import base64
    import json

    from xnai_tasks.ops.flower import ensure_credentials

    creds, _ = ensure_credentials(settings)
    request = urllib.request.Request(f"http://127.0.0.1:{settings.flower_port}/api/task/info/{task_id}")
    request.add_header("Authorization", "Basic " + base64.b64encode(creds.basic_auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            found = json.loads(response.read() or b"null")
    except OSError:  # HTTPError (404 while unknown) included
        return None
    return found if isinstance(found, dict) else None


def wait_flower_success(settings: Settings, task_id: str, within_s: float = 30.0) -> dict[str, Any] | None:
    """Flower's record of ``task_id`` once it shows SUCCESS, or the last one seen after ``within_s``."""
    deadline = time.monotonic() + within_s
    info = flower_task_info(settings, task_id)
    while not (info and info.get("state") == "SUCCESS") and time.monotonic() < deadline:
        time.sleep(0.5)
        info = flower_task_info(settings, task_id)
    return info


def log_events(settings: Settings, event: str) -> list[dict[str, Any]]:
    """Every JSON log line of every process with this ``event``."""
    path = settings.log_dir / LOG_FILE
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
    return found

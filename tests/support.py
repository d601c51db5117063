"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xnai_tasks.settings import Settings


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

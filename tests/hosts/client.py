"""The test client of a namespaced cluster; it runs inside the hub's namespace, never in the test process.

``python -m hosts.client submit`` reads ``{"calls": [[ROLE, TASK, KWARGS], ...], "timeout": S, "max_in_flight": N}``
on stdin, submits every call with the :class:`AsyncClient` and prints one JSON line per event as it happens:
``{"event": "submitted", "i", "id"}``, ``{"event": "result", "i", "id", "ok", "value"|"error", "seconds"}``, then
``{"event": "done"}``. A call not answered within ``timeout`` seconds of the start is a ``TimeoutError`` result.

``python -m hosts.client tls-ready ADDRESS PORT --timeout S`` waits until a TLS handshake with the hub's terminator
completes with this home's CA and client certificate (exit 0; 1 after ``timeout``).

``python -m hosts.client online --want N1,N2 --gone N3 --timeout S`` waits until the nodes ``want`` answer a signed
ping and the nodes ``gone`` do not; prints ``{"online": [...], "ok": bool}`` and exits 0 when both hold, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import anyio

from xnai_tasks.client.asynchronous import AsyncClient


def _emit(**fields: Any) -> None:
    print(json.dumps(fields, default=str), flush=True)


async def _one(client: AsyncClient, i: int, call: list[Any], started: float, deadline: float) -> None:
    role, task, kwargs = call
    task_id = None
    try:
        handle = await client.submit(role, task, **kwargs)
        task_id = handle.id
        _emit(event="submitted", i=i, id=task_id)
        with anyio.fail_after(max(0.1, deadline - time.monotonic())):
            value = await handle.get()
    except Exception as exc:  # every failure is this call's outcome, never the batch's end
        _emit(event="result", i=i, id=task_id, ok=False, error=f"{type(exc).__name__}: {exc}",
              seconds=time.monotonic() - started)  # fmt: skip
        return
    _emit(event="result", i=i, id=task_id, ok=True, value=value, seconds=time.monotonic() - started)


async def submit(job: dict[str, Any]) -> None:
    started = time.monotonic()
    deadline = started + float(job.get("timeout", 120.0))
    client = AsyncClient.from_env(max_in_flight=int(job.get("max_in_flight", 64)))
    async with client, anyio.create_task_group() as group:
        for i, call in enumerate(job["calls"]):
            group.start_soon(_one, client, i, call, started, deadline)
    _emit(event="done")


def online(want: set[str], gone: set[str], timeout: float) -> bool:
    from xnai_tasks.core.celery_app import create_app
    from xnai_tasks.core.nodes import nodes_online
    from xnai_tasks.settings import Settings

    app = create_app(Settings.from_env(), main="xnai_hosts_ping")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                seen = {node for nodes in nodes_online(app).values() for node in nodes}
            except Exception as exc:  # the broker starting or away: ask again until the deadline
                print(f"online: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                seen = set()
            ok = want <= seen and not (gone & seen)
            if ok or time.monotonic() > deadline:
                _emit(online=sorted(seen), ok=ok)
                return ok
            time.sleep(0.3)
    finally:
        app.close()


def tls_ready(address: str, port: int, timeout: float) -> bool:
    """Whether a TLS handshake with ``address:port`` (checking its certificate against this home's CA, presenting
    this home's client certificate) completes within ``timeout`` seconds; tried again until then."""
    import socket

    from xnai_tasks.security.tls import TlsFiles, client_context, redis_ssl_options
    from xnai_tasks.settings import Settings

    context = client_context(redis_ssl_options(TlsFiles.of(Settings.from_env().home)))
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = socket.create_connection((address, port), timeout=2.0)
            with raw, context.wrap_socket(raw, server_hostname=address):
                return True
        except OSError as exc:  # ssl.SSLError included: not listening yet, or refused
            if time.monotonic() > deadline:
                print(f"tls-ready: {address}:{port}: {exc}", file=sys.stderr, flush=True)
                return False
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(prog="hosts.client")
    modes = parser.add_subparsers(dest="mode", required=True)
    modes.add_parser("submit")
    ping = modes.add_parser("online")
    ping.add_argument("--want", default="")
    ping.add_argument("--gone", default="")
    ping.add_argument("--timeout", type=float, default=120.0)
    ready = modes.add_parser("tls-ready")
    ready.add_argument("address")
    ready.add_argument("port", type=int)
    ready.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.mode == "tls-ready":
        return 0 if tls_ready(args.address, args.port, args.timeout) else 1
    if args.mode == "submit":
        anyio.run(submit, json.load(sys.stdin))
        return 0
    names = {name for name in args.want.split(",") if name}
    return 0 if online(names, {name for name in args.gone.split(",") if name}, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``xnai tls``: the private CA and certificates of TLS between hosts, and the TLS terminator (README, TLS)."""

from __future__ import annotations

import click

from xnai_tasks.cli.parsing import Choice, Command
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings


@click.command("tls", cls=Command)
@click.argument("action", type=Choice("init", "client", "serve"))
@click.argument("words", nargs=-1)
@click.option("--host", "hosts", multiple=True, help="init: a name or IP address clients reach Redis by (repeatable)")
@click.option("--client", "clients", multiple=True, help="init: also make a client certificate for this host name")
@click.pass_obj
def tls_command(
    settings: Settings, action: str, words: tuple[str, ...], hosts: tuple[str, ...], clients: tuple[str, ...]
) -> int:
    """TLS between hosts.

    ACTION is init (the CA, kept if there is one; the Redis host's server certificate for every --host plus
    localhost and 127.0.0.1; this host's client certificate; one more per --client NAME), client NAME (a client
    certificate for another host, under XNAI_HOME/tls/clients) or serve (the TLS terminator of the embedded
    Redis in the foreground, on XNAI_REDIS_TLS_BIND:XNAI_REDIS_TLS_PORT; xnai up runs it).
    """
    if action == "serve":
        if words:
            raise UsageError("xnai tls serve takes no arguments")
        return _serve(settings)
    from xnai_tasks.security import certificates
    from xnai_tasks.security.tls import TlsFiles

    files = TlsFiles.of(settings.home)
    if action == "client":
        if len(words) != 1 or hosts or clients:
            raise UsageError("usage: xnai tls client NAME (a client certificate for the host NAME)")
        print(certificates.describe(certificates.issue_client(files, words[0])))
        return 0
    if words:
        raise UsageError("usage: xnai tls init [--host NAME_OR_IP ...] [--client NAME ...]")
    _, _, made = certificates.ensure_ca(files)
    print(f"{'made' if made else 'kept'} {certificates.describe(files.ca)}")
    certificates.issue_server(files, hosts)
    print(f"made {certificates.describe(files.server_cert)}")
    if not files.has_client_cert():
        import socket

        certificates.issue_client(files, socket.gethostname(), cert_path=files.client_cert, key_path=files.client_key)
        print(f"made {certificates.describe(files.client_cert)}")
    for name in clients:
        print(f"made {certificates.describe(certificates.issue_client(files, name))}")
    return 0


def _serve(settings: Settings) -> int:
    import asyncio
    import contextlib
    import signal

    from xnai_tasks.observability.logs import setup_logging
    from xnai_tasks.ops.tls_proxy import TlsProxy

    proxy = TlsProxy.for_settings(settings)
    setup_logging(settings)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        ready = f"tls: serving {proxy.bind}:{proxy.port} for {proxy.socket_path}"
        await proxy.serve(lambda: print(ready, flush=True))

    with contextlib.suppress(asyncio.CancelledError):  # SIGINT or SIGTERM
        asyncio.run(main())
    return 0

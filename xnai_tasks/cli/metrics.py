"""``xnai metrics``: the Prometheus endpoint on 127.0.0.1 (the Procfile's line; ``xnai up`` runs it)."""

from __future__ import annotations

import contextlib
import signal

import click

from xnai_tasks.cli.parsing import Command
from xnai_tasks.settings import Settings


@click.command("metrics", cls=Command)
@click.pass_obj
def metrics_command(settings: Settings) -> int:
    """Serve Prometheus metrics on 127.0.0.1:XNAI_METRICS_PORT in the foreground."""
    from prometheus_client import start_http_server

    from xnai_tasks.cli.stack import keys_on_first_run
    from xnai_tasks.core import broker
    from xnai_tasks.core import constants as c
    from xnai_tasks.core.celery_app import create_app
    from xnai_tasks.errors import ProcessError
    from xnai_tasks.observability.logs import setup_logging
    from xnai_tasks.observability.metrics import prepare_dir
    from xnai_tasks.observability.metrics_exporter import make_registry
    from xnai_tasks.ops.supervisor import StopRequested, raise_on_stop_signals
    from xnai_tasks.security import acl, redis_urls

    keys_on_first_run(settings)
    broker.require_reachable(settings, wait_s=broker.startup_wait_s(settings))
    raise_on_stop_signals()
    setup_logging(settings)
    prepare_dir(settings, clean=False)
    conn = broker.connect(redis_urls.connection_url(settings, acl.ADMIN))
    app = create_app(settings, main="xnai_metrics")
    try:
        server, _thread = start_http_server(
            settings.metrics_port, addr=c.METRICS_HOST, registry=make_registry(settings, conn, app)
        )
    except OSError as exc:
        raise ProcessError(
            f"metrics: cannot listen on {c.METRICS_HOST}:{settings.metrics_port}: {exc.strerror}"
        ) from None
    print(f"metrics: serving http://{c.METRICS_HOST}:{settings.metrics_port}/metrics", flush=True)
    with contextlib.suppress(StopRequested):
        while True:
            signal.pause()
    server.shutdown()
    conn.close()
    app.close()
    return 0

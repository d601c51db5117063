"""Flower: basic-auth credentials generated under XNAI_HOME, and safe defaults however Flower is started.

``celery -A xnai_tasks flower`` runs Flower's own command, a Celery plugin, which reads its options from
Tornado's ``options``: first what Flower defines, then ``FLOWER_*`` variables, then ``flowerconfig.py``
(``--conf``), then its command line. The only place Celery lets an app act inside a plugin command
before that is a preload option (``app.user_options["preload"]``), whose callback click runs while it
parses the sub-command's own arguments. :func:`add_flower_defaults` (called by
:func:`xnai_tasks.core.celery_app.create_app`) adds one; for the ``flower`` command it sets Flower's
defaults to: bind 127.0.0.1 on ``XNAI_FLOWER_PORT``, basic auth with the generated credentials, our task
formatter (:mod:`xnai_tasks.ops.flower_tasks`), and the app connects as the ``flower`` ACL user. Anything
given explicitly (``--address``, ``FLOWER_ADDRESS``, ``--basic_auth``, a ``flowerconfig.py``) still wins,
because Flower applies it on top. ``xnai flower`` (the Procfile's line) runs that same command.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import sys
from dataclasses import dataclass
from typing import Any

import click

from xnai_tasks.core import constants as c
from xnai_tasks.errors import SettingsError, XnaiError
from xnai_tasks.settings import Settings

FLOWER_USER = "xnai"
#: Where Flower listens unless told otherwise: loopback only (IPv4; no ``[::]``).
LOOPBACK = "127.0.0.1"
#: Seconds after which Flower forgets a worker that went offline.
PURGE_OFFLINE_S = 60
#: The hidden preload option whose callback sets Flower's defaults (it takes no value anyone passes).
PRELOAD_OPTION = "--xnai-flower-defaults"


@dataclass(frozen=True)
class FlowerCredentials:
    """User and password of Flower's basic auth."""

    user: str
    password: str

    @property
    def basic_auth(self) -> str:
        return f"{self.user}:{self.password}"


def ensure_credentials(settings: Settings) -> tuple[FlowerCredentials, bool]:
    """Load the credentials, creating them (mode 0600) on first use; the flag says they are new."""
    path = settings.home / c.FLOWER_CREDENTIALS
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:  # as passwords.json: a credentials file others can read is refused, not used
            raise SettingsError(f"{path} has mode {mode:04o}, readable by others: run chmod 600 {path}")
        data = json.loads(path.read_text())
        return FlowerCredentials(str(data["user"]), str(data["password"])), False
    creds = FlowerCredentials(FLOWER_USER, secrets.token_urlsafe(18))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"user": creds.user, "password": creds.password}, fh)
    return creds, True


def flower_argv(settings: Settings) -> list[str]:
    """The command that runs Flower: Celery's ``flower`` command, whose defaults the app makes safe
    (127.0.0.1, basic auth, the ``flower`` ACL user; see :func:`apply_flower_defaults`)."""
    return [sys.executable, "-m", "celery", "-A", "xnai_tasks", "flower"]


def flower_env(settings: Settings, creds: FlowerCredentials) -> dict[str, str]:
    """Environment for the Flower process: these settings. ``creds`` are not passed on: Flower's defaults read
    them from XNAI_HOME, not from the environment."""
    return {**os.environ, **settings.to_env()}


def add_flower_defaults(app: Any) -> None:
    """Give ``app``'s ``celery flower`` command safe defaults (see the module's docstring)."""
    app.user_options["preload"].add(
        click.Option(
            [PRELOAD_OPTION],
            is_flag=True,
            hidden=True,
            expose_value=False,  # nothing reaches the command's callback (Flower's takes no such argument)
            callback=_on_subcommand,
            help="(internal) safe defaults for the flower command",
        )
    )


def _on_subcommand(ctx: click.Context, _param: click.Parameter, _value: object) -> None:
    """Run by click for every sub-command of ``celery -A xnai_tasks``; acts for ``flower`` only."""
    if ctx.command.name != "flower":
        return
    from xnai_tasks.settings import process_settings

    try:
        apply_flower_defaults(ctx.obj.app, process_settings())
    except XnaiError as exc:  # one line and the exit code, as the xnai command reports it
        print(f"xnai: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None


def apply_flower_defaults(app: Any, settings: Settings) -> None:
    """Set Flower's option defaults for this process, and make ``app`` connect as the ``flower`` ACL user.

    Run before Flower reads ``FLOWER_*``, its config file and its command line, which override these.
    """
    from flower.options import default_options

    import celeryconfig
    from xnai_tasks.ops.flower_queues import use_socket_helper_with_user
    from xnai_tasks.ops.flower_tasks import task_formatter
    from xnai_tasks.security import acl

    creds, new = ensure_credentials(settings)
    if new:
        print(f"Flower credentials (shown once, kept in {settings.home}): {creds.basic_auth}", flush=True)
    default_options.address = LOOPBACK
    default_options.port = settings.flower_port
    default_options.basic_auth = [creds.basic_auth]
    default_options.format_task = task_formatter(app)
    default_options.purge_offline_workers = PURGE_OFFLINE_S
    default_options.db = str(settings.home / c.FLOWER_DB)  # used only with --persistent
    # Flower watches, inspects and reads results as its own ACL user (on an external Redis: the URL given to
    # this host), with no unacked keys, and signs its inspect commands as itself.
    app.conf.update(celeryconfig.build(settings, acl.FLOWER))
    app.conf["xnai_control_agent"] = acl.FLOWER
    use_socket_helper_with_user()

"""Flower: basic-auth credentials generated under XNAI_HOME on first run, and its command line."""

from __future__ import annotations

import json
import os
import secrets
import stat
import sys
from dataclasses import dataclass

from xnai_tasks.core import constants as c
from xnai_tasks.errors import SettingsError
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.settings import Settings

FLOWER_USER = "xnai"


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
    """The command that runs Flower on 127.0.0.1; credentials go through the environment, not argv."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "xnai_tasks",
        "flower",
        "--address=127.0.0.1",
        f"--port={settings.flower_port}",
        "--persistent=False",
        "--purge_offline_workers=60",
    ]


def flower_env(settings: Settings, creds: FlowerCredentials) -> dict[str, str]:
    """Environment for the Flower process."""
    env = {**os.environ, **settings.to_env(), "FLOWER_BASIC_AUTH": creds.basic_auth}
    if settings.embedded:  # Flower connects as its own ACL user: watch, inspect, never consume
        env["XNAI_REDIS_URL"] = redis_urls.connection_url(settings, acl.FLOWER)
    return env

"""Typed settings, read from the environment once, at start, and validated.

Nothing reads the environment at import time: call :meth:`Settings.from_env` where a process starts
(the CLI, a worker, ``Client.from_env``). A bad value raises :class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from xnai_tasks import constants as c
from xnai_tasks.errors import SettingsError

T = TypeVar("T")

REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "unix")


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, default (as text) and meaning, for the README table."""

    name: str
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable("XNAI_HOME", "~/.xnai", "state: keys, embedded Redis data and socket, logs, Flower credentials"),
    Variable("XNAI_REDIS_URL", "(embedded)", "an external Redis, e.g. redis://127.0.0.1:6379/0; unset = embedded"),
    Variable("XNAI_LLM_MODEL", "(manifest default)", "path of another GGUF file for the LLM roles"),
    Variable("XNAI_ENCODER_MODEL", "(manifest default)", "path of another encoder folder (transformers)"),
    Variable("XNAI_RESERVED_CORES", "2", "cores kept for the system; workers get the rest"),
    Variable("XNAI_FLOWER_PORT", "5555", "port Flower binds on 127.0.0.1"),
    Variable(
        "XNAI_VISIBILITY_TIMEOUT", "3600", "seconds before an unacked task is redelivered; above the longest task"
    ),
    Variable("XNAI_TASK_TIME_LIMIT", "1800", "hard time limit of a task in seconds (the soft limit is 90% of it)"),
    Variable("XNAI_LOG_LEVEL", "INFO", "level of the JSON log written to XNAI_HOME/logs"),
)


@dataclass(frozen=True)
class Settings:
    """Everything configurable, validated. Build with :meth:`from_env` or directly in tests."""

    home: Path
    redis_url: str | None = None
    llm_model: Path | None = None
    encoder_model: Path | None = None
    reserved_cores: int = 2
    flower_port: int = 5555
    visibility_timeout: int = 3600
    task_time_limit: int = 1800
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``XNAI_*`` variable; raise :class:`SettingsError` on the first bad one."""
        env = os.environ if env is None else env
        home = _parse_home(env.get("XNAI_HOME") or str(Path.home() / ".xnai"))
        settings = cls(
            home=home,
            redis_url=_optional(env, "XNAI_REDIS_URL", _parse_redis_url),
            llm_model=_optional(env, "XNAI_LLM_MODEL", _parse_path("XNAI_LLM_MODEL")),
            encoder_model=_optional(env, "XNAI_ENCODER_MODEL", _parse_path("XNAI_ENCODER_MODEL")),
            reserved_cores=_int(env, "XNAI_RESERVED_CORES", 2, 0, 1024),
            flower_port=_int(env, "XNAI_FLOWER_PORT", 5555, 1, 65535),
            visibility_timeout=_int(env, "XNAI_VISIBILITY_TIMEOUT", 3600, 10, 7 * 24 * 3600),
            task_time_limit=_int(env, "XNAI_TASK_TIME_LIMIT", 1800, 1, 7 * 24 * 3600),
            log_level=_choice(env, "XNAI_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        )
        if settings.visibility_timeout <= settings.task_time_limit:
            raise SettingsError(
                f"XNAI_VISIBILITY_TIMEOUT={settings.visibility_timeout} must be above "
                f"XNAI_TASK_TIME_LIMIT={settings.task_time_limit}, or long tasks are delivered twice"
            )
        return settings

    def to_env(self) -> dict[str, str]:
        """These settings as ``XNAI_*`` variables, for a child process that must see the same ones."""
        env = {
            "XNAI_HOME": str(self.home),
            "XNAI_RESERVED_CORES": str(self.reserved_cores),
            "XNAI_FLOWER_PORT": str(self.flower_port),
            "XNAI_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "XNAI_TASK_TIME_LIMIT": str(self.task_time_limit),
            "XNAI_LOG_LEVEL": self.log_level,
        }
        optional = {
            "XNAI_REDIS_URL": self.redis_url,
            "XNAI_LLM_MODEL": self.llm_model,
            "XNAI_ENCODER_MODEL": self.encoder_model,
        }
        env.update({name: str(value) for name, value in optional.items() if value is not None})
        return env

    @property
    def embedded(self) -> bool:
        """True when no external Redis is configured and the embedded one is used."""
        return self.redis_url is None

    @property
    def redis_dir(self) -> Path:
        return self.home / c.REDIS_DIR

    @property
    def redis_socket(self) -> Path:
        return self.redis_dir / c.REDIS_SOCKET

    @property
    def log_dir(self) -> Path:
        return self.home / c.LOG_DIR

    @property
    def broker_url(self) -> str:
        """The URL Celery and the client connect with."""
        if self.redis_url is not None:
            return self.redis_url
        return f"redis+socket://{self.redis_socket}"

    @property
    def soft_time_limit(self) -> int:
        return max(1, int(self.task_time_limit * 0.9))


def _optional(env: Mapping[str, str], name: str, parse: Callable[[str], T]) -> T | None:
    raw = env.get(name, "").strip()
    return parse(raw) if raw else None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range ({low} to {high})")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().upper() or default
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _parse_home(raw: str) -> Path:
    home = Path(raw).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SettingsError(f"XNAI_HOME={raw!r} cannot be created: {exc.strerror}") from None
    if not home.is_dir():
        raise SettingsError(f"XNAI_HOME={raw!r} is not a directory")
    if not os.access(home, os.R_OK | os.W_OK | os.X_OK):
        raise SettingsError(f"XNAI_HOME={raw!r} is not readable and writable by this user")
    return home.resolve()


def _parse_redis_url(raw: str) -> str:
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise SettingsError(f"XNAI_REDIS_URL={raw!r} is malformed: {exc}") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise SettingsError(f"XNAI_REDIS_URL={raw!r} must start with one of {', '.join(REDIS_SCHEMES)}://")
    if parts.scheme in ("redis+socket", "unix"):
        if not parts.path:
            raise SettingsError(f"XNAI_REDIS_URL={raw!r} names no socket path")
    elif not parts.hostname:
        raise SettingsError(f"XNAI_REDIS_URL={raw!r} names no host")
    elif port is not None and port == 0:
        raise SettingsError(f"XNAI_REDIS_URL={raw!r} has port 0")
    return raw


def _parse_path(name: str) -> Callable[[str], Path]:
    def parse(raw: str) -> Path:
        path = Path(raw).expanduser()
        if not path.exists():
            raise SettingsError(f"{name}={raw!r} does not exist")
        return path.resolve()

    return parse

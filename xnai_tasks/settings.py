"""Typed settings, read from the environment once, at start, and validated.

Nothing reads the environment at import time. A process reads it once, on first use, through
:func:`process_settings` (the CLI, a worker and its Celery app, the gate, the logs all share that one
object); ``Client.from_env`` and tests build their own with :meth:`Settings.from_env`. A bad value raises
:class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from xnai_tasks.core import constants as c
from xnai_tasks.errors import SettingsError

T = TypeVar("T")


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
    Variable("XNAI_METRICS_PORT", "9808", "port the Prometheus metrics endpoint (xnai metrics) binds on 127.0.0.1"),
    Variable(
        "XNAI_VISIBILITY_TIMEOUT", "3600", "seconds before an unacked task is redelivered; above the longest task"
    ),
    Variable("XNAI_TASK_TIME_LIMIT", "1800", "hard time limit of a task in seconds (the soft limit is 90% of it)"),
    Variable("XNAI_MAX_MESSAGE_AGE", "7200", "seconds a signed message stays valid; nonces are kept as long"),
    Variable("XNAI_LOG_LEVEL", "INFO", "level of the JSON log written to XNAI_HOME/logs"),
    Variable("XNAI_MODEL_MODE", "auto", "auto (the plan decides), preload (before the fork) or lazy (on first use)"),
    Variable("XNAI_KEEP_ALIVE", "300", "seconds a lazily loaded model stays in memory after its last use"),
    Variable("XNAI_MODEL_RAM_MB", "(no cap)", "most MiB of lazily loaded models one worker process may hold"),
    Variable("XNAI_THREADS", "(the plan)", "threads per pool process (llama.cpp and torch), overriding the plan"),
    Variable("XNAI_COPILOT_EVERY_S", "60", "seconds between the copilot's checks of services, RAM and queues"),
    Variable("XNAI_MIN_FREE_MB", "512", "below this much available RAM the copilot asks idle lazy models to unload"),
    Variable("XNAI_PRELOAD_AHEAD_S", "120", "the copilot warms a scheduled workflow's roles this early (0: never)"),
    Variable("XNAI_PLAN", "(none)", 'JSON overrides of the plan per role, e.g. {"grok": {"processes": 2}}'),
    Variable(
        "XNAI_SCHEDULE",
        "(none)",
        'workflows the copilot\'s beat runs, e.g. {"n": {"workflow": "research", "kwargs": {...}, "every_s": 3600}}',
    ),
    Variable(
        "XNAI_LLM_SAFE",
        "auto",
        "auto (probe the LLM's load options in a separate process), on (safe options only), off (no probe)",
    ),
    Variable("XNAI_LLM_PROBE_TIMEOUT", "120", "seconds one LLM probe (load and a short generation) may take"),
    Variable("XNAI_MAX_DELIVERIES", "3", "times a message whose worker process died running it is delivered at most"),
    Variable(
        "XNAI_DEAD_AFTER",
        "30",
        "seconds without a heartbeat after which a worker's taken tasks go back to its role's queue (at least 5)",
    ),
    Variable("XNAI_TASK_MODULES", "(none)", "extra task modules a worker imports, comma-separated (e.g. for tests)"),
    Variable("XNAI_REDIS_MAXMEMORY_MB", "(plan)", "the embedded Redis' memory cap, MiB (plan: 5% of RAM, 256-2048)"),
    Variable(
        "XNAI_REDIS_TLS_PORT",
        "(off)",
        "TCP port of the embedded Redis' TLS terminator (mutual TLS, see TLS between hosts); unset: off",
    ),
    Variable("XNAI_REDIS_TLS_BIND", "0.0.0.0", "address the TLS terminator listens on (XNAI_REDIS_TLS_PORT)"),
    Variable("XNAI_LLM_PROBE_RUNNER", "xnai_tasks.models.probe_runner", "module the LLM probe runs (for diagnostics)"),
    Variable("XNAI_TELEMETRY_DAYS", "7", "days the task telemetry under XNAI_HOME/telemetry is kept; 0 turns it off"),
    Variable(
        "XNAI_MAX_QUEUE",
        "512",
        "most messages waiting in a role's queue; a submit beyond it is refused (exit 3) with a retry-after; 0: no cap",
    ),
    Variable("XNAI_MAX_QUEUE_ROLE", "(XNAI_MAX_QUEUE)", "one role's cap, e.g. XNAI_MAX_QUEUE_GROK=64"),
    Variable(
        "XNAI_TASK_EXPIRES",
        "3600",
        "seconds a message may wait for a worker; then it is dropped, counted and refused, not run (--wait: --timeout)",
    ),
    Variable("XNAI_BREAKER", "on", "on: a circuit breaker per role and model stops calls to an LLM that keeps failing"),
    Variable("XNAI_BREAKER_FAILURES", "5", "LLM failures or timeouts within XNAI_BREAKER_WINDOW that open a breaker"),
    Variable("XNAI_BREAKER_WINDOW", "60", "seconds over which a breaker counts failures"),
    Variable("XNAI_BREAKER_OPEN", "30", "seconds a breaker first stays open; doubled, with jitter, per failed probe"),
    Variable("XNAI_BREAKER_OPEN_MAX", "600", "most seconds a breaker stays open"),
    Variable("XNAI_LLM_SLOW", "120", "seconds after which an LLM call counts as a timeout for the breaker"),
    Variable("XNAI_MODEL_POOL", "(the plan)", "most processes of a role on one host using one model at once"),
    Variable("XNAI_POOL_WAIT", "60", "seconds a task waits for a model lease before it is refused"),
    Variable("XNAI_POOL_LEASE", "30", "seconds a model lease lasts unless renewed (a dead holder's lease expires)"),
    Variable("XNAI_CACHE", "on", "on: deterministic requests are answered from the response cache (off: never)"),
    Variable("XNAI_CACHE_TTL", "86400", "seconds a cached response is kept"),
    Variable(
        "XNAI_CACHE_MAX_MB", "16", "most MiB of cached responses per role (oldest evicted); 4x it must fit in Redis"
    ),
    Variable(
        "XNAI_PROMPT_CACHE_MB",
        "64",
        "MiB of llama.cpp prompt states each LLM process keeps to reuse a repeated prompt prefix; 0: off",
    ),
    Variable("XNAI_BATCH", "off", "on: the curation worker gathers embed/search/classify tasks into encoder batches"),
    Variable("XNAI_BATCH_MAX_SIZE", "32", "most texts in one encoder batch (XNAI_BATCH=on)"),
    Variable("XNAI_BATCH_MAX_WAIT_MS", "10", "most milliseconds a batch waits for more tasks (XNAI_BATCH=on)"),
)

#: XNAI_LLM_SAFE's values.
LLM_SAFE_MODES = ("auto", "on", "off")

#: XNAI_RESERVED_CORES when unset. On a host of this many cores or fewer it leaves no core for the workers and
#: the plan lets the roles share every CPU (xnai_tasks.plan.planner); a larger value that leaves none is refused.
DEFAULT_RESERVED_CORES = 2


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable, validated. Build with :meth:`from_env` or directly in tests."""

    home: Path
    redis_url: str | None = None
    llm_model: Path | None = None
    encoder_model: Path | None = None
    reserved_cores: int = 2
    flower_port: int = 5555
    metrics_port: int = 9808
    visibility_timeout: int = 3600
    task_time_limit: int = 1800
    max_message_age: int = 7200
    log_level: str = "INFO"
    model_mode: str = "auto"
    keep_alive: float = 300.0
    model_ram_mb: int | None = None
    threads: int | None = None
    #: Plan overrides per role (JSON text, checked to be an object of objects): see xnai_tasks.plan.planner.
    plan_overrides: str | None = None
    #: Workflows beat runs (JSON text, checked): see xnai_tasks.workflow.schedule.
    schedule: str | None = None
    llm_safe: str = "auto"
    llm_probe_timeout: int = 120
    max_deliveries: int = 3
    #: Seconds without a heartbeat before a worker counts as dead and its taken messages are restored by a peer.
    dead_after: int = 30
    #: Extra modules of ``ROLE.*`` tasks every app built on these settings imports.
    task_modules: tuple[str, ...] = ()
    llm_probe_runner: str = "xnai_tasks.models.probe_runner"
    redis_maxmemory_mb: int | None = None
    #: The embedded Redis' TLS terminator (xnai_tasks/ops/tls_proxy.py): its port (None: off) and address.
    redis_tls_port: int | None = None
    redis_tls_bind: str = "0.0.0.0"
    #: Days telemetry files are kept (observability/telemetry.py); 0: no telemetry is written.
    telemetry_days: int = 7
    #: Most messages waiting in a role's queue (0: no cap), and per-role overrides: ``(("grok", 64),)``.
    max_queue: int = 512
    queue_caps: tuple[tuple[str, int], ...] = ()
    #: Seconds a submitted message may wait for a worker before it is dropped unrun (its ``expires``).
    task_expires: int = 3600
    #: The circuit breaker and the model pools (xnai_tasks/resilience); times in seconds.
    breaker: bool = True
    breaker_failures: int = 5
    breaker_window: int = 60
    breaker_open: int = 30
    breaker_open_max: int = 600
    llm_slow: int = 120
    #: Leases per role, model and host; None: the role's processes in the plan.
    model_pool: int | None = None
    pool_wait: int = 60
    pool_lease: int = 30
    #: The response cache (xnai_tasks/cache): on or off, seconds an entry lives, MiB per role.
    cache: bool = True
    cache_ttl: int = 86400
    cache_max_mb: int = 16
    #: MiB of prompt states per LLM process (xnai_tasks/models/prompt_cache.py); 0: no prompt cache.
    prompt_cache_mb: int = 64
    #: Dynamic batching of the curation encoder (xnai_tasks/batching): on/off, most texts a batch, most wait (ms).
    batch: bool = False
    batch_max_size: int = 32
    batch_max_wait_ms: int = 10
    #: The copilot's resource checks (xnai_tasks/ops/resources.py): how often, the RAM floor, the preload lead.
    copilot_every_s: int = 60
    min_free_mb: int = 512
    preload_ahead_s: int = 120
    #: The roles this host joined a hub for (``xnai host join``: XNAI_HOME/host.json); empty on any other host.
    joined_roles: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, acting_as: str | None = None) -> Settings:
        """Read and validate every ``XNAI_*`` variable; raise :class:`SettingsError` on the first bad one.

        On a host joined to a hub, with no XNAI_REDIS_URL, the URL is the hub's with the credential of ``acting_as``
        when the host holds it (the role of ``xnai worker ROLE``), else of its first role.
        """
        env = os.environ if env is None else env
        home = _parse_home(env.get("XNAI_HOME") or str(Path.home() / ".xnai"))
        settings = cls(
            home=home,
            redis_url=_optional(env, "XNAI_REDIS_URL", _parse_redis_url),
            llm_model=_optional(env, "XNAI_LLM_MODEL", _parse_path("XNAI_LLM_MODEL")),
            encoder_model=_optional(env, "XNAI_ENCODER_MODEL", _parse_path("XNAI_ENCODER_MODEL")),
            reserved_cores=_int(env, "XNAI_RESERVED_CORES", DEFAULT_RESERVED_CORES, 0, 1024),
            flower_port=_int(env, "XNAI_FLOWER_PORT", 5555, 1, 65535),
            metrics_port=_int(env, "XNAI_METRICS_PORT", 9808, 1, 65535),
            visibility_timeout=_int(env, "XNAI_VISIBILITY_TIMEOUT", 3600, 10, 7 * 24 * 3600),
            task_time_limit=_int(env, "XNAI_TASK_TIME_LIMIT", 1800, 1, 7 * 24 * 3600),
            max_message_age=_int(env, "XNAI_MAX_MESSAGE_AGE", 7200, 10, 30 * 24 * 3600),
            log_level=_choice(env, "XNAI_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            model_mode=_choice(env, "XNAI_MODEL_MODE", "AUTO", ("AUTO", "PRELOAD", "LAZY")).lower(),
            keep_alive=float(_int(env, "XNAI_KEEP_ALIVE", 300, 1, 7 * 24 * 3600)),
            model_ram_mb=_optional(env, "XNAI_MODEL_RAM_MB", _bounded("XNAI_MODEL_RAM_MB", 1, 1 << 24)),
            threads=_optional(env, "XNAI_THREADS", _bounded("XNAI_THREADS", 1, 1024)),
            plan_overrides=_optional(env, "XNAI_PLAN", _parse_plan_overrides),
            schedule=_optional(env, "XNAI_SCHEDULE", _parse_schedule),
            llm_safe=_choice(env, "XNAI_LLM_SAFE", "AUTO", tuple(m.upper() for m in LLM_SAFE_MODES)).lower(),
            llm_probe_timeout=_int(env, "XNAI_LLM_PROBE_TIMEOUT", 120, 5, 3600),
            max_deliveries=_int(env, "XNAI_MAX_DELIVERIES", 3, 1, 100),
            dead_after=_int(env, "XNAI_DEAD_AFTER", 30, 5, 24 * 3600),
            task_modules=_modules(env, "XNAI_TASK_MODULES"),
            llm_probe_runner=(_modules(env, "XNAI_LLM_PROBE_RUNNER") or ("xnai_tasks.models.probe_runner",))[0],
            redis_maxmemory_mb=_optional(
                env, "XNAI_REDIS_MAXMEMORY_MB", _bounded("XNAI_REDIS_MAXMEMORY_MB", 32, 1 << 20)
            ),
            redis_tls_port=_optional(env, "XNAI_REDIS_TLS_PORT", _bounded("XNAI_REDIS_TLS_PORT", 1, 65535)),
            redis_tls_bind=_parse_bind(env.get("XNAI_REDIS_TLS_BIND", "").strip() or "0.0.0.0"),
            telemetry_days=_int(env, "XNAI_TELEMETRY_DAYS", 7, 0, 3650),
            max_queue=_int(env, "XNAI_MAX_QUEUE", 512, 0, MAX_QUEUE_LIMIT),
            queue_caps=_queue_caps(env),
            task_expires=_int(env, "XNAI_TASK_EXPIRES", 3600, 1, 30 * 24 * 3600),
            breaker=_choice(env, "XNAI_BREAKER", "ON", ("ON", "OFF")) == "ON",
            breaker_failures=_int(env, "XNAI_BREAKER_FAILURES", 5, 1, 10_000),
            breaker_window=_int(env, "XNAI_BREAKER_WINDOW", 60, 1, 24 * 3600),
            breaker_open=_int(env, "XNAI_BREAKER_OPEN", 30, 1, 24 * 3600),
            breaker_open_max=_int(env, "XNAI_BREAKER_OPEN_MAX", 600, 1, 7 * 24 * 3600),
            llm_slow=_int(env, "XNAI_LLM_SLOW", 120, 1, 24 * 3600),
            model_pool=_optional(env, "XNAI_MODEL_POOL", _bounded("XNAI_MODEL_POOL", 1, 1024)),
            pool_wait=_int(env, "XNAI_POOL_WAIT", 60, 0, 24 * 3600),
            pool_lease=_int(env, "XNAI_POOL_LEASE", 30, 1, 3600),
            cache=_choice(env, "XNAI_CACHE", "ON", ("ON", "OFF")) == "ON",
            cache_ttl=_int(env, "XNAI_CACHE_TTL", 86400, 1, 30 * 24 * 3600),
            cache_max_mb=_int(env, "XNAI_CACHE_MAX_MB", 16, 1, 1 << 20),
            prompt_cache_mb=_int(env, "XNAI_PROMPT_CACHE_MB", 64, 0, MAX_PROMPT_CACHE_MB),
            batch=_choice(env, "XNAI_BATCH", "OFF", ("ON", "OFF")) == "ON",
            batch_max_size=_int(env, "XNAI_BATCH_MAX_SIZE", 32, 1, 1024),
            batch_max_wait_ms=_int(env, "XNAI_BATCH_MAX_WAIT_MS", 10, 0, 1000),
            copilot_every_s=_int(env, "XNAI_COPILOT_EVERY_S", 60, 5, 3600),
            min_free_mb=_int(env, "XNAI_MIN_FREE_MB", 512, 0, 1 << 24),
            preload_ahead_s=_int(env, "XNAI_PRELOAD_AHEAD_S", 120, 0, 24 * 3600),
        )
        if settings.breaker_open_max < settings.breaker_open:
            raise SettingsError(
                f"XNAI_BREAKER_OPEN_MAX={settings.breaker_open_max} must be at least "
                f"XNAI_BREAKER_OPEN={settings.breaker_open}"
            )
        if settings.visibility_timeout <= settings.task_time_limit:
            raise SettingsError(
                f"XNAI_VISIBILITY_TIMEOUT={settings.visibility_timeout} must be above "
                f"XNAI_TASK_TIME_LIMIT={settings.task_time_limit}, or long tasks are delivered twice"
            )
        if settings.max_message_age <= settings.visibility_timeout:
            raise SettingsError(
                f"XNAI_MAX_MESSAGE_AGE={settings.max_message_age} must be above "
                f"XNAI_VISIBILITY_TIMEOUT={settings.visibility_timeout}, or redelivered tasks are refused as expired"
            )
        _check_fits_host(settings)
        return _joined(settings, acting_as) if settings.redis_url is None else settings

    def to_env(self) -> dict[str, str]:
        """These settings as ``XNAI_*`` variables, for a child process that must see the same ones."""
        env = {
            "XNAI_HOME": str(self.home),
            "XNAI_RESERVED_CORES": str(self.reserved_cores),
            "XNAI_FLOWER_PORT": str(self.flower_port),
            "XNAI_METRICS_PORT": str(self.metrics_port),
            "XNAI_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "XNAI_TASK_TIME_LIMIT": str(self.task_time_limit),
            "XNAI_MAX_MESSAGE_AGE": str(self.max_message_age),
            "XNAI_LOG_LEVEL": self.log_level,
            "XNAI_MODEL_MODE": self.model_mode,
            "XNAI_KEEP_ALIVE": str(int(self.keep_alive)),
            "XNAI_LLM_SAFE": self.llm_safe,
            "XNAI_LLM_PROBE_TIMEOUT": str(self.llm_probe_timeout),
            "XNAI_MAX_DELIVERIES": str(self.max_deliveries),
            "XNAI_DEAD_AFTER": str(self.dead_after),
            "XNAI_LLM_PROBE_RUNNER": self.llm_probe_runner,
            "XNAI_TELEMETRY_DAYS": str(self.telemetry_days),
            "XNAI_MAX_QUEUE": str(self.max_queue),
            "XNAI_TASK_EXPIRES": str(self.task_expires),
            **{f"XNAI_MAX_QUEUE_{role.upper()}": str(cap) for role, cap in self.queue_caps},
            "XNAI_BREAKER": "on" if self.breaker else "off",
            "XNAI_BREAKER_FAILURES": str(self.breaker_failures),
            "XNAI_BREAKER_WINDOW": str(self.breaker_window),
            "XNAI_BREAKER_OPEN": str(self.breaker_open),
            "XNAI_BREAKER_OPEN_MAX": str(self.breaker_open_max),
            "XNAI_LLM_SLOW": str(self.llm_slow),
            "XNAI_POOL_WAIT": str(self.pool_wait),
            "XNAI_POOL_LEASE": str(self.pool_lease),
            "XNAI_CACHE": "on" if self.cache else "off",
            "XNAI_CACHE_TTL": str(self.cache_ttl),
            "XNAI_CACHE_MAX_MB": str(self.cache_max_mb),
            "XNAI_PROMPT_CACHE_MB": str(self.prompt_cache_mb),
            "XNAI_BATCH": "on" if self.batch else "off",
            "XNAI_BATCH_MAX_SIZE": str(self.batch_max_size),
            "XNAI_BATCH_MAX_WAIT_MS": str(self.batch_max_wait_ms),
            "XNAI_COPILOT_EVERY_S": str(self.copilot_every_s),
            "XNAI_MIN_FREE_MB": str(self.min_free_mb),
            "XNAI_PRELOAD_AHEAD_S": str(self.preload_ahead_s),
            "XNAI_REDIS_TLS_BIND": self.redis_tls_bind,
        }
        if self.task_modules:
            env["XNAI_TASK_MODULES"] = ",".join(self.task_modules)
        optional = {
            # a joined host's children read host.json for their own role's credential
            "XNAI_REDIS_URL": None if self.joined_roles else self.redis_url,
            "XNAI_REDIS_MAXMEMORY_MB": None if self.redis_maxmemory_mb is None else str(self.redis_maxmemory_mb),
            "XNAI_LLM_MODEL": self.llm_model,
            "XNAI_ENCODER_MODEL": self.encoder_model,
            "XNAI_MODEL_RAM_MB": self.model_ram_mb,
            "XNAI_THREADS": self.threads,
            "XNAI_PLAN": self.plan_overrides,
            "XNAI_SCHEDULE": self.schedule,
            "XNAI_MODEL_POOL": self.model_pool,
            "XNAI_REDIS_TLS_PORT": self.redis_tls_port,
        }
        env.update({name: str(value) for name, value in optional.items() if value is not None})
        return env

    def queue_cap(self, role: str) -> int:
        """The most messages ``role``'s queue may hold (0: no cap): its own override, else XNAI_MAX_QUEUE."""
        return dict(self.queue_caps).get(role, self.max_queue)

    @property
    def default_agent(self) -> str:
        """The agent a producer on this host signs as: the copilot, or on a host joined to a hub the role whose
        credential it connects with (it holds no other private key)."""
        if self.joined_roles and self.redis_url is not None:
            return urlsplit(self.redis_url).username or self.joined_roles[0]
        return "copilot"

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
    def metrics_dir(self) -> Path:
        """prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``) of this home's processes."""
        return self.home / c.METRICS_DIR

    @property
    def telemetry_dir(self) -> Path:
        return self.home / c.TELEMETRY_DIR

    @property
    def broker_url(self) -> str:
        """The URL Celery and the client connect with."""
        if self.redis_url is not None:
            from xnai_tasks.security.tls import with_tls_files

            return with_tls_files(self.redis_url, self.home)  # rediss://: this home's CA and client certificate
        return f"redis+socket://{self.redis_socket}"

    @property
    def soft_time_limit(self) -> int:
        return max(1, int(self.task_time_limit * 0.9))

    @property
    def plan_override_map(self) -> dict[str, dict[str, Any]]:
        """XNAI_PLAN as a dict (role -> overridden plan fields); empty when unset."""
        if self.plan_overrides is None:
            return {}
        import json

        data: dict[str, dict[str, Any]] = json.loads(self.plan_overrides)
        return data


class _ProcessSettings:
    """The settings of this process: read from the environment once, on first use, then shared."""

    def __init__(self) -> None:
        self.value: Settings | None = None

    def get(self, acting_as: str | None = None) -> Settings:
        # A forked child inherits them with the parent's environment; a fresh interpreter reads its own.
        if self.value is None:
            self.value = Settings.from_env(acting_as=acting_as)
        return self.value


_process = _ProcessSettings()


def process_settings(acting_as: str | None = None) -> Settings:
    """This process's settings, read from the environment the first time they are asked for (``acting_as``: the
    role whose credential a host joined to a hub connects with, see :meth:`Settings.from_env`)."""
    return _process.get(acting_as)


def _joined(settings: Settings, acting_as: str | None) -> Settings:
    """On a host joined to a hub (XNAI_HOME/host.json), the hub's URL carrying the acting role's credential."""
    from dataclasses import replace

    from xnai_tasks.security.joined_host import read_joined

    joined = read_joined(settings.home)
    if joined is None:
        return settings
    role = acting_as if acting_as in joined.roles else joined.roles[0]
    return replace(settings, redis_url=joined.url(role), joined_roles=joined.roles)


def _check_fits_host(settings: Settings) -> None:
    """Refuse values legal on some host but not on this one, naming what this host has."""
    if settings.reserved_cores > DEFAULT_RESERVED_CORES:
        cores = host_cores()
        if settings.reserved_cores >= cores:
            raise SettingsError(
                f"XNAI_RESERVED_CORES={settings.reserved_cores} leaves no core for the workers: "
                f"this host has {cores} core{'s' if cores > 1 else ''}"
            )
    if settings.redis_maxmemory_mb is not None:
        import psutil

        ram_mb = int(psutil.virtual_memory().total) // (1024 * 1024)
        if settings.redis_maxmemory_mb > ram_mb:
            raise SettingsError(
                f"XNAI_REDIS_MAXMEMORY_MB={settings.redis_maxmemory_mb} is more than this host's RAM ({ram_mb} MiB)"
            )


def host_cores() -> int:
    """Cores this process may use, counted as the plan counts them: physical cores, within the affinity mask."""
    import psutil

    cpus = len(os.sched_getaffinity(0))
    return max(1, min(psutil.cpu_count(logical=False) or cpus, cpus))


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


def _bounded(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        return _int({name: raw}, name, low, low, high)

    return parse


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


#: The largest prompt cache accepted, MiB (more is a typo: it is per process, beside the model).
MAX_PROMPT_CACHE_MB = 16_384
#: The largest queue cap accepted (a bigger one is a typo: the embedded Redis' memory would run out first).
MAX_QUEUE_LIMIT = 1_000_000


def _queue_caps(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """``XNAI_MAX_QUEUE_ROLE`` overrides, validated, per role."""
    caps = []
    for role in c.ROLES:
        name = f"XNAI_MAX_QUEUE_{role.upper()}"
        if env.get(name, "").strip():
            caps.append((role, _int(env, name, 0, 0, MAX_QUEUE_LIMIT)))
    return tuple(caps)


def _modules(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of dotted Python module names."""
    names = tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())
    for module in names:
        if not _MODULE_NAME.fullmatch(module):
            raise SettingsError(f"{name}={module!r} is not a Python module name")
    return names


def _parse_schedule(raw: str) -> str:
    """XNAI_SCHEDULE: checked by the workflow package, in canonical form."""
    from xnai_tasks.workflow.schedule import parse_schedule

    return parse_schedule(raw)


def _parse_plan_overrides(raw: str) -> str:
    """XNAI_PLAN: a JSON object mapping roles to objects of plan fields; returned in canonical form."""
    import json

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"XNAI_PLAN is not valid JSON: {exc}") from None
    fields = ("processes", "threads_per_process", "cpus", "model_mode", "ram_share_bytes")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SettingsError('XNAI_PLAN must be a JSON object of objects, e.g. {"grok": {"processes": 2}}')
    for role, override in data.items():
        if role not in c.ROLES:
            raise SettingsError(f"XNAI_PLAN names an unknown role {role!r} (roles: {', '.join(c.ROLES)})")
        unknown = sorted(set(override) - set(fields))
        if unknown:
            raise SettingsError(f"XNAI_PLAN.{role} has unknown fields {unknown} (fields: {', '.join(fields)})")
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


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
    if parts.scheme not in c.REDIS_SCHEMES:
        raise SettingsError(f"XNAI_REDIS_URL={raw!r} must start with one of {', '.join(c.REDIS_SCHEMES)}://")
    if parts.scheme in ("redis+socket", "unix"):
        if not parts.path:
            raise SettingsError(f"XNAI_REDIS_URL={raw!r} names no socket path")
    elif not parts.hostname:
        raise SettingsError(f"XNAI_REDIS_URL={raw!r} names no host")
    elif port is not None and port == 0:
        raise SettingsError(f"XNAI_REDIS_URL={raw!r} has port 0")
    return raw


def _parse_bind(raw: str) -> str:
    """XNAI_REDIS_TLS_BIND: an IP address (or a host name, resolved when the terminator starts)."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", raw):
        raise SettingsError(f"XNAI_REDIS_TLS_BIND={raw!r} is neither an IP address nor a host name")
    return raw


def _parse_path(name: str) -> Callable[[str], Path]:
    def parse(raw: str) -> Path:
        path = Path(raw).expanduser()
        if not path.exists():
            raise SettingsError(f"{name}={raw!r} does not exist")
        return path.resolve()

    return parse

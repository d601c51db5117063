"""A dead worker's taken messages go back to its queue within ``XNAI_DEAD_AFTER`` seconds, not the visibility timeout.

With ``task_acks_late`` a message a worker has taken sits in its role's unacked hash until it is acknowledged.
A worker that vanishes without a clean stop (power loss, a network cut, SIGKILL of every process) leaves it
there, and kombu would put it back only after the visibility timeout (an hour). Here:

* Each role worker is an *instance* (its node name and a token of its start, ``curation@a#1f2e3d``). It records
  every delivery tag it takes in a set of its own (``xnai:held:ROLE:INSTANCE``, in the same transaction as
  kombu's unacked entry; :class:`xnai_tasks.resilience.reconnect.KeepingQoS`) and settles it there with its ack,
  reject or restore, in one script that does nothing when the tag is no longer its own.
* Its parent process beats (:class:`Heartbeat`, a thread): ``ZADD xnai:alive:ROLE INSTANCE <Redis time>`` every
  few seconds, whatever its pool children are running.
* On each beat it looks for instances of its role silent for ``XNAI_DEAD_AFTER`` seconds and gives their
  messages back (:func:`restore_dead`): one Lua script moves each held tag's unacked entry to the front of the
  queue, marked redelivered as kombu's restore does, unless the instance beat again meanwhile or a live instance
  holds that tag now; it fences the instance (``xnai:fenced:ROLE:INSTANCE``: the task ids taken from it) and
  forgets its heartbeat. A restarted worker is a new instance, so its predecessor's messages come back too.
* kombu's sweep of messages unacked past the visibility timeout asks the same (:func:`restore_swept`): a message
  an instance holds that still beats stays its own (a long task is not delivered twice); one put back leaves every
  held set and is fenced from each silent instance that held it.

A fenced instance that was only paused (SIGSTOP, a long stall, a network cut) and comes back is harmless: its
settling script finds the tags gone and leaves the unacked entries alone (a peer holds them now under the same
tags); its stale results are refused by the store script (:mod:`xnai_tasks.security.result_store`); and a copy
of a task it did finish before it was declared dead is refused by the replay ledger (its nonce is done). Its next
beat registers it again, and its new deliveries are its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import redis
from kombu.utils.json import dumps, loads

from xnai_tasks.core import constants as c
from xnai_tasks.observability.deaths import push_death

log = logging.getLogger(__name__)

#: Most seconds between two heartbeats (a fifth of XNAI_DEAD_AFTER when that is shorter, at least one).
MAX_BEAT_S: Final = 5.0
#: Most seconds the heartbeat waits for one Redis reply (a third of XNAI_DEAD_AFTER when that is shorter).
MAX_REPLY_S: Final = 5.0
#: A fence is kept this many times the maximum message age: no copy of a fenced task can run for longer.
FENCE_AGES: Final = 2

#: KEYS: the role's alive set, this instance's fence. ARGV: the instance. Returns {1 if it was registered, the
#: number of task ids fenced from it}.
BEAT_SCRIPT: Final = """
local t = redis.call('TIME')
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], t[1] + t[2] / 1000000, ARGV[1])
local fenced = 0
if redis.call('EXISTS', KEYS[2]) == 1 then fenced = #redis.call('SMEMBERS', KEYS[2]) end
if before then return {1, fenced} end
return {0, fenced}
"""

#: KEYS: this instance's held set, the unacked index, the unacked hash. ARGV: the delivery tag.
#: Removes the tag's unacked entry only while the tag is this instance's own; returns 1 then, else 0.
SETTLE_SCRIPT: Final = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 1
end
return 0
"""

#: KEYS: alive set, the dead instance's held set, unacked hash, unacked index, its fence, then the queue lists.
#: ARGV: instance, dead after (s), fence ttl (s), held key prefix, entry count, then per entry: tag, the unacked
#: entry as read, index of its queue list in KEYS (0: only forget the tag), the item to push, its task id.
#: Returns {restored, skipped, silent seconds as text, the restored tags...}; {-1} when the instance is not
#: registered (a peer restored it first), {-2} when it beat within ``dead after`` (alive: untouched).
RESTORE_SCRIPT: Final = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seen then return {-1} end
local silent = now - tonumber(seen)
if silent < tonumber(ARGV[2]) then return {-2} end
local others = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if member ~= ARGV[1] then others[#others + 1] = ARGV[4] .. member end
end
local restored, skipped, tags = 0, 0, {}
for i = 0, tonumber(ARGV[5]) - 1 do
  local at = 6 + i * 5
  local tag, expected, list = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  local elsewhere = false
  for _, held in ipairs(others) do
    if redis.call('SISMEMBER', held, tag) == 1 then elsewhere = true end
  end
  if list > 0 and not elsewhere and redis.call('HGET', KEYS[3], tag) == expected then
    redis.call('HDEL', KEYS[3], tag)
    redis.call('ZREM', KEYS[4], tag)
    redis.call('RPUSH', KEYS[list], ARGV[at + 3])
    redis.call('SADD', KEYS[5], ARGV[at + 4])
    restored = restored + 1
    tags[#tags + 1] = tag
  else
    skipped = skipped + 1
  end
  redis.call('SREM', KEYS[2], tag)
end
if restored > 0 then redis.call('EXPIRE', KEYS[5], ARGV[3]) end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
local out = {restored, skipped, tostring(silent)}
for _, tag in ipairs(tags) do out[#out + 1] = tag end
return out
"""

#: KEYS: the alive set, unacked hash, unacked index, the queue list. ARGV: tag, the unacked entry as read, the item
#: to push ('' : only forget the tag), its task id, dead after (s), fence ttl (s), held key prefix, fenced key prefix.
#: kombu's visibility sweep's restore of one tag: -1 (untouched) when an instance that beat within ``dead after``
#: holds it, 0 when its entry changed meanwhile; else 1: the message is back in front of the queue, the tag is in no
#: held set any more and its task id in the fence of each (silent) instance that held it.
SWEEP_SCRIPT: Final = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local holders = {}
for i = 1, #members, 2 do
  if redis.call('SISMEMBER', ARGV[7] .. members[i], ARGV[1]) == 1 then
    if now - tonumber(members[i + 1]) < tonumber(ARGV[5]) then return -1 end
    holders[#holders + 1] = members[i]
  end
end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[4], ARGV[3]) end
for _, holder in ipairs(holders) do
  redis.call('SREM', ARGV[7] .. holder, ARGV[1])
  if ARGV[4] ~= '' then
    redis.call('SADD', ARGV[8] .. holder, ARGV[4])
    redis.call('EXPIRE', ARGV[8] .. holder, ARGV[6])
  end
end
return 1
"""


@dataclass(frozen=True)
class Instance:
    """One start of a role worker: its role, node name and the token that tells it from an earlier start."""

    role: str
    node: str
    token: str

    @property
    def name(self) -> str:
        return f"{self.node}#{self.token}"

    @property
    def held_key(self) -> str:
        return c.held_key(self.role, self.name)

    @property
    def fenced_key(self) -> str:
        return c.fenced_key(self.role, self.name)


class _This:
    """The instance this worker process is (pool children inherit it), and its heartbeat."""

    def __init__(self) -> None:
        self.instance: Instance | None = None
        self.heartbeat: Heartbeat | None = None


_this = _This()


def register(role: str, node: str) -> Instance:
    """Make this worker process an instance of ``role`` (the worker parent, before its pool forks)."""
    _this.instance = Instance(role, node, secrets.token_hex(3))
    return _this.instance


def this_instance() -> Instance | None:
    """The instance this worker process belongs to (None outside a role worker)."""
    return _this.instance


def fence_ttl_s(max_message_age_s: int) -> int:
    """How long a fence keeps a task id: :data:`FENCE_AGES` times the oldest a message may be."""
    return FENCE_AGES * max_message_age_s


def instance_node(name: str) -> str:
    """The node name of an instance name (``curation@a#1f2e3d`` -> ``curation@a``)."""
    return name.rsplit("#", 1)[0]


def own_fence() -> str | None:
    """The fence checked before this worker stores any result (None outside a role worker).

    It holds only ids of tasks taken from this instance, so it is checked whoever stores: the pool child that ran
    the task, or the parent (a time limit hit, a lost pool process, a revoke that terminates).
    """
    instance = _this.instance
    return None if instance is None else instance.fenced_key


def beat_every_s(dead_after_s: float) -> float:
    """Seconds between two heartbeats: several beats fit in ``dead_after_s``."""
    return max(1.0, min(MAX_BEAT_S, dead_after_s / 5))


def reply_timeout_s(dead_after_s: float) -> float:
    """Seconds the heartbeat waits for one Redis reply: a slow reply (and its one retry) must not outlast
    ``dead_after_s``, or a healthy worker is declared dead."""
    return min(MAX_REPLY_S, dead_after_s / 3)


def restored_item(role: str, raw: Any) -> tuple[str, str, str] | None:
    """(queue list, item, task id) of an unacked entry, as kombu's restore would push it (marked redelivered).

    A role's workers consume only the role's own queue, so that is where the message goes back; the list is the
    one of its priority, as kombu picks it. None for an entry that is not kombu's ``[message, exchange, key]``.
    """
    try:
        payload = loads(raw)[0]
        headers = payload["headers"]
        properties = payload["properties"]
        headers["redelivered"] = True
        properties.setdefault("delivery_info", {})["redelivered"] = True
        task_id = str(headers.get("id", ""))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    try:
        priority = max(0, min(int(properties.get("priority") or 0), 9))
    except (TypeError, ValueError):
        priority = 0
    step = max(s for s in c.KOMBU_PRIORITY_STEPS if s <= priority)
    lists = c.queue_keys(c.queue_for(role))
    return lists[c.KOMBU_PRIORITY_STEPS.index(step)], dumps(payload), task_id


#: The cause ``xnai status`` gives a message taken back from a silent worker (``worker deaths of ROLE ...``).
SILENT_CAUSE: Final = "worker silent, its messages given back"


@dataclass(frozen=True)
class Restored:
    """What one restore of a dead instance did: messages put back, tags only forgotten, seconds it was silent."""

    instance: str
    restored: int
    skipped: int
    silent_s: float
    #: The task name of each message put back.
    tasks: tuple[str, ...]


def restore_dead(
    conn: redis.Redis, role: str, instance: str, *, dead_after_s: int, fence_ttl_s: int
) -> Restored | None:
    """Give back every message the silent ``instance`` held; None when it beat again or a peer did it first."""
    held = c.held_key(role, instance)
    tags = sorted(_text(t) for t in conn.smembers(held))
    pipe = conn.pipeline(transaction=False)
    for tag in tags:
        pipe.hget(c.unacked_key(role), tag)
    raws = pipe.execute() if tags else []
    lists = c.queue_keys(c.queue_for(role))
    args: list[Any] = []
    tasks: dict[str, str] = {}
    for tag, raw in zip(tags, raws, strict=True):
        item = restored_item(role, raw) if raw is not None else None
        if item is None:  # gone already (settled meanwhile), or not kombu's: only forgotten here
            args += [tag, "", 0, "", ""]
            continue
        queue_list, body, task_id = item
        args += [tag, raw, 6 + lists.index(queue_list), body, task_id]
        tasks[tag] = _task_name(raw)
    keys = [
        c.alive_key(role),
        held,
        c.unacked_key(role),
        c.unacked_index_key(role),
        c.fenced_key(role, instance),
        *lists,
    ]
    script = conn.register_script(RESTORE_SCRIPT)
    reply = script(keys=keys, args=[instance, dead_after_s, fence_ttl_s, c.held_key(role, ""), len(tags), *args])
    if int(reply[0]) < 0:
        return None
    restored = tuple(tasks.get(_text(tag), "") for tag in reply[3:])
    return Restored(instance, int(reply[0]), int(reply[1]), float(_text(reply[2])), restored)


def restore_swept(conn: redis.Redis, role: str, tag: str, *, dead_after_s: int, fence_ttl_s: int) -> int:
    """kombu's visibility sweep restores ``tag`` (unacked past the visibility timeout) only if no live instance holds
    it: :data:`SWEEP_SCRIPT`'s answer (1 restored, 0 changed meanwhile, -1 held by a live instance)."""
    raw = conn.hget(c.unacked_key(role), tag)
    if raw is None:
        return 0
    lists = c.queue_keys(c.queue_for(role))
    queue_list, item, task_id = restored_item(role, raw) or (lists[0], "", "")
    keys = [c.alive_key(role), c.unacked_key(role), c.unacked_index_key(role), queue_list]
    args = [tag, raw, item, task_id, dead_after_s, fence_ttl_s, c.held_key(role, ""), c.fenced_key(role, "")]
    return int(conn.register_script(SWEEP_SCRIPT)(keys=keys, args=args))


def liveness() -> tuple[int, int]:
    """(dead after, fence ttl) in seconds of this worker's heartbeat (from the settings before it starts)."""
    if _this.heartbeat is not None:
        return _this.heartbeat.dead_after_s, _this.heartbeat.fence_ttl_s
    from xnai_tasks.settings import process_settings

    settings = process_settings()
    return settings.dead_after, fence_ttl_s(settings.max_message_age)


class Heartbeat:
    """The worker parent's thread: beats for its instance and gives back the messages of silent peers."""

    def __init__(
        self,
        instance: Instance,
        connect: Callable[[], redis.Redis],
        *,
        dead_after_s: int,
        fence_ttl_s: int,
        on_restored: Callable[[Restored], None] | None = None,
    ) -> None:
        self.instance = instance
        self._connect = connect
        self._conn: redis.Redis | None = None
        self.dead_after_s = dead_after_s
        self.fence_ttl_s = fence_ttl_s
        self.every_s = beat_every_s(dead_after_s)
        self._on_restored = on_restored
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._beaten = False
        self._fenced = 0
        self._failing = False

    def start(self) -> None:
        """Beat once now (before any message is taken), then from a daemon thread."""
        self.tick()
        self._thread = threading.Thread(target=self._run, name="xnai-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop beating; a clean stop that holds nothing leaves the alive set at once (peers have nothing to do)."""
        if os.getpid() != self._pid or self._stop.is_set():
            return
        self._stop.set()
        try:
            conn = self._redis()
            if not conn.exists(self.instance.held_key):
                conn.zrem(c.alive_key(self.instance.role), self.instance.name)
        except (redis.RedisError, OSError):
            pass  # peers find it silent and have nothing to restore

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.tick()

    def tick(self) -> None:
        """One beat, then one look for silent peers; a failure is logged and tried again next time."""
        try:
            self.beat()
            self.check_peers()
            self._failing = False
        except (redis.RedisError, OSError) as exc:
            self._conn = None
            # one line an outage (Celery says when the broker is back); peers that can reach Redis meanwhile may
            # declare this worker dead once it lasts XNAI_DEAD_AFTER, and fence it
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            log.log(level, "heartbeat of %s failed, tried again every %g s: %s", self.instance.name, self.every_s, exc)
        except Exception:  # the thread must outlive any surprise: a worker without a heartbeat is declared dead
            log.exception("heartbeat of %s failed", self.instance.name)

    def beat(self) -> None:
        role, name = self.instance.role, self.instance.name
        conn = self._redis()
        registered, fenced = conn.register_script(BEAT_SCRIPT)(
            keys=[c.alive_key(role), self.instance.fenced_key], args=[name]
        )
        if self._beaten and (not int(registered) or int(fenced) > self._fenced):
            log.warning(
                "this worker (%s) was declared dead by a peer while it was silent: registered again; "
                "%d task(s) taken from it were given to other workers and it will store no result of them",
                self.instance.node,
                int(fenced),
                extra={"event": "worker_fenced", "role": role, "instance": name, "fenced": int(fenced)},
            )
        self._beaten, self._fenced = True, int(fenced)

    def check_peers(self) -> None:
        conn = self._redis()
        seconds, micros = conn.time()
        deadline = seconds + micros / 1e6 - self.dead_after_s
        silent = conn.zrangebyscore(c.alive_key(self.instance.role), "-inf", deadline)
        for member in (_text(m) for m in silent):
            if member == self.instance.name:
                continue
            done = restore_dead(
                conn, self.instance.role, member, dead_after_s=self.dead_after_s, fence_ttl_s=self.fence_ttl_s
            )
            if done is not None:
                self._report(done)

    def _report(self, done: Restored) -> None:
        if done.restored:
            log.warning(
                "restored %d message(s) of dead worker %s (no heartbeat for %d s)",
                done.restored,
                instance_node(done.instance),
                round(done.silent_s),
                extra={
                    "event": "dead_worker_restored",
                    "role": self.instance.role,
                    "instance": done.instance,
                    "restored": done.restored,
                    "skipped": done.skipped,
                },
            )
            self._record_deaths(done)
        else:
            log.info("dead worker %s held nothing to restore", done.instance)
        if self._on_restored is not None:
            self._on_restored(done)

    def _record_deaths(self, done: Restored) -> None:
        """One event per message given back, in the role's list of worker deaths that ``xnai status`` shows."""
        now = time.time()
        pipe = self._redis().pipeline(transaction=False)
        for task in done.tasks:
            push_death(pipe, self.instance.role, task=task, ident=done.instance, cause=SILENT_CAUSE, ts=now)
        pipe.execute()

    def _redis(self) -> redis.Redis:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn


def start_heartbeat(instance: Instance, redis_url: str, *, dead_after_s: int, max_message_age_s: int) -> Heartbeat:
    """This worker's heartbeat, started once (the worker parent, when its consumer first connects)."""
    if _this.heartbeat is not None and _this.heartbeat.instance == instance:
        return _this.heartbeat
    from xnai_tasks.core import broker
    from xnai_tasks.observability.metrics import count_worker_lost

    def count(done: Restored) -> None:
        for task in done.tasks:
            count_worker_lost(task, None)

    heartbeat = Heartbeat(
        instance,
        lambda: broker.connect(redis_url, timeout=reply_timeout_s(dead_after_s), retries=1),
        dead_after_s=dead_after_s,
        fence_ttl_s=fence_ttl_s(max_message_age_s),
        on_restored=count,
    )
    _this.heartbeat = heartbeat
    heartbeat.start()
    return heartbeat


def _task_name(raw: Any) -> str:
    try:
        return str(loads(raw)[0]["headers"]["task"])
    except (ValueError, TypeError, KeyError, IndexError):
        return ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""The memory guard: the embedded Redis has a memory cap, and no role may take all of it.

Redis has no per-user quota, and a Lua script runs with its caller's ACL, so nothing inside Redis can
stop a role that writes what its ACL allows (its results, nonces, dead letters, its own queue, the
bank) until every write of every user fails at ``maxmemory``. The guard, run by ``xnai up`` as the
admin user, watches from outside: every :data:`POLL_S` it reads ``INFO memory``; once Redis holds more
than :data:`PRESSURE` of its cap it finds out whose keys hold the memory, and locks out a worker role
that holds more than :data:`ROLE_QUOTA` of the cap (``ACL SETUSER ROLE off`` and its connections
killed): its queue waits, nothing is deleted, everyone else goes on writing in the room left.

Knowing whose a key is rests on names: every key a role may write carries the role's name (its result
namespace, its nonces, dead letters, unacked hash, queue), so a key's owner is exact, except for a role's
queue, which the copilot fills too: there the guard checks a sample of the messages, and a queue holding
anything the copilot did not sign (or replays, or copies) counts as the role's.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import redis
from kombu.utils.encoding import bytes_to_str

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.message_signature import verify_message
from xnai_tasks.settings import Settings

log = logging.getLogger(__name__)

#: How often Redis' memory is read (INFO memory costs Redis microseconds).
POLL_S: Final = 0.05
#: Share of maxmemory above which the guard looks for the holder.
PRESSURE: Final = 0.5
#: Share of maxmemory a worker role may hold once Redis is under pressure.
ROLE_QUOTA: Final = 0.25
#: Keys drawn at random (RANDOMKEY) to estimate who holds a keyspace of many small keys.
SAMPLE_KEYS: Final = 400
#: Longest a full pass over the keyspace (when sampling cannot tell) may take.
SCAN_BUDGET_S: Final = 3.0
#: Messages of a queue checked to tell a copilot backlog from a role's flood (each may be megabytes).
QUEUE_SAMPLE: Final = 8
#: Pressure nobody could be blamed for is looked at again after CALM_S, or at once when Redis grows by
#: REGROWTH of its cap (a flood grows it fast; a backlog slowly).
CALM_S: Final = 2.0
REGROWTH: Final = 0.02
#: A line about pressure nobody can be blamed for is said at most this often.
QUIET_S: Final = 60.0

#: Owners that are not a role: the control plane's shared keys, and anything else (the admin's).
CONTROL: Final = "control"
OTHER: Final = "other"


def owner_of(key: str) -> str:
    """Whose a key is, by its name: a role, ``queue:ROLE`` (the copilot's or the role's), control or other."""
    if key.startswith(c.RESULT_KEY_PREFIX):
        role = key[len(c.RESULT_KEY_PREFIX) :].split("-", 1)[0]
        return role if role in c.ROLES else OTHER
    if key.startswith(c.GROUP_KEY_PREFIX):
        return "copilot"
    if key.startswith(c.BANK_PREFIX):
        return "curation"
    if key.startswith(c.XNAI_KEY_PREFIX):  # xnai:KIND:ROLE[:...]
        parts = key.split(":")
        return parts[2] if len(parts) > 2 and parts[2] in c.ROLES else OTHER
    for role in c.ROLES:
        if key in (c.unacked_key(role), c.unacked_index_key(role), c.unacked_mutex_key(role)):
            return role
        if key in c.queue_keys(c.queue_for(role)):
            return f"queue:{role}"
        if key.startswith(f"{role}@") or key == f"{c.KOMBU_BINDING_PREFIX}{role}":
            return role
    if key.startswith(("_kombu.", "celeryev.", "celery@")) or ".reply.celery.pidbox" in key:
        return CONTROL
    return OTHER


@dataclass
class Holdings:
    """Estimated bytes per owner, and the control keys seen holding much."""

    bytes_by_owner: dict[str, float] = field(default_factory=dict)
    big_control_keys: list[str] = field(default_factory=list)

    def add(self, owner: str, size: float) -> None:
        self.bytes_by_owner[owner] = self.bytes_by_owner.get(owner, 0.0) + size

    def top(self) -> tuple[str, float]:
        if not self.bytes_by_owner:
            return OTHER, 0.0
        owner = max(self.bytes_by_owner, key=lambda o: self.bytes_by_owner[o])
        return owner, self.bytes_by_owner[owner]


@dataclass(frozen=True, kw_only=True)
class Lock:
    """A role the guard locked out, and why (kept in :func:`xnai_tasks.core.constants.guard_locks_key`)."""

    role: str
    held_bytes: int
    maxmemory: int
    at: float

    def reason(self) -> str:
        share = 100 * self.held_bytes / self.maxmemory if self.maxmemory else 0
        return (
            f"{self.role} held ~{self.held_bytes / 2**20:.0f} MiB of Redis ({share:.0f}% of maxmemory "
            f"{self.maxmemory / 2**20:.0f} MiB; a role may hold {ROLE_QUOTA:.0%} under pressure)"
        )


class MemoryGuard:
    """Watches Redis' memory as the admin user and locks out a worker role that would fill it."""

    def __init__(
        self, admin: redis.Redis, keyring: Keyring, *, max_message_age: int, say: Callable[[str], None] = print
    ) -> None:
        self.admin = admin
        self.keyring = keyring
        self.max_message_age = max_message_age
        self.say = say
        self._quiet_until = 0.0
        self._calm_until = 0.0
        self._calm_used = 0

    def run_forever(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Check every :data:`POLL_S` until ``should_stop``; a Redis error is said and retried.

        After an error the locks are applied again: Redis may have been restarted (``xnai up`` does when it dies),
        which reloads the ACL file and with it turns every locked-out role back on.
        """
        reapplied = False
        while not should_stop():
            if not reapplied:
                reapplied = self._reapply_locks()
            try:
                self.check_once()
            except redis.RedisError as exc:
                log.warning("memory guard: %s", exc)
                reapplied = False
                time.sleep(1.0)
            time.sleep(POLL_S)

    def check_once(self) -> list[Lock]:
        """One look: under pressure, find the holder and lock out a role over its quota."""
        info = self.admin.info("memory")
        used, cap = int(info["used_memory"]), int(info.get("maxmemory") or 0)
        if not cap or used < cap * PRESSURE:
            return []
        if time.monotonic() < self._calm_until and used < self._calm_used + cap * REGROWTH:
            return []  # looked a moment ago and found nobody to lock: look again later, or at once if it grows
        # cheapest first: a role's own keys decide at once; its queue (read to tell whose it is) only if needed
        holdings = self.measure(sample=True, resolve_queues=False)
        locks = self._lock_over_quota(holdings, cap)
        if not locks:
            self._resolve_queues(holdings)
            locks = self._lock_over_quota(holdings, cap)
        if not locks:  # a few big keys can hide from a random sample: count every key once
            holdings = self.measure(sample=False)
            locks = self._lock_over_quota(holdings, cap)
        if not locks:
            self._unblamed(holdings, used, cap)
            self._calm_until, self._calm_used = time.monotonic() + CALM_S, used
        return locks

    def measure(self, *, sample: bool, resolve_queues: bool = True) -> Holdings:
        """Bytes per owner: from :data:`SAMPLE_KEYS` random keys scaled to the keyspace, or every key.

        A role's queue is the copilot's or the role's by what it holds (:meth:`_queue_was_flooded`); without
        ``resolve_queues`` it stays ``queue:ROLE``.
        """
        holdings = Holdings()
        keys = self._random_keys() if sample else self._every_key()
        sizes = self._sizes(keys)
        scale = (int(self.admin.dbsize()) / len(keys)) if sample and keys else 1.0
        for key, size in zip(keys, sizes, strict=True):
            owner = owner_of(key)
            holdings.add(owner, size * scale)
            if owner == CONTROL and size > 2**20:
                holdings.big_control_keys.append(key)
        if resolve_queues:
            self._resolve_queues(holdings)
        return holdings

    def _resolve_queues(self, holdings: Holdings) -> None:
        for owner in [o for o in holdings.bytes_by_owner if o.startswith("queue:")]:
            role = owner.split(":", 1)[1]
            held = holdings.bytes_by_owner.pop(owner)
            holdings.add(role if self._queue_was_flooded(role) else "copilot", held)

    def lock(self, role: str, held_bytes: int, maxmemory: int) -> Lock:
        """Lock ``role`` out of Redis: no new connection, its current ones closed. Nothing is deleted."""
        lock = Lock(role=role, held_bytes=held_bytes, maxmemory=maxmemory, at=time.time())
        self._shut_out(role)
        self.admin.hset(c.guard_locks_key(), role, json.dumps({"reason": lock.reason(), "at": lock.at}))
        self.say(f"memory guard: locked out {role}: {lock.reason()}; unlock with: xnai acl unlock {role}")
        return lock

    def _lock_over_quota(self, holdings: Holdings, cap: int) -> list[Lock]:
        locks = []
        for owner, held in sorted(holdings.bytes_by_owner.items(), key=lambda item: -item[1]):
            if owner in c.WORKER_ROLES and held >= cap * ROLE_QUOTA and not self._locked(owner):
                locks.append(self.lock(owner, int(held), cap))
        return locks

    def _unblamed(self, holdings: Holdings, used: int, cap: int) -> None:
        """Pressure, but no worker role over its quota: say who holds most (and drop oversized control keys)."""
        for key in holdings.big_control_keys:  # reply and event queues are transient: nothing lasting is lost
            self.admin.delete(key)
            self.say(f"memory guard: deleted the control key {key!r}, which held over 1 MiB")
        now = time.monotonic()
        owner, held = holdings.top()
        if now < self._quiet_until or self._locked(owner):  # a locked role's keys stay until cleared or expired
            return
        self._quiet_until = now + QUIET_S
        keys = sum(holdings.bytes_by_owner.values())
        self.say(
            f"memory guard: Redis holds {used / 2**20:.0f} of {cap / 2**20:.0f} MiB, keys ~{keys / 2**20:.0f} MiB, "
            f"the most {owner}'s (~{held / 2**20:.0f} MiB); no worker role is over its quota to lock out"
        )

    def _reapply_locks(self) -> bool:
        """A lock outlives a Redis restart (which reloads the ACL file): apply the kept ones again."""
        try:
            for role in current_locks(self.admin):
                self._shut_out(role)
        except redis.RedisError:
            return False  # Redis not up yet: next round
        return True

    def _shut_out(self, role: str) -> None:
        """No new connection as ``role`` (ACL user off), and its open ones closed."""
        self.admin.execute_command("ACL", "SETUSER", role, "off")
        self.admin.execute_command("CLIENT", "KILL", "USER", role)

    def _locked(self, role: str) -> bool:
        return bool(self.admin.hexists(c.guard_locks_key(), role))

    def _random_keys(self) -> list[str]:
        with self.admin.pipeline(transaction=False) as pipe:
            for _ in range(SAMPLE_KEYS):
                pipe.randomkey()
            drawn = pipe.execute()
        return [bytes_to_str(k) for k in drawn if k is not None]

    def _every_key(self) -> list[str]:
        deadline = time.monotonic() + SCAN_BUDGET_S
        keys: list[str] = []
        for key in self.admin.scan_iter(count=1000):
            keys.append(bytes_to_str(key))
            if time.monotonic() > deadline:
                break
        return keys

    def _sizes(self, keys: Iterable[str]) -> list[int]:
        with self.admin.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.memory_usage(key)
            return [int(size or 0) for size in pipe.execute()]

    def _queue_was_flooded(self, role: str) -> bool:
        """Does the role's queue hold anything but fresh messages the copilot signed, each once?"""
        queue = c.queue_for(role)
        half = QUEUE_SAMPLE // 2
        if int(self.admin.llen(queue)) <= QUEUE_SAMPLE:
            entries = list(self.admin.lrange(queue, 0, -1))
        else:  # the newest and the oldest
            entries = [*self.admin.lrange(queue, 0, half - 1), *self.admin.lrange(queue, -half, -1)]
        nonces: set[str] = set()
        for raw in entries:
            nonce = self._copilot_nonce(raw, role)
            if nonce is None or nonce in nonces or self.admin.exists(c.nonce_key(role, nonce)):
                return True
            nonces.add(nonce)
        return False

    def _copilot_nonce(self, raw: bytes, role: str) -> str | None:
        """The nonce of a message the copilot signed for ``role``, or None for anything else."""
        try:
            envelope = json.loads(raw)
            body = json.loads(base64.b64decode(envelope["body"]))
            verified = verify_message(
                self.keyring,
                headers=envelope["headers"],
                body=body,
                queue=role,
                now=time.time(),
                max_age_s=self.max_message_age,
                role=role,
            )
        except (MessageRejected, ValueError, TypeError, KeyError, AttributeError):
            return None
        return verified.nonce if verified.agent == "copilot" else None


def current_locks(conn: redis.Redis) -> dict[str, str]:
    """The roles the guard locked out, with the reason of each (for ``xnai status``)."""
    locks: dict[str, str] = {}
    for role, raw in conn.hgetall(c.guard_locks_key()).items():
        try:
            locks[bytes_to_str(role)] = str(json.loads(raw)["reason"])
        except (ValueError, KeyError, TypeError):
            locks[bytes_to_str(role)] = "(unreadable)"
    return locks


def unlock(settings: Settings, role: str) -> str | None:
    """Let ``role`` connect again (``xnai acl unlock ROLE``); returns why it was locked, if it was."""
    broker.require_reachable(settings)
    conn = broker.connect(redis_urls.connection_url(settings, acl.ADMIN))
    try:
        reason = current_locks(conn).get(role)
        conn.execute_command("ACL", "SETUSER", role, "on")
        conn.hdel(c.guard_locks_key(), role)
        return reason
    finally:
        conn.close()

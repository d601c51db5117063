"""The response cache in Redis: one role's entries, bounded in bytes and in time, and its counts.

Each role's cache is its entries (strings with a TTL of XNAI_CACHE_TTL), a sorted set of their keys by
last use (the eviction order), a hash of their sizes and a byte counter. The embedded Redis never evicts
(``noeviction``), so the cache evicts on its own: :data:`INSERT` runs as one Lua script (atomic, as the
role's ACL user) that drops expired keys, then the least recently used until the new entry fits
XNAI_CACHE_MAX_MB, then stores it. A hit served by the copilot cannot write the role's keys: the copilot
records it in its own sorted set (:func:`~xnai_tasks.core.constants.cache_touch_key`, in the lookup's
pipeline), which the role may read; the script moves an entry used since it was stored up instead of
evicting it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis

from xnai_tasks.core import constants as c

#: Bytes counted per entry beyond its text (the key, the sorted-set and hash members): the cap is on memory.
ENTRY_OVERHEAD: Final = 256
#: Outcomes counted (one hash field ``ROLE:OUTCOME`` per counting agent).
OUTCOMES: Final = ("lookup", "miss", "semantic_hit", "refused", "bad_entry", "stored", "evicted")

#: Most hits the copilot remembers per role (the newest); an entry hit longer ago is evicted by its store time.
MAX_TOUCHES: Final = 10_000

# KEYS: entry, lru, sizes, bytes, counts. ARGV: key, entry, now, ttl, cap, entry prefix, role, overhead, touches
# (the copilot's key, read-only for the role: named in ARGV, since a script's KEYS must be writable to its caller).
INSERT: Final = """
local key, entry, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local cap, prefix, role = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local size = string.len(entry) + tonumber(ARGV[8])
local function drop(member)
  local old = tonumber(redis.call('HGET', KEYS[3], member) or '0')
  redis.call('HDEL', KEYS[3], member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('DEL', prefix .. member)
  redis.call('INCRBY', KEYS[4], -old)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)) do drop(member) end
if redis.call('HGET', KEYS[3], key) then drop(key) end
if size > cap then return -1 end
local evicted = 0
while tonumber(redis.call('GET', KEYS[4]) or '0') + size > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #oldest == 0 then break end
  local used = tonumber(redis.call('ZSCORE', ARGV[9], oldest[1]) or '0')
  if used > tonumber(oldest[2]) then
    redis.call('ZADD', KEYS[2], used, oldest[1])
  else
    drop(oldest[1])
    evicted = evicted + 1
  end
end
redis.call('SET', KEYS[1], entry, 'EX', ttl)
redis.call('ZADD', KEYS[2], now, key)
redis.call('HSET', KEYS[3], key, size)
redis.call('INCRBY', KEYS[4], size)
redis.call('HINCRBY', KEYS[5], role .. ':stored', 1)
if evicted > 0 then redis.call('HINCRBY', KEYS[5], role .. ':evicted', evicted) end
return evicted
"""

# KEYS: lru, sizes, bytes. ARGV: key, entry prefix. Returns 1 when the key was cached.
FORGET: Final = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
local gone = redis.call('DEL', ARGV[2] .. ARGV[1])
if old then redis.call('INCRBY', KEYS[3], -tonumber(old)) end
return gone
"""


def entry_prefix(role: str) -> str:
    """What a role's entry keys start with (the Lua scripts append the cache key)."""
    return c.cache_entry_key(role, "")


def insert(conn: redis.Redis, role: str, key: str, entry: str, *, ttl_s: int, cap_bytes: int) -> int:
    """Store ``entry`` under ``key``; how many older entries were evicted for it (-1: bigger than the cap)."""
    keys = [
        c.cache_entry_key(role, key),
        c.cache_lru_key(role),
        c.cache_sizes_key(role),
        c.cache_bytes_key(role),
        c.cache_counts_key(role),
    ]
    args = [
        key,
        entry,
        time.time(),
        ttl_s,
        cap_bytes,
        entry_prefix(role),
        role,
        ENTRY_OVERHEAD,
        c.cache_touch_key(role),
    ]
    return int(conn.register_script(INSERT)(keys=keys, args=args))


def forget(conn: redis.Redis, role: str, key: str) -> bool:
    """Drop one entry of ``role``; whether it was there."""
    keys = [c.cache_lru_key(role), c.cache_sizes_key(role), c.cache_bytes_key(role)]
    return bool(conn.register_script(FORGET)(keys=keys, args=[key, entry_prefix(role)]))


def clear(conn: redis.Redis, role: str) -> int:
    """Drop every cache entry of ``role`` (with its index, sizes, byte count and the copilot's record of its
    hits; its outcome counts stay, as counters do); how many keys went."""
    gone = int(conn.delete(c.cache_touch_key(role)))
    counts_key = c.cache_counts_key(role).encode()
    batch: list[Any] = []
    for name in conn.scan_iter(match=c.cache_role_pattern(role), count=500):
        if name == counts_key:
            continue
        batch.append(name)
        if len(batch) >= 500:
            gone += int(conn.delete(*batch))
            batch = []
    if batch:
        gone += int(conn.delete(*batch))
    return gone


def count(conn: redis.Redis, agent: str, role: str, outcome: str, n: int = 1) -> None:
    """Count ``n`` outcomes of ``role``'s cache in ``agent``'s counts."""
    conn.hincrby(c.cache_counts_key(agent), f"{role}:{outcome}", n)


@dataclass(frozen=True, kw_only=True)
class RoleStats:
    """One role's cache now: entries, bytes, cap, and the outcomes counted so far."""

    role: str
    entries: int
    bytes: int
    cap_bytes: int
    counts: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "entries": self.entries,
            "bytes": self.bytes,
            "cap_bytes": self.cap_bytes,
            **{outcome: int(self.counts.get(outcome, 0)) for outcome in ("hit", *OUTCOMES)},
        }


def counts(conn: redis.Redis) -> dict[str, dict[str, int]]:
    """Every role's outcomes, summed over the agents that counted them; ``hit`` is exact lookups that hit."""
    totals: dict[str, dict[str, int]] = {role: {} for role in c.ROLES}
    pipe = conn.pipeline(transaction=False)
    for agent in c.ROLES:
        pipe.hgetall(c.cache_counts_key(agent))
    for found in pipe.execute():
        for field, value in found.items():
            role, _, outcome = _text(field).partition(":")
            if role in totals and outcome in OUTCOMES:
                totals[role][outcome] = totals[role].get(outcome, 0) + int(value)
    for figures in totals.values():
        figures["hit"] = max(0, figures.get("lookup", 0) - figures.get("miss", 0) - figures.get("bad_entry", 0))
    return totals


def stats(conn: redis.Redis, cap_bytes: int) -> list[RoleStats]:
    """Every role's cache: entries, bytes against the cap, and its counts."""
    pipe = conn.pipeline(transaction=False)
    for role in c.ROLES:
        pipe.zcard(c.cache_lru_key(role))
        pipe.get(c.cache_bytes_key(role))
    raw = pipe.execute()
    totals = counts(conn)
    return [
        RoleStats(
            role=role,
            entries=int(raw[2 * i]),
            bytes=int(raw[2 * i + 1] or 0),
            cap_bytes=cap_bytes,
            counts=totals[role],
        )
        for i, role in enumerate(c.ROLES)
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

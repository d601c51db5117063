"""One round trip per stored task result: a Lua script that stores, publishes and finishes the task at once.

Celery reads a task's stored result before writing a new state, and keeps a stored success (a lost worker's
redelivered task must not overwrite it); then it writes and publishes in a second round trip. The script does
the same check and the write atomically, and with a final result also marks the task's nonce done (the replay
ledger, :mod:`.ledger`) and counts the end in the role's throughput bucket (:mod:`xnai_tasks.admission.throughput`).
A worker instance a peer declared dead stores nothing of a task whose message was given back from it (its fence,
:mod:`xnai_tasks.resilience.dead_workers`): checked first, in the same script.
Every command it runs is checked against the caller's ACL, as by hand (a role touches only its own keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import redis

#: KEYS: the result key, then the nonce key and the throughput bucket when their flags say so, then the fence.
#: ARGV: the value, its time to live (0: none), nonce flag (1/0), the bucket's time to live (0: no count), fence
#: flag (1/0), the task id. Returns 1 when stored and published, 0 when a success was stored already (the nonce and
#: count still happen), -1 when the task id is in the fence (nothing is done).
STORE_SCRIPT: Final = """
if ARGV[5] == '1' and redis.call('SISMEMBER', KEYS[#KEYS], ARGV[6]) == 1 then return -1 end
local stored = 1
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then stored = 0 end
end
if stored == 1 then
  if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
  redis.call('PUBLISH', KEYS[1], ARGV[1])
end
local next_key = 2
if ARGV[3] == '1' then
  redis.call('SET', KEYS[next_key], 'done', 'XX', 'KEEPTTL')
  next_key = next_key + 1
end
if tonumber(ARGV[4]) > 0 then
  redis.call('INCR', KEYS[next_key])
  redis.call('EXPIRE', KEYS[next_key], ARGV[4])
end
return stored
"""


@dataclass(frozen=True, slots=True)
class Riders:
    """What is finished with a task's final result: its nonce key, its throughput bucket and that bucket's ttl;
    and the fence checked before anything is stored (with the task id looked up in it)."""

    nonce_key: str | None = None
    count_key: str | None = None
    count_ttl_s: int = 0
    fence_key: str | None = None
    task_id: str = ""


class Outcome(IntEnum):
    """What the store script did."""

    FENCED = -1
    KEPT = 0
    STORED = 1


class ResultStore:
    """Runs :data:`STORE_SCRIPT` on one Redis client (loaded on first use; again if the server forgot it)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(STORE_SCRIPT)

    def store(self, key: str, value: str | bytes, expires: float | None, riders: Riders) -> bool:
        """Store and publish ``value`` under ``key`` unless a success is stored; True when it was stored."""
        return self.outcome(key, value, expires, riders) is Outcome.STORED

    def outcome(self, key: str, value: str | bytes, expires: float | None, riders: Riders) -> Outcome:
        """Store and publish ``value`` under ``key`` unless a success is stored or the fence holds its task."""
        keys: list[str] = [key]
        if riders.nonce_key is not None:
            keys.append(riders.nonce_key)
        counted = riders.count_key is not None and riders.count_ttl_s > 0
        if counted:
            keys.append(str(riders.count_key))
        if riders.fence_key is not None:
            keys.append(riders.fence_key)
        ttl = math.ceil(expires) if expires else 0
        args: list[Any] = [
            value,
            ttl,
            int(riders.nonce_key is not None),
            riders.count_ttl_s * counted,
            int(riders.fence_key is not None),
            riders.task_id,
        ]
        return Outcome(int(self._script(keys=keys, args=args)))

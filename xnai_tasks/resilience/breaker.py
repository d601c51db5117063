"""A circuit breaker per role and model, shared by every process and host through Redis.

The state lives only in Redis (a hash, :func:`~xnai_tasks.core.constants.breaker_key`); a :class:`Breaker`
object holds names and settings and writes nothing until a call passes it, so a process that starts never
resets anything. Every transition is one Lua script on the server's clock (hosts need not agree on the time):

* closed -> open: ``failures`` failed or timed-out calls within ``window_s`` seconds of the first of them;
* open -> half-open: the first caller after the open period; it takes the probe token (``SET NX PX``, a
  string that expires on its own, so a probe whose process died is followed by another) and runs the call;
  every other caller is refused while the token is held;
* half-open -> closed when the probe succeeds; -> open again when it fails, for twice the last period (at
  most ``open_max_s``), times a jitter of up to 20% so that hosts do not probe in step.

No lock is held across a call: the only shared thing a caller holds is the probe token. Unlike pybreaker with
its Redis storage (danielfm/pybreaker#26: building a breaker resets the shared failure count; #24: a process that
finds it open restarts the open period from its own clock, so half-open may never come), building a breaker
here writes nothing, and when it opened and until when is one stored value on one clock.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Final

import redis

from xnai_tasks.core import constants as c
from xnai_tasks.errors import BreakerOpenError
from xnai_tasks.settings import Settings

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
#: The value of each state in the ``xnai_breaker_state`` gauge.
STATE_VALUES: Final = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
#: The open period is multiplied by 1 to 1 + JITTER at random.
JITTER: Final = 0.2
#: Seconds a probe token outlives the slowest call that still counts as an answer.
PROBE_MARGIN_S: Final = 5

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: state, probe token. ARGV: token, probe TTL (ms). Returns {verdict, open_until_ms, reason}.
_ADMIT = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then return {'closed', 0, ''} end
local reason = redis.call('HGET', KEYS[1], 'reason') or ''
if state == 'open' then
  local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
  if now < open_until then return {'open', open_until, reason} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'changed_at', string.format('%d', now))
  redis.call('HINCRBY', KEYS[1], 'to_half_open', 1)
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'probe', 0, reason} end
return {'busy', 0, reason}
"""
)

#: KEYS: state, probe token. ARGV: outcome (ok, fail, cancel), token ('' when not the probe), failures,
#: window (ms), first open period (ms), longest (ms), jitter factor, detail. Returns the state after it.
_SETTLE = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local function open(reason)
  local opens = tonumber(redis.call('HGET', KEYS[1], 'opens') or '0')
  local period = math.floor(math.min(tonumber(ARGV[6]), tonumber(ARGV[5]) * 2 ^ opens * tonumber(ARGV[7])))
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', string.format('%d', now + period),
    'period_ms', string.format('%d', period), 'opens', opens + 1, 'failures', 0, 'reason', reason,
    'changed_at', string.format('%d', now))
  redis.call('HINCRBY', KEYS[1], 'to_open', 1)
  return 'open'
end
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[2])
  if ARGV[1] == 'ok' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'opens', 0, 'failures', 0, 'reason', '',
      'changed_at', string.format('%d', now))
    redis.call('HINCRBY', KEYS[1], 'to_closed', 1)
    return 'closed'
  end
  if ARGV[1] == 'fail' then return open('the half-open probe failed: ' .. ARGV[8]) end
  return state
end
if ARGV[1] ~= 'fail' or state ~= 'closed' then return state end
local start = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
local failures
if now - start > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'window_start', string.format('%d', now), 'failures', 1)
  failures = 1
else
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
end
if failures >= tonumber(ARGV[3]) then
  return open(failures .. ' failures within ' .. math.floor(ARGV[4] / 1000) .. ' s, the last: ' .. ARGV[8])
end
return 'closed'
"""
)


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and for how long (``XNAI_BREAKER_*``, ``XNAI_LLM_SLOW``)."""

    failures: int = 5
    window_s: float = 60.0
    open_s: float = 30.0
    open_max_s: float = 600.0
    slow_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerPolicy:
        return cls(
            failures=settings.breaker_failures,
            window_s=float(settings.breaker_window),
            open_s=float(settings.breaker_open),
            open_max_s=float(settings.breaker_open_max),
            slow_s=float(settings.llm_slow),
        )


@dataclass(frozen=True)
class Ticket:
    """A caller let through: ``probe`` when it holds the half-open probe token ``token``."""

    probe: bool
    token: str


@dataclass(frozen=True)
class BreakerState:
    """A breaker as stored, read at one instant of the server's clock."""

    role: str
    model: str
    state: str
    failures: int
    opens: int
    retry_in_s: float
    period_s: float
    reason: str
    transitions: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Breaker:
    """The breaker of ``role``'s calls to ``model``, on ``conn`` (the role's Redis user may touch only its own)."""

    def __init__(self, conn: redis.Redis, role: str, model: str, policy: BreakerPolicy) -> None:
        self.conn = conn
        self.role = role
        self.model = model
        self.policy = policy
        self.keys = [c.breaker_key(role, model), c.breaker_probe_key(role, model)]
        # redis-py Scripts (EVALSHA, loaded on a miss): making them sends nothing, so a new breaker writes nothing
        self._admit = conn.register_script(_ADMIT)
        self._settle = conn.register_script(_SETTLE)

    def admit(self) -> Ticket:
        """Let a call through, as the probe if the breaker is half-open; else raise :class:`BreakerOpenError`."""
        token = uuid.uuid4().hex
        ttl_ms = int((self.policy.slow_s + PROBE_MARGIN_S) * 1000)
        verdict, open_until, reason = self._admit(keys=self.keys, args=[token, ttl_ms])
        verdict, reason = _text(verdict), _text(reason)
        if verdict == CLOSED:
            return Ticket(probe=False, token="")
        if verdict == "probe":
            return Ticket(probe=True, token=token)
        if verdict == OPEN:
            retry = max(0.0, (int(open_until) - _server_ms(self.conn)) / 1000)
            raise BreakerOpenError(open_message(self.role, self.model, reason, retry))
        raise BreakerOpenError(busy_message(self.role, self.model, reason))

    def settle(self, ticket: Ticket, outcome: str, detail: str = "") -> str | None:
        """Record how a call let through ended (``ok``, ``fail`` or ``cancel``); the state after it, if asked."""
        if not ticket.probe and outcome != "fail":
            return None  # nothing to change: a closed breaker does not count successes
        p = self.policy
        args = [
            outcome,
            ticket.token,
            p.failures,
            int(p.window_s * 1000),
            int(p.open_s * 1000),
            int(p.open_max_s * 1000),
            1 + JITTER * random.random(),
            " ".join(detail.split())[:300],
        ]
        return _text(self._settle(keys=self.keys, args=args))

    def read(self) -> BreakerState:
        """The state as stored (read-only); an open breaker whose period is over reads half-open."""
        return read_state(self.conn, self.role, self.model)


def open_message(role: str, model: str, reason: str, retry_s: float) -> str:
    """Why a call is refused while the breaker is open (one line)."""
    return f"circuit breaker open for {role} on {model} ({reason}); next probe in ~{retry_s:.0f} s"


def busy_message(role: str, model: str, reason: str) -> str:
    """Why a call is refused while another call is the half-open probe (one line)."""
    return f"circuit breaker half-open for {role} on {model}: another call is the probe ({reason})"


def read_state(conn: redis.Redis, role: str, model: str) -> BreakerState:
    """One breaker's state, read without changing it."""
    raw = {_text(k): _text(v) for k, v in conn.hgetall(c.breaker_key(role, model)).items()}
    now = _server_ms(conn)
    state = raw.get("state", CLOSED)
    open_until = _number(raw.get("open_until"))
    if state == OPEN and now >= open_until:
        state = HALF_OPEN  # the next caller probes
    return BreakerState(
        role=role,
        model=model,
        state=state,
        failures=_number(raw.get("failures")),
        opens=_number(raw.get("opens")),
        retry_in_s=round(max(0, open_until - now) / 1000, 1) if state == OPEN else 0.0,
        period_s=round(_number(raw.get("period_ms")) / 1000, 3),
        reason=raw.get("reason", ""),
        transitions={to: _number(raw.get(f"to_{to}")) for to in (OPEN, HALF_OPEN, CLOSED)},
    )


def all_states(conn: redis.Redis) -> list[BreakerState]:
    """Every breaker in Redis (SCAN: the admin's view, for ``xnai status`` and the metrics)."""
    found = []
    for key in conn.scan_iter(match=f"{c.BREAKER_PREFIX}*", count=500):
        name = _text(key)
        if name.endswith(c.BREAKER_PROBE_SUFFIX):
            continue
        role, _, model = name.removeprefix(c.BREAKER_PREFIX).partition(":")
        if role in c.ROLES and model:
            found.append(read_state(conn, role, model))
    return sorted(found, key=lambda s: (s.role, s.model))


def _server_ms(conn: redis.Redis) -> int:
    seconds, micros = conn.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _number(value: str | None) -> int:
    return int(float(value)) if value else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""A role worker takes a message from its queue and records it as its own in one step, so a kill loses none.

kombu's Redis transport takes a message with BRPOP and records it in the unacked hash afterwards, once the
reply is read. Between the two the message exists only in the reply, on its way to a worker or in its socket
buffer: a worker killed then (SIGKILL, OOM, power) loses it for good; no unacked entry, no restore. A worker
that takes many messages in a row keeps that window open much of the time: the batching curation worker
(64 task threads) answers each BRPOP reply with the next BRPOP while its queue holds messages, and its event
loop shares the interpreter with the task threads, so a reply may wait in the socket for a while; one kill in
three or four during a burst lost the message after the last recorded one (tests/test_batching.py).

:class:`TakingChannel` takes with one script instead (:data:`TAKE_SCRIPT`): it pops the head of the queue
and, in the same step, writes kombu's unacked entry and index and adds the tag to this instance's held set
(:mod:`.dead_workers`), so a killed worker's message is always in the unacked hash, where a live peer gives it
back after ``XNAI_DEAD_AFTER``. Only when the queue is empty does it block, with ``BLMOVE list list RIGHT
RIGHT``: it wakes when a message arrives and leaves the list as it was (it takes the tail and puts it back at
the tail); the next script takes the message. It waits on the queue's first list only (the one messages
without a priority go to): a message sent with a priority is taken when the wait ends, within kombu's BRPOP
timeout (1 s).

Both commands write (BLMOVE is refused like any write), so a full Redis (``maxmemory`` reached, ``noeviction``)
refuses them both, unlike kombu's BRPOP; the worker then logs one warning, pauses :data:`REFUSED_PAUSE_S` and
tries again, and takes again once Redis accepts writes. A refused take leaves its message in the queue: the
script records before it pops, and a refused write ends it before the pop.
"""

from __future__ import annotations

import hashlib
import logging
import time
from queue import Empty
from typing import Any, Final

from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError, ResponseError

from xnai_tasks.core import constants as c
from xnai_tasks.resilience import dead_workers
from xnai_tasks.security.envelope import MAX_ENVELOPE_BYTES

log = logging.getLogger(__name__)

#: KEYS: the queue's lists in BRPOP's order, then the unacked hash, its index and the instance's held set.
#: ARGV: the number of lists, the index score (now, as kombu's), the largest item decoded. Returns {list, item,
#: tag} for a message taken and recorded, {list, item} for an item that is not kombu's envelope or is larger
#: (taken unrecorded: the channel refuses it), false when every list is empty. The entry is kombu's
#: ``[message, exchange, routing_key]`` around the item as it was (a decoded and encoded message could differ
#: from what its signature covers).
TAKE_SCRIPT: Final = """
local n = tonumber(ARGV[1])
for i = 1, n do
  -- read, record, then pop: a write refused (a full noeviction Redis) fails the script before the message leaves
  local item = redis.call('LRANGE', KEYS[i], -1, -1)[1]
  if item then
    local ok, payload = #item <= tonumber(ARGV[3]), nil
    if ok then ok, payload = pcall(cjson.decode, item) end
    local properties = ok and type(payload) == 'table' and payload.properties
    local tag = type(properties) == 'table' and properties.delivery_tag
    local info = type(properties) == 'table' and properties.delivery_info
    if type(tag) == 'string' and type(info) == 'table' and type(info.exchange) == 'string'
        and type(info.routing_key) == 'string' then
      local entry = '[' .. item .. ', ' .. cjson.encode(info.exchange) .. ', ' .. cjson.encode(info.routing_key) .. ']'
      redis.call('ZADD', KEYS[n + 2], ARGV[2], tag)
      redis.call('HSET', KEYS[n + 1], tag, entry)
      redis.call('SADD', KEYS[n + 3], tag)
      redis.call('RPOP', KEYS[i])
      return {KEYS[i], item, tag}
    end
    redis.call('RPOP', KEYS[i])
    return {KEYS[i], item}
  end
end
return false
"""
TAKE_SHA: Final = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()  # Redis names a script by its SHA-1

#: What the channel's BRPOP connection is waiting for: a take's reply, or the end of a wait.
TAKE: Final = "take"
WAIT: Final = "wait"

#: Seconds a worker pauses after Redis refused its take or wait (full, or its ACL changed): long enough not to
#: spin (two refused round trips a second), short enough to take again within a moment of Redis accepting
#: writes; the pause holds up the worker's event loop, whose other work (acks, pool results) waits that long.
REFUSED_PAUSE_S: Final = 0.5
#: Seconds between two warnings while Redis goes on refusing: one line for a refusal, not one per poll.
REFUSED_WARN_EVERY_S: Final = 60.0


class TakingChannel:
    """Mixin for a kombu Redis channel (before it in the bases) of a role worker: takes with
    :data:`TAKE_SCRIPT` and waits with BLMOVE instead of BRPOP; any other channel keeps kombu's BRPOP."""

    #: The command pending on the BRPOP connection (None: kombu's own BRPOP, or nothing).
    _sent: str | None = None
    #: The last take found the queue empty: the next command waits.
    _empty = False
    #: When Redis last refused a take or wait with a warning logged (monotonic); None while it accepts them.
    _refused_at: float | None = None
    #: The tag the take script recorded, while its message is being delivered (:meth:`took`).
    _took: str | None = None

    def took(self, delivery_tag: Any) -> bool:
        """Whether the take script already recorded this tag as unacked and held (the QoS need not again)."""
        return self._took is not None and self._took == delivery_tag

    def _taking_keys(self) -> tuple[list[str], str] | None:
        """The queue's lists and this instance's held set, when this channel consumes its role's queue alone."""
        chan: Any = self
        instance = dead_workers.this_instance()
        if instance is None or chan.global_keyprefix or set(chan.active_queues) != {c.queue_for(instance.role)}:
            return None
        queue = c.queue_for(instance.role)
        return [chan._q_for_pri(queue, pri) for pri in chan.priority_steps], instance.held_key

    def _brpop_start(self, timeout: Any = None) -> None:
        chan: Any = self
        taking = self._taking_keys()
        if taking is None:
            self._sent = None
            super()._brpop_start(timeout)  # type: ignore[misc]
            return
        lists, held = taking
        connection = chan.client.connection
        chan._in_poll = connection
        chan._brpop_sent_at = time.monotonic()
        if self._empty:
            self._sent = WAIT
            wait = chan.brpop_timeout if timeout is None else timeout
            connection.send_command("BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT", wait or 0)
        else:
            self._sent = TAKE
            keys = [*lists, chan.unacked_key, chan.unacked_index_key, held]
            limit = MAX_ENVELOPE_BYTES
            connection.send_command("EVALSHA", TAKE_SHA, len(keys), *keys, len(lists), time.time(), limit)

    def _brpop_read(self, **options: Any) -> bool:
        chan: Any = self
        sent, self._sent = self._sent, None
        if sent is None:
            return bool(super()._brpop_read(**options))  # type: ignore[misc]
        try:
            try:
                reply = chan.client.parse_response(chan.client.connection, "EVALSHA", **options)
            except NoScriptError:  # a new or restarted Redis: load it, take on the next poll
                chan._in_poll = None
                chan.client.script_load(TAKE_SCRIPT)
                raise Empty() from None
            except ResponseError as exc:  # refused (a full Redis, an ACL): nothing was taken, try again shortly
                self._refused(sent, exc)
                raise Empty() from None
            except chan.connection_errors:
                chan.client.connection.disconnect()  # reconnect on the next poll, as kombu does
                raise
            if self._refused_at is not None:
                self._refused_at = None
                log.info("Redis accepts this worker's takes again", extra={"event": "take_accepted"})
            if sent == WAIT:  # a message arrived (left in place) or the wait timed out: take next
                self._empty = False
                raise Empty()
            if not reply:
                self._empty = True
                raise Empty()
            key, item, *recorded = reply
            queue = bytes_to_str(key).rsplit(chan.sep, 1)[0]
            chan._queue_cycle.rotate(queue)
            payload = chan._admit(queue, item)
            if payload is None:  # refused and dead-lettered (security/envelope.py): nothing to hold
                if recorded:
                    chan.qos.settle(bytes_to_str(recorded[0]))
                return True
            self._took = bytes_to_str(recorded[0]) if recorded else None
            try:
                chan.connection._deliver(payload, queue)
            finally:
                self._took = None
            return True
        finally:
            chan._in_poll = None
            chan._flush_brpop_reauth()

    def _refused(self, sent: str, exc: ResponseError) -> None:
        """Warn (once a while) that Redis refused a take or wait, and pause before the next."""
        now = time.monotonic()
        if self._refused_at is None or now - self._refused_at >= REFUSED_WARN_EVERY_S:
            self._refused_at = now
            log.warning(
                "Redis refused this worker's %s (%s): nothing taken, trying again every %.1f s",
                sent,
                exc,
                REFUSED_PAUSE_S,
                extra={"event": "take_refused", "command": sent, "error": str(exc)},
            )
        time.sleep(REFUSED_PAUSE_S)

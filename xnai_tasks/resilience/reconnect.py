"""A worker that loses its broker gives back, once it is connected again, every message it had taken.

With ``task_acks_late`` a message a worker has taken sits in its role's unacked hash (``unacked:ROLE``) until
the worker acknowledges it. When the connection drops (Redis restarted, a network cut) Celery terminates the
tasks that were running (``worker_cancel_long_running_tasks_on_connection_loss``) and forgets the prefetched
ones, so nothing acknowledges those messages any more; kombu would put them back in the queue only after the
visibility timeout (an hour), and its own attempt at closing the dead connection fails while Redis is down.

:class:`RestoringConsumer` remembers the delivery tags the lost connection held and, as soon as it is
connected again, pushes each of those messages back to the front of its queue (kombu's ``restore_by_tag``,
which marks it redelivered), so it runs again within seconds. Only this worker's own tags are touched: another
worker's message still in flight is never restored under it. A restored message is admitted by the gate as a
redelivery (its nonce is still ``seen``); one whose task had already stored its final result (it ended as the
connection dropped, before its ack) is only dropped from the unacked hash: the gate would refuse it as a replay.
A message Redis handed over (BRPOP) just before dying, too late to be recorded as unacked, is pushed back as well
(:class:`KeepingQoS`): it had left the queue and was in no hash.

A role worker also records each tag it takes as its own and settles it there (:mod:`.dead_workers`): a peer that
found it silent for ``XNAI_DEAD_AFTER`` may have given its messages back already, and then its late ack, reject
or restore of such a tag touches nothing (a peer may hold the message under the same tag by now).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import states
from celery.worker.state import successful_requests
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis import RedisError

from xnai_tasks.resilience import dead_workers
from xnai_tasks.resilience.taking import TakingChannel
from xnai_tasks.security import gate
from xnai_tasks.security.envelope import GuardedChannel
from xnai_tasks.security.gate import GatedConsumer
from xnai_tasks.worker.deliveries import LostWorkerRequest

log = logging.getLogger(__name__)

#: Seconds before the second try to reach a lost broker, and how much longer each later pause is (kombu: 2 and 2;
#: its longest pause, 30 s, is kept).
RECONNECT_FIRST_S = 1.0
RECONNECT_STEP_S = 1.0


class RestoringConsumer(GatedConsumer):
    """The gated consumer, which gives back the messages it held when its broker connection was lost."""

    #: Delivery tags (and their task ids) taken on a connection that was lost, not yet given back.
    _held: dict[str, str | None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from xnai_tasks.worker.role import current_role

        role = current_role()
        # the worker parent, before its pool forks: the children know which instance they store results for
        if role is not None and dead_workers.this_instance() is None:
            dead_workers.register(role, str(self.hostname))

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        self._held = {**(self._held or {}), **_take_over(getattr(self, "task_consumer", None))}
        super().on_connection_error_after_connected(exc)

    def ensure_connected(self, conn: Any) -> Any:
        if getattr(conn.transport, "Channel", None) is GuardedChannel:
            conn.transport.Channel = KeepingChannel
        # kombu pauses 2 s before its second try; a Redis that `xnai up` restarts is back well within a second
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=RECONNECT_FIRST_S, interval_step=RECONNECT_STEP_S
        )
        return super().ensure_connected(conn)

    def connect(self) -> Any:
        conn = super().connect()
        _start_heartbeat(str(self.app.conf.broker_url))
        if self._held or UNRECORDED:
            self._held = give_back(
                conn, self._held or {}, finished=lambda task_id: _finished(self.app.backend, task_id)
            )
        return conn


#: Messages popped from a queue whose unacked entry could not be written (Redis died in between): nothing else
#: holds them, so they are pushed back by :func:`give_back`.
UNRECORDED: list[Any] = []


def _start_heartbeat(redis_url: str) -> None:
    """This role worker's heartbeat (:mod:`.dead_workers`), from its first connection on."""
    from xnai_tasks.settings import process_settings

    instance = dead_workers.this_instance()
    if instance is None:
        return
    settings = process_settings()
    dead_workers.start_heartbeat(
        instance, redis_url, dead_after_s=settings.dead_after, max_message_age_s=settings.max_message_age
    )


class KeepingQoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's QoS, which keeps a message it could not record as unacked instead of losing it, and which records
    each tag it takes as this worker instance's own (:mod:`.dead_workers`).

    kombu pops a message (BRPOP) and then records it in the unacked hash; when Redis dies between the two, the
    message has left the queue and is in no hash: it exists only here.

    A tag is settled (ack, reject, restore) only while it is still this instance's: a peer that declared it dead
    gave the message back and took the tag out of its set, and may hold the message itself under the same tag.
    """

    #: True while kombu's visibility sweep restores any worker's tags (:meth:`restore_by_tag` asks who holds each).
    _sweeping = False

    def append(self, message: Any, delivery_tag: Any) -> None:
        try:
            self._append(message, delivery_tag)
        except (RedisError, OSError):
            UNRECORDED.append(message)
            raise

    def _append(self, message: Any, delivery_tag: Any) -> None:
        instance = dead_workers.this_instance()
        if instance is None:
            super().append(message, delivery_tag)
            return
        # the take script (resilience/taking.py) recorded it already, around the item as sent: kept as it is
        recorded = self.channel.took(delivery_tag)
        verdict = gate.take(message)  # verified now: its nonce claim rides in this round trip
        with self.pipe_or_acquire() as pipe:
            if not recorded:  # kombu's BRPOP took it (a channel that consumes more than its role's queue)
                delivery = message.delivery_info
                entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(self.unacked_key, delivery_tag, entry)
                pipe.sadd(instance.held_key, delivery_tag)
            task_id = _task_id(message)
            if task_id is not None:  # delivered to this instance again after a peer restored it: its own again
                pipe.srem(instance.fenced_key, task_id)
            claiming = verdict is not None and verdict.queue_claim(pipe)
            replies = pipe.execute()
        if claiming and verdict is not None:
            verdict.claimed(replies)
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        if dead_workers.this_instance() is None:
            super().ack(delivery_tag)
            return
        self.settle(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if dead_workers.this_instance() is None:
            super().reject(delivery_tag, requeue=requeue)
            return
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self.settle(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def settle(self, delivery_tag: Any) -> bool:
        """Drop a tag's unacked entry if the tag is still this instance's (a role worker's); whether it was."""
        instance = dead_workers.this_instance()
        assert instance is not None  # only a role worker's QoS and take settle: both check for an instance first
        with self.channel.conn_or_acquire() as conn:
            keys = [instance.held_key, self.unacked_index_key, self.unacked_key]
            mine = bool(int(self._settle_script(keys=keys, args=[delivery_tag], client=conn)))
        if not mine:
            log.info("delivery %s was given back by a peer while this worker was silent: left to it", delivery_tag)
        return mine

    @functools.cached_property
    def _settle_script(self) -> Any:
        return self.channel.client.register_script(dead_workers.SETTLE_SCRIPT)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        self._sweeping = True
        try:
            super().restore_visible(start=start, num=num, interval=interval)
        finally:
            self._sweeping = False

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> bool:
        """kombu's restore of one tag, done only while the tag is this instance's own; whether it was.

        In kombu's visibility sweep the tag may be any instance's: it is left alone while its holder beats (a long
        task, not a lost one) and, restored, it leaves every held set (a later ack of its holder must not settle the
        entry of whichever worker takes it next)."""
        instance = dead_workers.this_instance()
        if instance is None:
            super().restore_by_tag(tag, client=client, leftmost=leftmost)
            return True
        if self._sweeping:
            dead_after_s, fence_ttl_s = dead_workers.liveness()
            with self.channel.conn_or_acquire(client) as conn:
                done = dead_workers.restore_swept(
                    conn, instance.role, bytes_to_str(tag), dead_after_s=dead_after_s, fence_ttl_s=fence_ttl_s
                )
            if done < 0:
                log.debug("delivery %s is past the visibility timeout but its worker is alive: left to it", tag)
            return done > 0
        mine = False

        def restore_transaction(pipe: Any) -> None:
            nonlocal mine
            mine = bool(pipe.sismember(instance.held_key, tag))
            entry = pipe.hget(self.unacked_key, tag) if mine else None
            pipe.multi()
            if not mine:
                return
            self._remove_from_indices(tag, pipe)
            pipe.srem(instance.held_key, tag)
            if entry:
                message, exchange, routing_key = loads(bytes_to_str(entry))
                self.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as conn:
            conn.transaction(restore_transaction, self.unacked_key, instance.held_key)
        if not mine:
            log.info("delivery %s was given back by a peer while this worker was silent: not restored again", tag)
        return mine


class KeepingChannel(TakingChannel, GuardedChannel):
    """The guarded channel (security/envelope.py) with :class:`KeepingQoS`, which takes a message and records it
    as unacked in one step (:mod:`.taking`: kombu's BRPOP-then-record loses the message of a worker killed
    between the two)."""

    QoS = KeepingQoS


class LostChannel:
    """Stands, in the messages a lost connection delivered, for its channel: acknowledging or rejecting one of
    them does nothing (:func:`give_back` settles them once the broker answers). Their own channel is closed, and
    an acknowledgement Celery queued before the loss would otherwise crash the worker when it runs after it."""

    no_ack_consumers = None

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        log.debug("not acknowledged on a lost connection: %s", delivery_tag)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        log.debug("not rejected on a lost connection: %s", delivery_tag)


def _take_over(task_consumer: Any) -> dict[str, str | None]:
    """The messages the consumer's channel delivered and did not acknowledge (tag -> task id), now settled by
    :func:`give_back` alone.

    kombu keeps them in its QoS (``_delivered``, private: there is no public list). Its restore-on-close is
    turned off for this channel, since it would run while the broker is down, fail and dump the messages to a
    temporary file.
    """
    channel = getattr(task_consumer, "channel", None)
    qos = getattr(channel, "_qos", None)
    if qos is None:
        return {}
    acked = set(getattr(qos, "_dirty", ()))
    held = {tag: message for tag, message in dict(getattr(qos, "_delivered", {})).items() if tag not in acked}
    qos.restore_at_shutdown = False
    for message in held.values():
        message.channel = LOST_CHANNEL
    return {str(tag): _task_id(message) for tag, message in held.items()}


LOST_CHANNEL = LostChannel()


def _task_id(message: Any) -> str | None:
    headers = getattr(message, "headers", None)
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None


def _finished(backend: Any, task_id: str) -> bool:
    """Whether the task's final result is stored (it ended just as the connection was lost, before its ack)."""
    if task_id in successful_requests:
        return True
    raw = backend.get(backend.get_key_for_task(task_id))
    try:
        status = json.loads(raw).get("status") if raw else None
    except (ValueError, AttributeError):
        return False  # not a result we can read: the gate decides
    return status in states.READY_STATES


def give_back(conn: Any, held: dict[str, str | None], *, finished: Callable[[str], bool]) -> dict[str, str | None]:
    """Put each held message back in its queue, or drop it when its task ``finished``; return those not done yet.

    A finished task's copy would only be refused by the gate as a replay (its nonce is done).
    """
    channel = conn.default_channel
    qos = channel.qos
    left = dict(held)
    restored = dropped = peers = 0
    try:
        restored += _put_back_unrecorded(channel)
        for tag, task_id in held.items():
            if task_id is not None and finished(task_id):
                qos.ack(tag)  # only its unacked entry is left to remove
                dropped += 1
            elif qos.restore_by_tag(tag, leftmost=False) is False:
                peers += 1  # a peer declared this worker dead and gave it back already
            else:
                restored += 1
            del left[tag]
    except (OperationalError, RedisError, OSError) as exc:
        log.warning("could not give back %d message(s) yet: %s", len(left), exc)
    if restored or dropped or peers:
        log.warning(
            "broker connection back: %d message(s) taken before it was lost put back in the queue "
            "(%d already done, dropped; %d given back by a peer already, left to it)",
            restored,
            dropped,
            peers,
            extra={"event": "unacked_restored", "restored": restored, "dropped": dropped, "peers": peers},
        )
    return left


def _put_back_unrecorded(channel: Any) -> int:
    """Push each :data:`UNRECORDED` message back to the front of its queue; how many."""
    done = 0
    while UNRECORDED:
        message = UNRECORDED[0]
        with channel.conn_or_acquire() as client:
            if client.hexists(channel.unacked_key, message.delivery_tag):  # recorded after all (the reply was lost)
                channel.qos.restore_by_tag(message.delivery_tag, client)
            else:
                info = message.delivery_info
                with client.pipeline() as pipe:
                    channel._do_restore_message(message._raw, info["exchange"], info["routing_key"], pipe)
                    pipe.execute()
        UNRECORDED.pop(0)
        done += 1
    return done


class CancellableRequest(LostWorkerRequest):
    """A task request that, cancelled because the broker connection was lost, stores no RETRY state.

    Its message is given back to the queue (:class:`RestoringConsumer`); storing RETRY would only wait for the
    lost broker (seconds per task) before the worker could reconnect. Celery does the same when it cancels
    late-acknowledged tasks at shutdown.
    """

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> Any:
        return super().cancel(pool, signal=signal, emit_retry=emit_retry and not self.task.acks_late)

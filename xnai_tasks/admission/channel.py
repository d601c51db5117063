"""The queue cap, checked atomically with the push: kombu's Redis channel whose ``_put`` runs one Lua script.

The script sums LLEN over every priority list of the queue and LPUSHes only while the sum is under the cap, so
no burst of producers gets past it (Redis runs a script alone). It touches only the queue's own lists, which
the pushing user may touch (the copilot's ACL selector allows EVALSHA, LLEN and LPUSH on role queues). A push
over the cap raises :class:`OverloadedError` with a retry-after from the role's recent throughput; nothing is
sent. Restores of unacked messages do not go through ``_put`` and are never refused.

Every Celery app of the project uses it (:class:`XnaiAMQP`); the caps come in the transport options
(``xnai_queue_caps``: queue -> cap, 0 or absent: no cap).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from types import MappingProxyType
from typing import Any, Final

import redis
from celery.app.amqp import AMQP
from kombu import Connection
from kombu.connection import ConnectionPool, PooledConnection
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps
from redis.commands.core import Script

from xnai_tasks.admission.throughput import recent_rate, retry_after_s
from xnai_tasks.core import constants as c
from xnai_tasks.core.channel_client import ReusedClientChannel
from xnai_tasks.errors import OverloadedError

#: KEYS: the queue's priority lists; ARGV: the cap, the index in KEYS of the list to push to, the message.
#: Returns {1, depth after} when pushed, {0, depth} when refused.
ADMIT_SCRIPT: Final = """
local depth = 0
for i = 1, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
if depth >= tonumber(ARGV[1]) then return {0, depth} end
redis.call('LPUSH', KEYS[tonumber(ARGV[2])], ARGV[3])
return {1, depth + 1}
"""


def admit(
    client: redis.Redis, keys: list[str], target: str, cap: int, payload: str, script: Script
) -> tuple[bool, int]:
    """Push ``payload`` to ``target`` (one of ``keys``) unless the lists hold ``cap`` or more; (pushed, depth).

    ``script``: :data:`ADMIT_SCRIPT` registered already (any client's: it runs on ``client``).
    """
    reply = script(keys=keys, args=[cap, keys.index(target) + 1, payload], client=client)
    return bool(int(reply[0])), int(reply[1])


def overloaded(client: redis.Redis, queue: str, cap: int, depth: int) -> OverloadedError:
    """The refusal of a push to a full queue, with the retry-after of the queue's role."""
    try:
        rate = recent_rate(client, queue)
    except redis.RedisError:
        rate = None
    retry = retry_after_s(depth, rate)
    return OverloadedError(
        f"refused (overloaded): the {queue} queue holds {depth} messages, its cap is {cap} "
        f"(XNAI_MAX_QUEUE_{queue.upper()} or XNAI_MAX_QUEUE); "
        f"nothing was sent, retry after {retry:g} s",
        role=queue,
        cap=cap,
        depth=depth,
        retry_after_s=retry,
    )


class AdmissionChannel(ReusedClientChannel, kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel whose pushes to a capped queue are refused beyond the cap (one client per pool)."""

    from_transport_options = (*kombu_redis.Channel.from_transport_options, "xnai_queue_caps")
    xnai_queue_caps: Mapping[str, int] = MappingProxyType({})

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        cap = int(self.xnai_queue_caps.get(queue) or 0)
        if cap <= 0:
            super()._put(queue, message, **kwargs)
            return
        target = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        keys = c.queue_keys(queue)
        with self.conn_or_acquire() as client:
            pushed, depth = admit(client, keys, target, cap, dumps(message), self._admit_script)
            if not pushed:
                raise overloaded(client, queue, cap, depth)

    @cached_property
    def _admit_script(self) -> Script:
        """:data:`ADMIT_SCRIPT`, made once (its SHA is computed once; it is loaded again if Redis forgot it)."""
        return self._create_client().register_script(ADMIT_SCRIPT)


class AdmissionTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`AdmissionChannel`."""

    Channel = AdmissionChannel


def admission_transport(transport: Any) -> Any:
    """:class:`AdmissionTransport` in place of kombu's Redis transport; any other transport as it is."""
    return AdmissionTransport if transport is kombu_redis.Transport else transport


class AdmissionConnection(Connection):  # type: ignore[misc]
    """A kombu connection that uses :class:`AdmissionTransport` where it would use kombu's Redis transport.

    Chosen by class, not by URL (``redis+socket://`` always names kombu's own), so its pool (Celery's producers
    take their connections from it) makes connections of the same kind.
    """

    def get_transport_cls(self) -> Any:
        return admission_transport(super().get_transport_cls())

    def Pool(self, limit: int | None = None, **kwargs: Any) -> ConnectionPool:
        return AdmissionConnectionPool(self, limit=limit, **kwargs)


class AdmissionPooledConnection(PooledConnection):  # type: ignore[misc]
    """A connection of :class:`AdmissionConnectionPool`."""

    def get_transport_cls(self) -> Any:
        return admission_transport(super().get_transport_cls())


class AdmissionConnectionPool(ConnectionPool):  # type: ignore[misc]
    """kombu's connection pool, whose connections use :class:`AdmissionTransport`."""

    def new(self) -> AdmissionPooledConnection:
        return AdmissionPooledConnection(self, **dict(self.connection._info(resolve=False)))


class XnaiAMQP(AMQP):  # type: ignore[misc]
    """Celery's AMQP helpers with :class:`AdmissionConnection`."""

    Connection = AdmissionConnection

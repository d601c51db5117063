"""Flower's queue lengths (``/api/queues/length``, the Broker page) on a Redis unix socket with ACL users.

Flower 2.2 reads queue lengths with a helper of its own chosen by the broker URL's scheme
(``flower.utils.broker.Broker``). Its ``redis+socket://`` helper passes the password but drops the user
name, so Redis takes the login as its ``default`` user, which is off here: every read failed and the API
answered HTTP 500. Flower has no option to choose that helper, so the Flower process (only: installed by
:func:`xnai_tasks.ops.flower.apply_flower_defaults`) uses :class:`SocketQueuesAsUser`, the same helper
logging in with the URL's user. A refusal or an unreachable Redis is an HTTP 503 saying so in one line.
"""

from __future__ import annotations

from typing import Any

from flower.utils import broker as flower_broker
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError, RedisError
from tornado.web import HTTPError

from xnai_tasks.security.redis_urls import url_db

#: The status of a queue-length read that Redis refused or did not answer (the broker, not Flower, failed).
UNAVAILABLE = 503


class SocketQueuesAsUser(flower_broker.RedisSocket):  # type: ignore[misc]
    """Flower's Redis unix-socket helper, logging in as the URL's user (Flower's own sends no user name)."""

    def __init__(self, broker_url: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(broker_url, *args, **kwargs)  # parses the URL; its client (never connected) is replaced
        self.redis = aioredis.Redis(
            unix_socket_path="/" + self.vhost,
            db=url_db(broker_url),
            username=self.username,
            password=self.password,
            socket_connect_timeout=self.socket_connect_timeout,
            socket_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )

    async def queues(self, names: Any) -> list[dict[str, Any]]:
        try:
            found: list[dict[str, Any]] = await super().queues(names)
        except NoPermissionError as exc:
            raise HTTPError(
                UNAVAILABLE,
                f"queue lengths: Redis refused LLEN to the {self.username} user ({exc}); "
                "on Redis 6.2 the flower user may not read queues (README, Redis ACLs)",
            ) from None
        except RedisError as exc:
            raise HTTPError(UNAVAILABLE, f"queue lengths: Redis refused or did not answer: {exc}") from None
        return found


def use_socket_helper_with_user() -> None:
    """Make this (Flower's) process read queue lengths over a unix socket with :class:`SocketQueuesAsUser`."""
    flower_broker.RedisSocket = SocketQueuesAsUser

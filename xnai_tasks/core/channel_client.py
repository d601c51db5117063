"""One Redis client per kombu channel, for the commands it sends outside its event loop.

kombu's Redis channel makes a new ``redis.Redis`` around the same connection pool for every such command (a
publish, a queue push, an unacked record, an ack): about 50 µs each, since redis-py builds its table of response
callbacks anew each time, several times per task. A client holds no connection of its own (each command takes
one from the pool), so one made once per pool serves them all; a new pool (kombu drops its pools after a lost
connection) gets a new one.
"""

from __future__ import annotations

from typing import Any


class ReusedClientChannel:
    """Mixed into a kombu Redis channel class (first): its synchronous client is made once per connection pool."""

    _xnai_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        create = super()._create_client  # type: ignore[misc]
        if asynchronous:
            return create(asynchronous=True)
        pool = self.pool  # type: ignore[attr-defined]
        client = self._xnai_client
        if client is None or client.connection_pool is not pool:
            client = self._xnai_client = create()
        return client

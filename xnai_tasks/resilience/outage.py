"""A wait that outlives a short broker outage (the embedded Redis restarted by ``xnai up``, a network cut).

A call that lost the broker is tried again, every :data:`RETRY_STEP_S`, within what is left of its timeout;
only when the broker is still away at the deadline is it :class:`BrokerUnreachableError` (CLI exit 6).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from kombu.exceptions import OperationalError
from redis import RedisError

from xnai_tasks.errors import BrokerUnreachableError

T = TypeVar("T")

#: What a lost broker raises, from redis-py, kombu or the socket.
BROKER_ERRORS = (RedisError, OperationalError, OSError)
#: Pause between two tries while the broker is away.
RETRY_STEP_S = 0.25
#: A wait with no timeout gives up when the broker has been away this long.
UNBOUNDED_OUTAGE_S = 60.0


def outlasting_outages(call: Callable[[float | None], T], timeout: float | None, *, waiting_for: str) -> T:
    """``call(remaining)`` until it returns, again after each lost broker while time is left.

    ``remaining`` is what is left of ``timeout`` (None: no limit). A call's own errors, a timeout included,
    are the caller's.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    lost_since: float | None = None
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return call(remaining)
        except BROKER_ERRORS as exc:
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            if _give_up(now, deadline, lost_since):
                raise BrokerUnreachableError(f"lost the broker while waiting for {waiting_for}: {exc}") from None
        time.sleep(RETRY_STEP_S)


def _give_up(now: float, deadline: float | None, lost_since: float) -> bool:
    if deadline is None:
        return now - lost_since >= UNBOUNDED_OUTAGE_S
    return now + RETRY_STEP_S >= deadline

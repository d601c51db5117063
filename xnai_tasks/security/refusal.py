"""Why a message, result or control command was refused: the one set of reason codes.

Everything on the verification path (message, result and control signatures, the replay ledger, the
envelope check, the gate) either returns what it verified or raises
:class:`~xnai_tasks.errors.MessageRejected` with a :class:`Reason` and a one-line detail. A reason's value
is what is written to the refused counters, the dead letters and the logs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final


class Reason(StrEnum):
    """Why something was refused; the values are the counter names."""

    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    BAD_SIGNATURE = "bad_signature"
    NOT_AUTHORIZED = "not_authorized"
    WRONG_QUEUE = "wrong_queue"
    EXPIRED = "expired"
    FUTURE = "future"
    REPLAY = "replay"
    #: Its ``expires`` (the caller's deadline) passed before a worker took it: nobody waits for it any more.
    DEADLINE = "deadline"
    #: Not a verdict on the message: its workers kept dying (``worker/deliveries.py``), so it is given up on.
    WORKER_LOST = "worker_lost"


#: Every reason a message can be refused for at the door (all but ``worker_lost``), for counters and dashboards.
REASONS: Final = tuple(r.value for r in Reason if r is not Reason.WORKER_LOST)


def show(value: Any) -> str:
    """A short, one-line, escaped rendering of untrusted input for refusal details."""
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."

"""What a final result means to a caller, and whether its signer is the role the task was sent to.

Shared by the sync :class:`~xnai_tasks.client.sync.TaskHandle` and the async handle, so both refuse and
raise alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celery import states

from xnai_tasks.errors import (
    BreakerOpenError,
    MessageRejected,
    ModelUnavailableError,
    OverBudgetError,
    PoolBusyError,
    RefusedError,
    TaskFailedError,
    TaskRevokedError,
)
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.result_signature import verify_result
from xnai_tasks.security.results import VERIFIED, VerifiedBy
from xnai_tasks.security.signature import SIG_HEADER

#: Errors a task raises to refuse work (the model cannot run here, over the RAM budget), and the one a worker
#: stores for a message its gate refused: the caller is refused (CLI exit 3), not told that the task failed.
REFUSALS = frozenset(
    cls.__name__
    for cls in (
        RefusedError,
        ModelUnavailableError,
        OverBudgetError,
        MessageRejected,
        BreakerOpenError,
        PoolBusyError,
    )
)


def verify_signer(
    keyring: Keyring, meta: Mapping[str, Any], *, task_id: str, role: str, stored: Callable[[], Mapping[str, Any]]
) -> None:
    """The result in ``meta`` must be signed by ``role``'s key; ResultSignatureError otherwise.

    ``stored`` reads the result as stored (JSON), for a result Celery already rebuilt into an exception.
    """
    checked = meta.get(VERIFIED)
    if isinstance(checked, VerifiedBy) and checked.agent == role:
        return  # its signature was checked when it arrived on the result channel: once is enough
    if isinstance(meta.get("result"), BaseException):
        meta = stored()
    verify_result(
        keyring,
        task_id=task_id,
        status=str(meta.get("status")),
        result=meta.get("result"),
        signature=meta.get(SIG_HEADER),
        agent=role,
    )


def settle(label: str, state: str, value: Any) -> Any:
    """The value of a final result; RefusedError, TaskRevokedError or TaskFailedError for one that is not."""
    if state == states.REVOKED and str(value) == "expired":  # Celery's own expiry in the worker
        raise RefusedError(f"{label} refused (deadline): it expired before it ran")
    if state == states.REVOKED:
        raise TaskRevokedError(f"{label} was revoked: {describe(value)}")
    if state == states.FAILURE:
        if type(value).__name__ in REFUSALS:
            raise RefusedError(f"{label} refused: {value}")
        raise TaskFailedError(f"{label} failed: {describe(value)}")
    return value


def describe(error: Any) -> str:
    """An error as ``Type: text``; anything else as its text."""
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)

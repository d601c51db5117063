"""One error tree. Every error the project raises on purpose is an :class:`XnaiError`.

Each class carries the CLI exit code fixed in the README's CLI section, so the CLI maps an error to its code
without a lookup table: 2 usage, 3 refused, 4 task failed, 5 timed out, 6 broker unreachable.
"""

from __future__ import annotations


class XnaiError(Exception):
    """Base of every error raised by xnai-tasks; ``str(err)`` is one line meant for a person."""

    exit_code: int = 1


class UsageError(XnaiError):
    """The caller asked for something that does not exist or is malformed."""

    exit_code = 2


class SettingsError(UsageError):
    """A setting (environment variable) has a bad value; the message names the variable."""


class UnknownRoleError(UsageError):
    """No such role."""


class UnknownTaskError(UsageError):
    """The role has no such task."""


class RefusedError(XnaiError):
    """The system refused the work: overloaded, or the sender is not authorized."""

    exit_code = 3


class OverloadedError(RefusedError):
    """The role's queue is at its cap (``XNAI_MAX_QUEUE``): nothing was sent; try again after ``retry_after_s``."""

    def __init__(self, message: str, *, role: str, cap: int, depth: int, retry_after_s: float) -> None:
        super().__init__(message)
        self.role = role
        self.cap = cap
        self.depth = depth
        self.retry_after_s = retry_after_s


class NoWorkerError(RefusedError):
    """Asked to be refused when no worker of the role is online, and none is: nothing was sent."""


class TaskFailedError(XnaiError):
    """The task ran and raised; the message carries the remote error type and text."""

    exit_code = 4


class TaskRevokedError(TaskFailedError):
    """The task was revoked (cancelled) before it could finish."""


class TaskTimeoutError(XnaiError):
    """No result arrived within the timeout. The task may still run."""

    exit_code = 5


class BrokerUnreachableError(XnaiError):
    """Redis did not answer."""

    exit_code = 6


class BenchRegressionError(XnaiError):
    """A benchmark ratio is worse than its committed baseline by more than the gate allows (``make bench``)."""


class RedisServerError(XnaiError):
    """The embedded redis-server could not be found, started or stopped."""


class ProcessError(XnaiError):
    """A supervised process (worker, Flower, Redis) failed to start or died."""


class TransientError(XnaiError):
    """A passing failure inside a task (a resource briefly unavailable): the task is retried with backoff."""


class MessageRejected(RefusedError):
    """A task message failed verification; ``reason`` is a ``security.refusal.Reason`` value (a counter name)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = str(reason)
        self.detail = " ".join(detail.split())

    def __str__(self) -> str:
        return f"refused ({self.reason}): {self.detail}"


class ResultSignatureError(XnaiError):
    """A task result is unsigned, forged or tampered with."""

    exit_code = 3


class KeyringError(UsageError):
    """The keyring or a private key file is missing, malformed or has unsafe permissions."""


class ModelError(XnaiError):
    """A model is missing, truncated, fails its checksum or cannot be loaded; the message says which."""


class OverBudgetError(RefusedError):
    """Loading a model now would exceed the RAM available; refused rather than swapping or OOM."""


class ModelUnavailableError(RefusedError):
    """A model cannot run on this host (its probe crashed or hung with every set of options)."""


class BreakerOpenError(RefusedError):
    """The role's circuit breaker for a model is open (the LLM kept failing): refused without running it."""


class PoolBusyError(RefusedError):
    """Every lease on a model on this host stayed taken for as long as a caller may wait (``XNAI_POOL_WAIT``)."""


class PromptTooLongError(ModelError):
    """A prompt does not fit the model's context: the caller's input, not a failure of the model."""


class WorkerLostError(TaskFailedError):
    """A task's worker process died running it ``XNAI_MAX_DELIVERIES`` times: it was failed and dead-lettered."""


class UnknownWorkflowError(UsageError):
    """No workflow of that name (xnai_tasks/workflow)."""


class WorkflowFailedError(TaskFailedError):
    """A required step of a workflow failed, was refused or timed out; its remaining steps were cancelled."""

    def __init__(self, message: str, *, step: str = "", run_id: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.run_id = run_id

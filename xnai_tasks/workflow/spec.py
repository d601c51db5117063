"""How a workflow is declared: a :class:`Step` (which role runs which task, with what, for how long) and a
:class:`Workflow` (a name and the function deciding between steps). The known ones are listed in
:mod:`xnai_tasks.workflow.catalogue`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from xnai_tasks.errors import UsageError

#: Seconds a step may take unless it says otherwise.
DEFAULT_STEP_TIMEOUT_S = 120.0

#: ``async def driver(run, **kwargs)``: it awaits only its run's ``step`` and ``parallel`` (a sync run's never
#: suspend, so the same driver runs in a thread or in an event loop: workflow/run.py, workflow/async_run.py).
Driver = Callable[..., Coroutine[Any, Any, dict[str, Any]]]


@dataclass(frozen=True)
class Step:
    """One task of a workflow: ``role.task(**kwargs)``, waited for at most ``timeout_s``.

    An ``optional`` step that fails, is refused or times out is skipped (and the run says so); a required
    one fails the workflow.
    """

    name: str
    role: str
    task: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    optional: bool = False


@dataclass(frozen=True)
class Workflow:
    """A named workflow: its driver ``await driver(run, **kwargs)`` returns the workflow's result."""

    name: str
    driver: Driver

    @property
    def summary(self) -> str:
        """The first line of the driver's docstring."""
        return (self.driver.__doc__ or self.name).strip().splitlines()[0]

    def check(self, kwargs: Mapping[str, Any]) -> None:
        """UsageError unless ``kwargs`` fit the driver's parameters (after ``run``)."""
        signature = inspect.signature(self.driver)
        try:
            signature.bind(None, **kwargs)
        except TypeError as exc:
            params = ", ".join(list(signature.parameters)[1:])
            raise UsageError(f"workflow {self.name} takes {params}: {exc}") from None


__all__ = ["DEFAULT_STEP_TIMEOUT_S", "Driver", "Step", "Workflow"]

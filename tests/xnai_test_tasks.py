"""Tasks only the tests load, through ``XNAI_TASK_MODULES=xnai_test_tasks``: they kill their own process, or
fail an LLM call on purpose.

Each run appends one line (its pid) to ``runs_file``, so a test can count how often a message was run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from xnai_tasks.worker.role_task import RoleTask, role_task


def _record_run(runs_file: str | None) -> int:
    if runs_file is None:
        return 0
    with open(runs_file, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    return len(Path(runs_file).read_text(encoding="utf-8").splitlines())


@role_task("curation")
def die(self: RoleTask, how: str = "SIGKILL", runs_file: str | None = None, times: int | None = None) -> dict[str, Any]:
    """Kill this process with the signal ``how`` (``os._exit`` for "exit") on the first ``times`` runs (None: all)."""
    runs = _record_run(runs_file)
    if times is None or runs <= times:
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), getattr(signal, how))
        time.sleep(30)  # a caught or delayed signal must not let the task finish
    return {"runs": runs, "pid": os.getpid()}


@role_task("curation")
def nap(self: RoleTask, seconds: float, runs_file: str | None = None) -> dict[str, Any]:
    """Sleep, then answer: a task that is running when its whole worker is killed."""
    runs = _record_run(runs_file)
    time.sleep(seconds)
    return {"runs": runs, "pid": os.getpid()}


def _register_llm_call(role: str) -> None:
    def llm_call(
        self: RoleTask, fail: bool = True, seconds: float = 0.0, runs_file: str | None = None
    ) -> dict[str, Any]:
        """A stand-in LLM call of the role's model through the real guard (breaker and pool): it fails if ``fail``."""
        from xnai_tasks.resilience.llm_guard import guarded
        from xnai_tasks.worker import startup as runtime

        def call() -> dict[str, Any]:
            runs = _record_run(runs_file)
            time.sleep(seconds)
            if fail:
                raise RuntimeError("the stand-in LLM failed on purpose")
            return {"runs": runs, "pid": os.getpid()}

        return guarded(role, runtime.registry(role).llm.model.name, call)

    role_task(role)(llm_call)


for _role in ("cline", "grok"):
    _register_llm_call(_role)

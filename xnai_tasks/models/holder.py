"""A model held in one of three modes (preloaded before fork, lazy, none), and the RAM cap lazy loads share."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from xnai_tasks.errors import ModelError, ModelUnavailableError, OverBudgetError
from xnai_tasks.models.model_file import ModelFile
from xnai_tasks.plan.planner import ModelMode

log = logging.getLogger(__name__)

#: Free RAM kept on top of a model's expected footprint before a lazy load is allowed.
DEFAULT_RAM_MARGIN_BYTES = 256 * 1024 * 1024
DEFAULT_KEEP_ALIVE_SECONDS = 300.0
_MiB = 1024 * 1024

T = TypeVar("T")


class ModelHolder(Generic[T]):
    """One model in one of three modes: preloaded (before fork), lazy (loaded on use, idle-unloaded), none.

    Lazy loads check psutil's available RAM first and raise :class:`OverBudgetError` when the model's
    expected footprint plus a margin does not fit. Use :meth:`use` around inference so an idle unload
    never drops a model that is in use.
    """

    def __init__(
        self,
        model: ModelFile,
        loader: Callable[[], T],
        mode: ModelMode,
        *,
        keep_alive: float = DEFAULT_KEEP_ALIVE_SECONDS,
        margin_bytes: int = DEFAULT_RAM_MARGIN_BYTES,
        available_ram: Callable[[], int] | None = None,
        budget: RamBudget | None = None,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.model = model
        #: Told True after a load and False after an unload in this process (the ``xnai_model_loaded`` gauge).
        self._on_change = on_change
        self.budget = budget
        if budget is not None:
            budget.holders.append(self)
        self.mode = mode
        self.keep_alive = keep_alive
        self.margin_bytes = margin_bytes
        self._loader = loader
        self._available_ram = available_ram or system_available_ram
        self._value: T | None = None
        self._users = 0
        self._loads = 0
        self._last_used = time.monotonic()
        self._load_seconds = 0.0
        #: llama.cpp load options the probe chose (LLM only), and why the model cannot run here, if it cannot.
        self.load_options: dict[str, Any] = {}
        self.probe: dict[str, Any] | None = None
        self.unavailable: str | None = None
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: locks and threads of the parent are not ours
            self._reset_process_state()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def apply_probe(self, verdict: Mapping[str, Any]) -> None:
        """Serve with the options a probe verdict chose, or mark the model unavailable with its reason."""
        self.probe = {"status": verdict["status"], "reason": verdict["reason"], "cached": verdict.get("cached", False)}
        options = verdict.get("options")
        if options is None:
            self.unavailable = str(verdict["reason"])
            self.load_options = {}
        else:
            self.unavailable = None
            self.load_options = dict(options)

    def load(self) -> T:
        """Load now if not loaded (checks the RAM budget first)."""
        self._check_pid()
        with self._lock:
            if self._value is None:
                if self.mode == "none":
                    raise ModelError(f"model {self.model.name} is disabled for this role (mode none)")
                if self.unavailable is not None:
                    raise ModelUnavailableError(f"model {self.model.name} {self.unavailable}")
                self._check_budget()
                start = time.monotonic()
                self._value = self._loader()
                self._load_seconds = time.monotonic() - start
                self._loads += 1
                self._changed(True)
                if self.mode == "lazy":
                    self._start_reaper()
            self._last_used = time.monotonic()
            return self._value

    def get(self) -> T:
        """The model, loading it first if needed."""
        return self.load()

    @contextlib.contextmanager
    def use(self) -> Iterator[T]:
        """The model, protected from an idle unload while the block runs."""
        with self._lock:
            value = self.load()
            self._users += 1
        try:
            yield value
        finally:
            with self._lock:
                self._users -= 1
                self._last_used = time.monotonic()

    def unload(self) -> None:
        """Drop the model (memory is freed once no caller holds it)."""
        self._check_pid()
        with self._lock:
            was_loaded, self._value = self._value is not None, None
        gc.collect()
        if was_loaded:
            self._changed(False)

    def unload_if_idle(self, now: float | None = None) -> bool:
        """Unload a lazy model idle for ``keep_alive`` seconds; True when it did."""
        self._check_pid()
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = self._value is not None and self._users == 0 and now - self._last_used >= self.keep_alive
            if not idle or self.mode != "lazy":
                return False
            self._value = None
        gc.collect()
        self._changed(False)
        log.info("unloaded idle model %s", self.model.name)
        return True

    def _changed(self, loaded: bool) -> None:
        if self._on_change is not None:
            self._on_change(loaded)

    def close(self) -> None:
        """Stop the idle reaper and unload."""
        self._stop.set()
        self.unload()

    def describe(self) -> dict[str, Any]:
        """What the health task reports."""
        return {
            "name": self.model.name,
            "kind": self.model.kind,
            "mode": self.mode,
            "loaded": self.loaded,
            "path": str(self.model.path),
            "size_bytes": self.model.size_bytes,
            "ram_bytes": self.model.ram_bytes,
            "checksum_checked": self.model.checked,
            "loads": self._loads,
            "load_seconds": round(self._load_seconds, 3),
            "idle_seconds": round(time.monotonic() - self._last_used, 1),
            "load_options": dict(self.load_options),
            "probe": self.probe,
            "unavailable": self.unavailable,
        }

    def _check_budget(self) -> None:
        if self.budget is not None and self.mode == "lazy":
            self.budget.check(self)
        available = self._available_ram()
        need = self.model.ram_bytes + self.margin_bytes
        if available < need:
            raise OverBudgetError(
                f"loading {self.model.name} needs ~{need // _MiB} MiB (model + margin), "
                f"only {available // _MiB} MiB available: refused"
            )

    def _start_reaper(self) -> None:
        if self._reaper is not None and self._reaper.is_alive():
            return
        interval = max(0.05, min(30.0, self.keep_alive / 2))

        def reap() -> None:
            while not self._stop.wait(interval):
                self.unload_if_idle()

        self._reaper = threading.Thread(target=reap, name=f"xnai-unload-{self.model.name}", daemon=True)
        self._reaper.start()


class RamBudget:
    """A cap on the lazily loaded models one process holds at once (``XNAI_MODEL_RAM_MB``)."""

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self.holders: list[ModelHolder[Any]] = []

    def held_bytes(self, besides: ModelHolder[Any] | None = None) -> int:
        """Expected RAM of the models loaded now (other than ``besides``)."""
        return sum(h.model.ram_bytes for h in self.holders if h is not besides and h.loaded)

    def check(self, holder: ModelHolder[Any]) -> None:
        """Raise :class:`OverBudgetError` when loading ``holder`` would go over the cap."""
        if self.limit_bytes is None:
            return
        held = self.held_bytes(besides=holder)
        if held + holder.model.ram_bytes > self.limit_bytes:
            raise OverBudgetError(
                f"loading {holder.model.name} needs ~{holder.model.ram_bytes // _MiB} MiB on top of "
                f"{held // _MiB} MiB loaded, over this process's cap of {self.limit_bytes // _MiB} MiB "
                f"(XNAI_MODEL_RAM_MB): refused"
            )


def system_available_ram() -> int:
    """RAM the OS could give this process now (psutil's *available*)."""
    import psutil

    return int(psutil.virtual_memory().available)

"""Find out, before a worker forks, whether its LLM runs on this host, and with which llama.cpp options.

A CPU may advertise instructions its VM does not allow (AMX under a hypervisor that does not enable
it), and a llama.cpp built for another machine may use instructions this one lacks. Either kills the
process that generates, by a signal, at the first matrix multiply. So the worker parent never finds out
by crashing: it runs :mod:`xnai_tasks.models.probe_runner` in a separate process (a fresh interpreter, never a
fork: see the OpenMP hang) with the load options the children will use, and reads its fate:

* the runner printed real text: those options work;
* it died by a signal, timed out, failed, or printed garbage: try the next set of options.

Option sets, in order: llama.cpp's defaults, then the safe set (``use_extra_bufts=False``: no weight
repacking into the AMX/AVX-512 "extra buffer types", where the crash was seen). ``XNAI_LLM_SAFE=on``
tries only the safe set; ``off`` trusts the defaults and probes nothing.

The verdict is remembered in ``XNAI_HOME/models/probe-verdicts.json`` under a key made of the model's
sha256, the llama-cpp-python version and build, the CPU's flags, the runner and the mode, so a restart
does not pay for it again; a verdict that a timeout decided is not remembered (it may be load, not the CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from xnai_tasks.core.files import read_json_object, write_json_atomic
from xnai_tasks.models.ggml import ggml_backend_libraries
from xnai_tasks.models.model_file import ModelFile, models_dir
from xnai_tasks.settings import Settings

log = logging.getLogger(__name__)

VERDICTS_FILE = "probe-verdicts.json"
#: llama.cpp's own choices.
DEFAULT_OPTIONS: dict[str, Any] = {}
#: Weight repacking off: the AMX / AVX-512 "extra buffer type" kernels are never picked.
SAFE_OPTIONS: dict[str, Any] = {"use_extra_bufts": False}

Outcome = Literal["ok", "signal", "timeout", "failed", "garbage"]
Status = Literal["ok", "safe", "unavailable", "unchecked"]


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One run of the probe runner with one set of options, and what became of it."""

    label: str
    options: dict[str, Any]
    outcome: Outcome
    detail: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """Whether and how an LLM may be served on this host.

    ``options`` are the load options to serve with; None when the model is unavailable (``reason`` says why).
    """

    status: Status
    options: dict[str, Any] | None
    reason: str
    key: str
    attempts: list[Attempt] = field(default_factory=list)
    cached: bool = False

    @property
    def usable(self) -> bool:
        return self.options is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        attempts = [Attempt(**a) for a in data.get("attempts", [])]
        return cls(
            status=data["status"],
            options=data["options"],
            reason=str(data["reason"]),
            key=str(data["key"]),
            attempts=attempts,
            cached=bool(data.get("cached", False)),
        )


def option_sets(mode: str) -> list[tuple[str, dict[str, Any]]]:
    """The (label, options) pairs to try, in order, for an ``XNAI_LLM_SAFE`` mode."""
    if mode == "on":
        return [("safe", dict(SAFE_OPTIONS))]
    return [("default", dict(DEFAULT_OPTIONS)), ("safe", dict(SAFE_OPTIONS))]


def cpu_flags() -> str:
    """The CPU's feature flags as the kernel reports them (the first ``flags``/``Features`` line)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return " ".join(sorted(value.split()))
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def llama_build() -> str:
    """llama-cpp-python's version and whether it is a portable (runtime-dispatch) build."""
    try:
        import llama_cpp
    except ImportError:
        return "not installed"
    variants = ggml_backend_libraries()
    kind = f"portable:{len(variants)}" if variants else "native"
    return f"{llama_cpp.__version__}/{kind}"


def verdict_key(model: ModelFile, settings: Settings) -> str:
    """What a verdict depends on: the model's bytes, the llama.cpp build, the CPU, the runner, the mode."""
    if model.sha256 is not None:
        identity = model.sha256
    else:
        st = model.path.stat()
        identity = f"{model.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    parts = [identity, llama_build(), cpu_flags(), settings.llm_probe_runner, settings.llm_safe]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class VerdictStore:
    """Verdicts under ``XNAI_HOME/models``, one JSON file, replaced atomically."""

    def __init__(self, settings: Settings) -> None:
        self.path = models_dir(settings) / VERDICTS_FILE

    def get(self, key: str) -> Verdict | None:
        raw = read_json_object(self.path).get(key)
        if not isinstance(raw, dict):
            return None
        try:
            found = Verdict.from_dict(raw)
        except (KeyError, TypeError):
            return None
        return replace(found, cached=True)

    def put(self, verdict: Verdict) -> None:
        data = read_json_object(self.path)
        data[verdict.key] = verdict.as_dict() | {"checked_at": time.time()}
        try:
            write_json_atomic(self.path, data)
        except OSError as exc:
            log.warning("cannot remember the probe verdict in %s: %s", self.path, exc)


def probe_llm(settings: Settings, model: ModelFile, threads: int) -> Verdict:
    """The verdict for serving ``model`` here with ``threads`` threads: remembered, or probed now."""
    key = verdict_key(model, settings)
    if settings.llm_safe == "off":
        return Verdict(
            status="unchecked", options=dict(DEFAULT_OPTIONS), reason="XNAI_LLM_SAFE=off: not probed", key=key
        )
    store = VerdictStore(settings)
    remembered = store.get(key)
    if remembered is not None:
        return remembered
    attempts: list[Attempt] = []
    verdict: Verdict | None = None
    for label, options in option_sets(settings.llm_safe):
        attempt = run_attempt(settings, model.path, label, options, threads)
        attempts.append(attempt)
        log.info("LLM probe of %s with %s options: %s (%s)", model.name, label, attempt.outcome, attempt.detail)
        if attempt.outcome == "ok":
            status: Status = "ok" if label == "default" else "safe"
            failed = "; ".join(f"{a.label} options: {a.detail}" for a in attempts[:-1])
            reason = f"runs with {label} options" + (f" ({failed})" if failed else "")
            verdict = Verdict(status=status, options=options, reason=reason, key=key, attempts=attempts)
            break
    if verdict is None:
        reason = "cannot run on this host: " + "; ".join(f"{a.label} options: {a.detail}" for a in attempts)
        verdict = Verdict(status="unavailable", options=None, reason=reason, key=key, attempts=attempts)
    if all(a.outcome != "timeout" for a in attempts):
        store.put(verdict)
    return verdict


def run_attempt(settings: Settings, path: Path, label: str, options: dict[str, Any], threads: int) -> Attempt:
    """Run the probe runner once in a process of its own and judge what it did."""
    argv = [
        sys.executable,
        "-m",
        settings.llm_probe_runner,
        "--model",
        str(path),
        "--options",
        json.dumps(options, sort_keys=True),
        "--threads",
        str(max(1, threads)),
    ]
    start = time.monotonic()
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=settings.llm_probe_timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        detail = f"no answer within {settings.llm_probe_timeout} s (killed)"
        return Attempt(label=label, options=options, outcome="timeout", detail=detail, seconds=_since(start))
    seconds = _since(start)
    if done.returncode < 0:
        name = _signal_name(-done.returncode)
        return Attempt(label=label, options=options, outcome="signal", detail=f"died by {name}", seconds=seconds)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]
        return Attempt(label=label, options=options, outcome="failed", detail=f"failed: {last}", seconds=seconds)
    text = _reported_text(done.stdout)
    if text is None or not looks_like_text(text):
        shown = "nothing" if text is None else repr(text[:60])
        return Attempt(label=label, options=options, outcome="garbage", detail=f"returned {shown}", seconds=seconds)
    return Attempt(
        label=label, options=options, outcome="ok", detail=f"generated {text.strip()[:60]!r}", seconds=seconds
    )


def looks_like_text(text: str) -> bool:
    """True for a short generation a person could read: not empty, mostly printable, not one repeated character."""
    stripped = text.strip()
    if not stripped:
        return False
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in stripped)
    if printable / len(stripped) < 0.9 or "\ufffd" in stripped:
        return False
    return len(set(stripped)) > 1 or len(stripped) == 1


def _reported_text(stdout: str) -> str | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict) and isinstance(report.get("text"), str):
            return str(report["text"])
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _since(start: float) -> float:
    return round(time.monotonic() - start, 3)

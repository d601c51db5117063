"""The LLM probe: a model that cannot run on this host is found at start, in a separate process.

The runners in ``tests/probe_runners`` stand in for llama.cpp failing the way it does on a CPU that
advertises AMX a VM does not allow (SIGILL), hangs, or computes garbage: unless weight repacking is off,
where they hand over to the real runner and the real default model. One always crashes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from xnai_tasks.models import ModelFile, resolve_model
from xnai_tasks.models import probe as llm_probe
from xnai_tasks.models.probe import SAFE_OPTIONS, VerdictStore, looks_like_text, probe_llm, verdict_key
from xnai_tasks.settings import Settings

TESTS_DIR = str(Path(__file__).resolve().parent)


@pytest.fixture
def probe_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runners log each run here; they are found on PYTHONPATH like the worker finds them."""
    log = tmp_path / "probe.log"
    monkeypatch.setenv("XNAI_TEST_PROBE_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)
    return log


@pytest.fixture(scope="module")
def models_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    yield Settings(home=tmp_path_factory.mktemp("xnai-probe"))


@pytest.fixture(scope="module")
def gguf(models_home: Settings) -> ModelFile:
    return resolve_model("gguf", models_home)


def with_runner(settings: Settings, runner: str, tmp_path: Path, **changes: object) -> Settings:
    """Settings on a fresh home (no remembered verdict) whose probe runs ``probe_runners.RUNNER``."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return replace(settings, home=home, llm_probe_runner=f"probe_runners.{runner}", **changes)  # type: ignore[arg-type]


def runs(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ---------------------------------------------------------------- pure logic


@pytest.mark.parametrize(
    ("text", "readable"),
    [(" red, blue and yellow.", True), ("", False), ("   ", False), ("\ufffd\ufffd", False), ("!!!!!!!!", False)],
)
def test_garbage_is_told_from_text(text: str, readable: bool) -> None:
    assert looks_like_text(text) is readable


def test_the_verdict_key_depends_on_model_build_cpu_and_mode(
    models_home: Settings, gguf: ModelFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the key of a verdict on this host
    key = verdict_key(gguf, models_home)
    # Then another mode, another CPU, another model or another llama.cpp build each have their own
    assert verdict_key(gguf, replace(models_home, llm_safe="on")) != key
    assert verdict_key(replace(gguf, sha256="0" * 64), models_home) != key
    monkeypatch.setattr(llm_probe, "cpu_flags", lambda: "fpu sse2")
    assert verdict_key(gguf, models_home) != key
    monkeypatch.undo()
    monkeypatch.setattr(llm_probe, "llama_build", lambda: "0.0.1/native")
    assert verdict_key(gguf, models_home) != key


# ---------------------------------------------------------------- the probe, in real processes


@pytest.mark.slow
def test_a_runner_that_crashes_leads_to_the_safe_options(
    models_home: Settings, gguf: ModelFile, probe_log: Path, tmp_path: Path
) -> None:
    # Given a runner that dies by SIGILL unless weight repacking is off
    settings = with_runner(models_home, "crash_unless_safe", tmp_path)
    # When the model is probed
    verdict = probe_llm(settings, gguf, 2)
    # Then the default options died by SIGILL and the model is served with the safe ones
    assert verdict.status == "safe" and verdict.options == SAFE_OPTIONS
    assert [a.outcome for a in verdict.attempts] == ["signal", "ok"]
    assert "died by SIGILL" in verdict.reason
    assert runs(probe_log) == [{}, SAFE_OPTIONS]
    # And a restart does not pay for it again: the verdict is remembered, no runner runs
    again = probe_llm(settings, gguf, 2)
    assert again.cached and again.options == SAFE_OPTIONS
    assert len(runs(probe_log)) == 2


@pytest.mark.slow
def test_a_runner_that_hangs_is_killed_and_not_remembered(
    models_home: Settings, gguf: ModelFile, probe_log: Path, tmp_path: Path
) -> None:
    # Given a runner that hangs unless weight repacking is off, and a 15 s probe timeout (the safe run must
    # finish within it even on a busy 2-core machine: loading and 8 tokens took up to ~8 s there)
    settings = with_runner(models_home, "hang_unless_safe", tmp_path, llm_probe_timeout=15)
    # When the model is probed
    verdict = probe_llm(settings, gguf, 2)
    # Then the hang was cut off and the safe options serve
    assert [a.outcome for a in verdict.attempts] == ["timeout", "ok"]
    assert verdict.options == SAFE_OPTIONS and "no answer within 15 s" in verdict.reason
    # And a verdict a timeout decided is not remembered (the host may only have been busy)
    assert VerdictStore(settings).get(verdict.key) is None


@pytest.mark.slow
def test_a_runner_that_returns_garbage_leads_to_the_safe_options(
    models_home: Settings, gguf: ModelFile, probe_log: Path, tmp_path: Path
) -> None:
    settings = with_runner(models_home, "garbage_unless_safe", tmp_path)
    verdict = probe_llm(settings, gguf, 2)
    assert [a.outcome for a in verdict.attempts] == ["garbage", "ok"]
    assert verdict.status == "safe"


def test_a_model_that_crashes_with_every_option_is_unavailable_with_its_reason(
    models_home: Settings, gguf: ModelFile, probe_log: Path, tmp_path: Path
) -> None:
    # Given a runner that dies whatever the options
    settings = with_runner(models_home, "always_crash", tmp_path)
    # When the model is probed
    verdict = probe_llm(settings, gguf, 2)
    # Then it is unavailable, and the reason says what happened with each set of options, in one line
    assert verdict.status == "unavailable" and verdict.options is None and not verdict.usable
    assert verdict.reason == ("cannot run on this host: default options: died by SIGILL; safe options: died by SIGILL")
    assert VerdictStore(settings).get(verdict.key) is not None  # a crash is the CPU's answer: remembered


def test_xnai_llm_safe_on_tries_only_the_safe_options_and_off_probes_nothing(
    models_home: Settings, gguf: ModelFile, probe_log: Path, tmp_path: Path
) -> None:
    on = with_runner(models_home, "always_crash", tmp_path, llm_safe="on")
    assert [a.label for a in probe_llm(on, gguf, 1).attempts] == ["safe"]
    assert runs(probe_log) == [SAFE_OPTIONS]
    off = with_runner(models_home, "always_crash", tmp_path, llm_safe="off")
    verdict = probe_llm(off, gguf, 1)
    assert verdict.status == "unchecked" and verdict.options == {} and verdict.attempts == []
    assert len(runs(probe_log)) == 1


@pytest.mark.slow
def test_the_real_default_model_is_served_with_options_that_work_here(models_home: Settings, gguf: ModelFile) -> None:
    # Given the real runner and the real default model
    verdict = probe_llm(models_home, gguf, 2)
    # Then some set of options generates real text on this host
    assert verdict.usable, verdict.reason
    assert verdict.attempts[-1].outcome == "ok" and "generated" in verdict.attempts[-1].detail
    # And where the defaults failed (e.g. a CPU that advertises AMX the VM does not allow), it says how
    if verdict.status == "safe":
        assert verdict.attempts[0].outcome in ("signal", "timeout", "garbage", "failed")

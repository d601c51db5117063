"""``make demo`` tells a user within seconds when a role cannot do its work, instead of waiting minutes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from xnai_tasks.settings import Settings

from support import free_port, run_xnai, short_home

TESTS_DIR = str(Path(__file__).resolve().parent)


@pytest.mark.slow
def test_the_demo_stops_at_once_with_the_reason_when_the_llm_cannot_run() -> None:
    # Given a host where the LLM's probe dies by SIGILL with every set of options
    settings = Settings(home=short_home(), flower_port=free_port())
    env = {"PYTHONPATH": TESTS_DIR, "XNAI_LLM_PROBE_RUNNER": "probe_runners.always_crash"}
    try:
        # When the demo runs
        done = run_xnai(["demo"], settings, env=env, timeout=240)
    finally:
        shutil.rmtree(settings.home, ignore_errors=True)
    # Then it stops with exit 3 and one line saying which role cannot work and why
    assert done.returncode == 3, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "stopped: cline cannot generate" in last and "died by SIGILL" in last, done.stdout
    # And every step line carries the seconds since the start
    steps = [line for line in done.stdout.splitlines() if re.match(r"\[\s*\d+\.\d s\] ", line)]
    assert len(steps) >= 3 and steps[-1] == last
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_the_demo_prints_only_its_own_story() -> None:
    # Given a fresh home
    settings = Settings(home=short_home(), flower_port=free_port())
    try:
        # When the whole demo runs
        done = run_xnai(["demo"], settings, timeout=400)
        logs = sorted(path.name for path in (settings.home / "logs").iterdir())
    finally:
        shutil.rmtree(settings.home, ignore_errors=True)
    # Then it succeeds in at most about 60 lines, says where the processes' own output went, and shows none of it
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert len(out.splitlines()) <= 60, out
    assert f"their output and logs: {settings.home / 'logs'}" in out
    for noise in ("Traceback", "Exception ignored", "SecurityWarning", "[tasks]", "celery@", "succeeded in", "WARNING"):
        assert noise not in out, noise
    # And that output is in the logs folder, one file per process
    assert {"cline.out", "grok.out", "curation.out", "copilot.out", "flower.out"} <= set(logs)

"""``xnai bench load``: the workload is reproducible and skewed, the profiles have their switches, and a short
run over the four real role workers loses nothing and reports every field (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from xnai_tasks.bench.load import FAST_PATHS, MIX, PROFILES, TARGETS, Sampler, Workload, format_table
from xnai_tasks.settings import Settings

from support import run_xnai

FIGURES = {
    "submitted", "ended", "completed", "errors", "refusals", "degraded", "lost", "availability", "requests_per_s",
    "p50_s", "p95_s", "p99_s", "queue_wait_p50_s", "queue_wait_p99_s", "cache_hit_rate",
}  # fmt: skip


def test_workload_is_reproducible_from_the_seed_and_skewed() -> None:
    # Given two workloads of the same seed and agent, and one of another seed
    first, again, other = Workload(7, 3), Workload(7, 3), Workload(8, 3)
    # When each draws 400 requests
    drawn = [first.next_request() for _ in range(400)]
    # Then the same seed gives the same requests, another seed others
    assert drawn == [again.next_request() for _ in range(400)]
    assert drawn != [other.next_request() for _ in range(400)]
    # And every kind of the mix appears, and the prompts repeat with a skew: a few often, most once
    assert {f"{role}.{task}" for role, task, _ in drawn} == {f"{role}.{task}" for role, task, _ in MIX}
    asking = Workload(1, 0)
    prompts = Counter(asking.prompt() for _ in range(1000))
    top = prompts.most_common(1)[0][1]
    once = sum(1 for n in prompts.values() if n == 1)
    assert top >= 20 and once >= 400 and len(prompts) < 1000


def test_profiles_switch_every_fast_path_and_the_table_has_the_designed_rows() -> None:
    # Given the two profiles, Then baseline has every fast path off and tuned every one on
    assert set(PROFILES) == {"baseline", "tuned"}
    assert dict(PROFILES["baseline"].switches) == dict.fromkeys(FAST_PATHS, False)
    assert dict(PROFILES["tuned"].switches) == dict.fromkeys(FAST_PATHS, True)
    # When the table is printed for a baseline run only
    figures = {"requests_per_s": 1.5, "p99_s": 2.0, "cache_hit_rate": None, "memory_peak_mb": 1890.0,
               "cpu_percent": 40.0, "availability": 1.0}  # fmt: skip
    table = format_table({"baseline": figures}).splitlines()
    # Then it has the header, a rule, one row per target with then and target, and "-" for the profile not run
    assert [cell.strip() for cell in table[0].split("|")] == ["metric", "then", "target", "baseline", "tuned"]
    assert len(table) == 2 + len(TARGETS)
    assert [cell.strip() for cell in table[2].split("|")] == ["requests/s", "5", "10", "1.50", "-"]
    assert "4.7 GB" in table[5] and "1.89 GB" in table[5] and "n/a" in table[4]
    # When the table is printed for a run against a running stack (--running), Then it has that one column
    running = format_table({"running": figures}).splitlines()
    assert [cell.strip() for cell in running[0].split("|")] == ["metric", "then", "target", "running"]
    assert [cell.strip() for cell in running[2].split("|")] == ["requests/s", "5", "10", "1.50"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_short_load_run_loses_nothing_and_reports_every_field(home: Path) -> None:
    # Given a private stack per profile with the four role workers and the real models
    plots = home / "plots"
    # When 2 agents run for 4 s against each profile
    done = run_xnai(
        ["bench", "load", "--users", "2", "--duration", "4", "--profile", "both", "--seed", "1", "--json",
         "--plot", str(plots)],
        Settings(home=home),
        timeout=840,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    # Then both profiles report every figure, overall and per kind, and no request was lost
    assert report["benchmark"] == "load" and set(report["profiles"]) == {"baseline", "tuned"}
    for name, profile in report["profiles"].items():
        assert FIGURES | {"memory_peak_mb", "cpu_percent", "kinds", "switches", "window_s", "plots"} <= set(profile)
        assert profile["lost"] == 0 and profile["submitted"] == profile["ended"] > 0
        assert profile["memory_peak_mb"] > 0 and profile["cpu_percent"] is not None
        # the hit rate is counted from the results' ``cache`` field: none without the cache (baseline)
        assert 0 <= profile["cache_hit_rate"] <= 1
        if name == "baseline":
            assert profile["cache_hit_rate"] == 0
        for figures in profile["kinds"].values():
            assert set(figures) == FIGURES and figures["lost"] == 0
        assert {Path(p).name for p in profile["plots"]} == {
            "latency_cdf.png", "throughput.png", "queue_depth.png", "memory.png", "cpu.png",
        }  # fmt: skip
        assert all((plots / name / Path(p).name).stat().st_size > 0 for p in profile["plots"])
    # And the ratios and the designed-against table are there
    assert set(report["ratios"]) == {"tuned_vs_baseline_rps", "tuned_vs_baseline_p99"}
    assert report["table"].splitlines()[0].split("|")[0].strip() == "metric"


def test_the_sampler_counts_a_process_once_when_roots_overlap() -> None:
    # Given two roots, one the other's child (as `--running` finds a worker and its pool child both by name)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sampler = Sampler([os.getpid(), child.pid], lambda: 0)
        # When the sampler lists the processes to measure
        pids = [proc.pid for proc in sampler._processes()]
        # Then each is listed once
        assert sorted(pids) == sorted(set(pids)) and {os.getpid(), child.pid} <= set(pids)
    finally:
        child.kill()
        child.wait()

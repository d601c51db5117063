"""Local telemetry and ``xnai report``: nearest-rank percentiles by hand, files safe with many writers,
pruning by age, and a real worker's tasks seen by ``xnai report --json``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from celery import Celery

from xnai_tasks.bench.harness import start_worker, stop_worker, wait_online
from xnai_tasks.client.sync import Client
from xnai_tasks.errors import TaskFailedError, UsageError
from xnai_tasks.observability.report import OVERALL, build_report, parse_duration, percentile, stats_of
from xnai_tasks.observability.telemetry import Record, hour_of, prune, read_records
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import run_xnai, short_home

TESTS_DIR = str(Path(__file__).resolve().parent)
FILE_NAME = re.compile(r"\d{10}-(\d+)\.jsonl")


def record(task: str = "grok.synthesize", outcome: str = "success", *, wait: float = 1.0, run: float = 2.0,
           ts: float = 1000.0, task_id: str = "t") -> Record:  # fmt: skip
    return Record(
        task_id=task_id, role=task.split(".")[0], task=task, outcome=outcome, queue_wait_s=wait, run_s=run,
        tokens=3, cache=None, model="m", pid=1, ts=ts,
    )  # fmt: skip


# ---- pure: the percentile method and the figures


def test_nearest_rank_percentiles_match_a_hand_computed_set() -> None:
    # Given the textbook set 15, 20, 35, 40, 50 (unsorted)
    values = [40.0, 15.0, 50.0, 35.0, 20.0]
    # When percentiles are taken, Then each is the value of rank ceil(p/100 * 5)
    assert percentile(values, 0) == 15  # rank 1
    assert percentile(values, 5) == 15  # ceil(0.25) = 1
    assert percentile(values, 30) == 20  # ceil(1.5) = 2
    assert percentile(values, 40) == 20  # ceil(2.0) = 2
    assert percentile(values, 50) == 35  # ceil(2.5) = 3
    assert percentile(values, 95) == 50  # ceil(4.75) = 5
    assert percentile(values, 100) == 50
    # Given 1..100, Then p50, p95, p99 are 50, 95, 99; and 1..10 gives p99 = 10 (never interpolated)
    hundred = [float(i) for i in range(1, 101)]
    assert (percentile(hundred, 50), percentile(hundred, 95), percentile(hundred, 99)) == (50, 95, 99)
    assert percentile([float(i) for i in range(1, 11)], 99) == 10
    # Given nothing, Then None; a percentile outside 0-100 is a programming error
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_stats_of_records_counts_outcomes_and_throughput() -> None:
    # Given 4 successes (latency 3, 4, 5, 6 s), an error and a refusal, first sent at 997, last finished at 1010
    records = [record(wait=1.0, run=2.0 + i, ts=1000.0 + i) for i in range(4)]
    records += [record(outcome="error", ts=1005.0), record(outcome="refused", ts=1010.0)]
    # When the figures are computed
    stats = stats_of(records)
    # Then the counts, the window and the nearest-rank latencies are as computed by hand
    assert (stats.count, stats.completed, stats.errors, stats.refusals) == (6, 4, 1, 1)
    assert stats.window_s == 13.0 and stats.requests_per_s == round(4 / 13, 4)
    assert (stats.latency_p50_s, stats.latency_p95_s, stats.latency_p99_s) == (4.0, 6.0, 6.0)
    assert stats.queue_wait_p50_s == 1.0 and stats.tokens == 18


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "15m", "2h", "7d", "1.5h")] == [90, 90, 900, 7200, 604800, 5400]
    for bad in ("", "0", "-5m", "5w", "m"):
        with pytest.raises(UsageError):
            parse_duration(bad)


# ---- the files


WRITER = """
import os, sys, time
from pathlib import Path
from xnai_tasks.observability.telemetry import Record, TelemetryWriter
from xnai_tasks.settings import Settings
writer, settings = TelemetryWriter(), Settings(home=Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    writer.write(settings, Record(task_id=f"{os.getpid()}-{i}", role="grok", task="grok.synthesize",
                                  outcome="success", queue_wait_s=1.0, run_s=2.0, tokens=3, cache=None,
                                  model="m", pid=os.getpid(), ts=time.time()))
"""


def test_many_processes_append_whole_lines_to_their_own_files(home: Path) -> None:
    # Given 4 processes (fresh interpreters) writing 500 records each at once
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(home), "500"]) for _ in range(4)]
    for proc in procs:
        assert proc.wait(60) == 0
    # When the telemetry folder is read
    files = sorted((home / "telemetry").iterdir())
    # Then each process wrote its own file named HOUR-PID.jsonl, every line is a whole record, none is lost
    assert {int(FILE_NAME.fullmatch(f.name).group(1)) for f in files} == {p.pid for p in procs}  # type: ignore[union-attr]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    ids = [r.task_id for r in read_records(home / "telemetry")]
    assert len(ids) == len(set(ids)) == 2000


def test_old_files_are_pruned_by_age_and_since_filters(home: Path) -> None:
    # Given an old file (mtime 8 days ago) and a fresh one
    directory = home / "telemetry"
    directory.mkdir()
    now = time.time()
    old = directory / "2020010100-1.jsonl"
    old.write_bytes(record(ts=now - 8 * 86400).to_line())
    os.utime(old, (now - 8 * 86400, now - 8 * 86400))
    with (directory / f"{hour_of(now - 600)}-2.jsonl").open("ab") as earlier:
        earlier.write(record(ts=now - 600).to_line())
    with (directory / f"{hour_of(now - 30)}-2.jsonl").open("ab") as later:
        later.write(record(ts=now - 30).to_line() + b'{"cut off')
    # When a report covers the last 5 minutes, Then only the record of 30 s ago counts (the torn line is skipped)
    assert build_report(directory, since_s=300, now=now)["kinds"][OVERALL]["count"] == 1
    assert build_report(directory, now=now)["kinds"][OVERALL]["count"] == 3
    # When files older than 7 days are pruned, Then only the old one goes
    assert prune(directory, keep_s=7 * 86400, now=now) == [old]
    assert old not in list(directory.iterdir()) and len(list(directory.iterdir())) in (1, 2)


# ---- a real worker


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    return Settings(home=short_home(), model_mode="lazy", task_modules=("xnai_test_tasks",))


@pytest.fixture(scope="module")
def worker(private_stack: Stack, private_settings: Settings, private_app: Celery) -> Iterator[None]:
    proc: subprocess.Popen[bytes] = start_worker(private_settings, "curation", concurrency=1,
                                                 env={"PYTHONPATH": TESTS_DIR, "XNAI_LOG_LEVEL": "INFO"})  # fmt: skip
    try:
        wait_online(proc, private_app, "curation")
        yield
    finally:
        stop_worker(proc)


def test_report_sees_a_real_workers_tasks(worker: None, private_client: Client, private_settings: Settings) -> None:
    import xnai_test_tasks  # noqa: F401  registers curation.nap in this process too

    # Given three tasks that succeed and one that fails in the task (classify needs labels)
    for _ in range(3):
        private_client.submit("curation", "nap", seconds=0.01).get(timeout=60)
    failing = private_client.submit("curation", "classify", text="a text", labels=[])
    with pytest.raises(TaskFailedError):
        failing.get(timeout=60)
    # When `xnai report --json` reads the telemetry (task_postrun runs just after the result is stored)
    deadline = time.monotonic() + 30
    while True:
        done = run_xnai(["report", "--json", "--since", "1h"], replace(private_settings))
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout)
        if report["records"] >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # Then it counts them per kind and overall, with their latencies and queue waits
    kinds = report["kinds"]
    assert kinds["curation.nap"]["completed"] == 3 and kinds["curation.nap"]["errors"] == 0
    assert kinds["curation.classify"]["errors"] == 1 and kinds["curation.classify"]["completed"] == 0
    assert kinds[OVERALL]["count"] == 4 and kinds[OVERALL]["requests_per_s"] > 0
    assert kinds["curation.nap"]["latency_p99_s"] >= 0.01 and kinds["curation.nap"]["queue_wait_p50_s"] >= 0
    records = {r.task_id: r for r in read_records(private_settings.telemetry_dir)}
    assert records[failing.id].role == "curation" and records[failing.id].outcome == "error"
    # And the worker's JSON log line about the failure names the task's id and name
    logged = [json.loads(line) for line in (private_settings.log_dir / "xnai.jsonl").read_text().splitlines()]
    assert any(e.get("task_id") == failing.id and e.get("task_name") == "curation.classify" for e in logged)
    # And --plot writes the PNGs
    plots = private_settings.home / "plots"
    done = run_xnai(["report", "--plot", str(plots)], private_settings)
    assert done.returncode == 0 and "curation.nap" in done.stdout, done.stderr[-2000:]
    assert sorted(p.name for p in plots.iterdir()) == ["latency_cdf.png", "throughput.png"]

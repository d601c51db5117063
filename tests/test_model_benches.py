"""Smoke runs of the model benchmarks at tiny sizes: one JSON object each, with its ratios (no timing asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from xnai_tasks.bench.model_benches import sample_texts, splits_for
from xnai_tasks.settings import Settings

from support import run_xnai


def bench(home: Path, *args: str, reserved: int = 2) -> dict[str, Any]:
    done = run_xnai(["bench", *args, "--json"], Settings(home=home, reserved_cores=reserved), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["benchmark"] == args[0] and report["host"]["cpus"] >= 1
    assert report["ratios"] and all(value > 0 for value in report["ratios"].values())
    return report


def test_splits_and_texts() -> None:
    assert splits_for(2) == [(1, 1), (1, 2), (2, 1)]
    assert all(p * t <= 6 for p, t in splits_for(6)) and (6, 1) in splits_for(6) and (1, 6) in splits_for(6)
    texts = sample_texts(300)
    assert len(set(texts)) == 300


@pytest.mark.slow
def test_bench_llm(home: Path) -> None:
    report = bench(home, "llm", "--tokens", "6", "--rounds", "1", "--threads", "1")
    assert set(report["sides"]) == {"queue", "direct"}
    assert report["sides"]["queue"]["completion_tokens"] == report["sides"]["direct"]["completion_tokens"]
    assert set(report["ratios"]) == {"queue_vs_direct_tokens_per_s"}


@pytest.mark.slow
def test_bench_memory(home: Path) -> None:
    report = bench(home, "memory", "--tokens", "2")
    assert set(report["configs"]) == {"pool_preload", "independent", "single"}
    assert report["configs"]["pool_preload"]["processes"] == 4 and report["configs"]["single"]["processes"] == 1
    assert set(report["ratios"]) == {"pool_vs_single_pss", "independent_vs_single_pss"}


@pytest.mark.slow
def test_bench_embed(home: Path) -> None:
    report = bench(home, "embed", "--texts", "6", "--rounds", "1")
    assert set(report["ratios"]) == {"batched_vs_single_task"}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_threads(home: Path) -> None:
    # two worker CPUs whatever the host, so three splits: 1x1, 1x2, 2x1
    report = bench(home, "threads", "--tokens", "4", "--texts", "8", reserved=max(0, len(os.sched_getaffinity(0)) - 2))
    assert [(s["processes"], s["threads"]) for s in report["splits"]] == [(1, 1), (1, 2), (2, 1)]
    assert {"llm_2x1_vs_1x1", "embed_1x2_vs_1x1"} <= set(report["ratios"])


@pytest.mark.slow
def test_bench_coldstart(home: Path) -> None:
    report = bench(home, "coldstart", "--rounds", "1")
    assert set(report["modes"]) == {"preload", "lazy"} and set(report["ratios"]) == {"lazy_vs_preload_first_token"}


@pytest.mark.slow
def test_bench_batching_reports_both_sides_and_the_encoder_alone(home: Path) -> None:
    # Given a private stack, When the batching bench runs with 64 one-text tasks per side
    report = bench(home, "batching", "--texts", "64")
    # Then both sides answered every task, the batched one from fewer encoder calls than tasks
    sides = report["sides"]
    assert set(sides) == {"unbatched", "batched"}
    assert sides["unbatched"]["encoder_calls"] == 64 and sides["batched"]["encoder_calls"] < 64
    # And the ceiling was measured in the same run: the same encoder alone, one text per call vs batches
    alone = report["encoder_alone"]
    assert alone["texts"] == 64 and alone["threads"] >= 1
    assert alone["single_texts_per_s"] > 0 and alone["batched_texts_per_s"] > 0
    assert set(report["ratios"]) == {
        "batched_vs_unbatched_texts_per_s",
        "batched_vs_unbatched_p50_one_submitter",
        "encoder_alone_batched_vs_single",
    }

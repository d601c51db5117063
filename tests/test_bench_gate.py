"""The regression gate's arithmetic (pure: no timing is measured here, the gate itself runs in `make bench`)."""

from __future__ import annotations

import json

from xnai_tasks.bench import gate
from xnai_tasks.bench.options import BenchOptions


def test_a_ratio_more_than_15_percent_worse_fails_either_way_round() -> None:
    # Given a baseline with a speed ratio (higher is better) and a memory ratio (lower is better)
    baseline = {
        "roundtrip.signed_vs_plain_roundtrip": {"value": 0.80, "better": "higher"},
        "memory.pool_vs_single_pss": {"value": 1.20, "better": "lower"},
        "embed.batched_vs_single_task": {"value": 4.0, "better": "higher"},
    }
    # When the speed ratio fell 20%, the memory ratio grew 10%, and the embed ratio was not measured
    rows = {
        row.name: row
        for row in gate.compare(
            baseline, {"roundtrip.signed_vs_plain_roundtrip": 0.64, "memory.pool_vs_single_pss": 1.32}
        )
    }
    # Then the 20% fall and the missing ratio fail; 10% worse memory is within the tolerance
    assert rows["roundtrip.signed_vs_plain_roundtrip"].failed
    assert abs((rows["roundtrip.signed_vs_plain_roundtrip"].change or 0) + 0.20) < 1e-9
    assert not rows["memory.pool_vs_single_pss"].failed
    assert abs((rows["memory.pool_vs_single_pss"].change or 0) + 0.10) < 1e-9
    assert rows["embed.batched_vs_single_task"].failed and rows["embed.batched_vs_single_task"].change is None
    # And the table names each, worst first, and marks the failures
    table = gate.format_table(list(rows.values())).splitlines()
    assert table[1].startswith("embed.batched_vs_single_task") and table[1].endswith("FAIL")
    assert table[2].startswith("roundtrip.signed_vs_plain_roundtrip") and "-20.0%" in table[2]
    assert not table[3].endswith("FAIL")


def test_memory_grown_20_percent_fails_and_a_faster_run_passes() -> None:
    baseline = {
        "memory.pool_vs_single_pss": {"value": 1.0, "better": "lower"},
        "llm.x": {"value": 1.0, "better": "higher"},
    }
    rows = {row.name: row for row in gate.compare(baseline, {"memory.pool_vs_single_pss": 1.2, "llm.x": 1.5})}
    assert rows["memory.pool_vs_single_pss"].failed and not rows["llm.x"].failed


def test_the_committed_baseline_covers_every_benchmark_with_a_direction() -> None:
    # Given the committed baseline
    data = json.loads(gate.BASELINE_PATH.read_text())["ratios"]
    # Then every entry has a value and the direction its name implies, and every benchmark has quick options
    assert data
    for name, entry in data.items():
        assert isinstance(entry["value"], float | int) and entry["better"] == gate.better_direction(name)
    assert gate.better_direction("coldstart.lazy_vs_preload_first_token") == "lower"
    assert gate.quick_options("roundtrip") == BenchOptions(tasks=400, rounds=2)

"""``xnai bench roundtrip`` runs both apps side by side and reports the ratios (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from xnai_tasks.settings import Settings

from support import run_xnai


def test_roundtrip_bench_reports_both_apps_and_ratios(home: Path) -> None:
    done = run_xnai(
        ["bench", "roundtrip", "--json", "--tasks", "200", "--rounds", "1"], Settings(home=home), timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert set(report["apps"]) == {"signed", "plain", "auth"}
    for app in report["apps"].values():
        assert app["enqueue_per_s"] > 0 and app["roundtrip_per_s"] > 0
        # each task cost the client, its worker and the embedded Redis some CPU, measured (not estimated)
        cpu = app["cpu_us_per_task"]
        assert cpu["client"] > 0 and cpu["worker"] > 0 and cpu["redis"] > 0
        assert abs(cpu["total"] - (cpu["client"] + cpu["worker"] + cpu["redis"])) <= 3  # one round: its sum, rounded
    assert set(report["ratios"]) >= {
        "signed_vs_plain_roundtrip",
        "signed_vs_plain_enqueue",
        "signed_vs_auth_roundtrip",
        "signed_vs_auth_enqueue",
        "plain_vs_signed_cpu_per_task",
    }

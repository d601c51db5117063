"""``xnai bench roundtrip`` runs both apps side by side and reports the ratios (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from xnai_tasks.settings import Settings

from support import run_xnai


def test_roundtrip_bench_reports_both_apps_and_ratios(home: Path) -> None:
    done = run_xnai(
        ["bench", "roundtrip", "--json", "--tasks", "40", "--rounds", "1"], Settings(home=home), timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert set(report["apps"]) == {"signed", "plain", "auth"}
    for app in report["apps"].values():
        assert app["enqueue_per_s"] > 0 and app["roundtrip_per_s"] > 0
    assert set(report["ratios"]) >= {
        "signed_vs_plain_roundtrip",
        "signed_vs_plain_enqueue",
        "signed_vs_auth_roundtrip",
        "signed_vs_auth_enqueue",
    }

"""The shipped Grafana dashboard and Prometheus alert rules load and use only the metrics we export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from xnai_tasks.core import constants as c

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
#: A metric name in a PromQL expression: ``xnai_`` then name characters (histogram series end in _bucket etc.).
METRIC = re.compile(r"\bxnai_[a-z_]+")
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def _exported(name: str) -> bool:
    base = next((name.removesuffix(s) for s in SERIES_SUFFIXES if name.endswith(s)), name)
    return name in c.METRIC_NAMES or base in c.METRIC_NAMES


def test_dashboard_parses_and_shows_every_family() -> None:
    # Given the dashboard file
    dashboard = json.loads((DEPLOY / "grafana" / "xnai.json").read_text())
    # When its panels' queries are read
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = {p["title"] for p in dashboard["panels"]}
    used = {m for e in exprs for m in METRIC.findall(e)}
    # Then each names only exported metrics, and every exported family has a panel
    assert {"Queue depth", "Refusals by reason", "Workers online", "Task duration p99"} <= titles
    assert all(_exported(m) for m in used), used
    assert {next((m.removesuffix(s) for s in SERIES_SUFFIXES if m.endswith(s)), m) for m in used} == set(c.METRIC_NAMES)


def test_alert_rules_parse_and_reference_only_exported_metrics() -> None:
    # Given the alert rules
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    # When their expressions are read
    names = {r["alert"] for r in rules}
    used = {m for r in rules for m in METRIC.findall(r["expr"])}
    # Then the six rules are there and use only what we export
    assert names == {
        "XnaiRoleWithoutWorker",
        "XnaiRefusalSpike",
        "XnaiWorkerDeaths",
        "XnaiQueueOverCap",
        "XnaiTaskP99OverSlo",
        "XnaiBreakerOpen",
    }
    assert used and all(_exported(m) for m in used), used

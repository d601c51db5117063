"""``xnai report``: throughput, latency percentiles and errors per task kind, from the local telemetry."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xnai_tasks.cli.parsing import Command
from xnai_tasks.settings import Settings


@click.command("report", cls=Command)
@click.option("--since", "since", default=None, metavar="DURATION", help="only the last DURATION (90s, 15m, 2h, 7d)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", "plot_dir", default=None, metavar="DIR", help="also write PNG plots into DIR")
@click.pass_obj
def report_command(settings: Settings, since: str | None, as_json: bool, plot_dir: str | None) -> int:
    """Requests/s, latency and queue-wait percentiles, errors and refusals per task kind.

    Read offline from XNAI_HOME/telemetry (one JSON line per finished task).
    """
    from xnai_tasks.observability.report import build_report, format_report, parse_duration, plot_report

    since_s = None if since is None else parse_duration(since)
    report = build_report(settings.telemetry_dir, since_s=since_s)
    if plot_dir is not None:
        report["plots"] = [str(p) for p in plot_report(settings.telemetry_dir, Path(plot_dir), since_s=since_s)]
    print(json.dumps(report) if as_json else format_report(report))
    if plot_dir is not None and not as_json:
        print("plots: " + ", ".join(report["plots"]))
    return 0

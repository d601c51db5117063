"""``xnai bench NAME``: a benchmark side by side with its baseline."""

from __future__ import annotations

import json
from typing import Any

import click

from xnai_tasks.cli.parsing import Choice, Command, Number
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings


@click.command("bench", cls=Command)
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.option("--tasks", type=Number(int, low=1), default=2000, help="tasks per measurement (roundtrip)")
@click.option("--rounds", type=Number(int, low=1), default=3, help="alternating rounds; the median is reported")
@click.option("--concurrency", type=Number(int, low=1), default=2, help="worker pool processes")
@click.option("--tokens", type=Number(int, low=1), default=None, help="max tokens per LLM task (llm, memory, threads)")
@click.option("--threads", type=Number(int, low=1), default=None, help="threads per process (llm; default 2)")
@click.option("--texts", type=Number(int, low=1), default=None, help="texts per measurement (embed, threads, batching)")
@click.option("--update-baseline", is_flag=True, help="gate: write the measured ratios as the new baseline")
@click.option("--users", type=Number(int, low=1), default=20, help="simulated agents (load)")
@click.option("--duration", type=Number(float, above=0), default=60.0, help="seconds of load (load, overload)")
@click.option("--profile", type=Choice("baseline", "tuned", "both"), default="both", help="fast paths (load)")
@click.option("--seed", type=Number(int, low=0), default=0, help="the workload's seed (load)")
@click.option("--plot", "plot_dir", default=None, metavar="DIR", help="PNG plots into DIR (load)")
@click.option("--chunks", type=Number(int, low=1), default=10_000, help="chunks in the bank (search)")
@click.option("--running", is_flag=True, help="load the stack already running at XNAI_REDIS_URL (load)")
@click.pass_obj
def bench_command(
    settings: Settings,
    name: str,
    as_json: bool,
    tasks: int,
    rounds: int,
    concurrency: int,
    tokens: int | None,
    threads: int | None,
    texts: int | None,
    update_baseline: bool,
    users: int,
    duration: float,
    profile: str,
    seed: int,
    plot_dir: str | None,
    chunks: int,
    running: bool,
) -> int:
    """Run a benchmark side by side with its baseline (``gate``: quick runs of all, against bench/baseline.json)."""
    from xnai_tasks.bench import BENCHMARKS
    from xnai_tasks.bench.options import BenchOptions

    if name == "gate":
        return run_gate(settings, update=update_baseline)
    if name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {name!r} (benchmarks: {', '.join(BENCHMARKS)})")
    options = BenchOptions(
        tasks=tasks,
        rounds=rounds,
        concurrency=concurrency,
        tokens=tokens,
        threads=threads,
        texts=texts,
    )
    if name == "load":
        from xnai_tasks.bench.load import run_load
        from xnai_tasks.bench.options import LoadOptions

        load = LoadOptions(
            users=users, duration=duration, profile=profile, seed=seed, plot_dir=plot_dir, running=running
        )
        report = run_load(settings, options, load)
    elif name == "overload":
        from xnai_tasks.bench.options import OverloadOptions
        from xnai_tasks.bench.overload import run_overload

        report = run_overload(settings, options, OverloadOptions(duration=duration))
    elif name == "search":
        from xnai_tasks.bench.options import SearchOptions
        from xnai_tasks.bench.search import run_search

        report = run_search(settings, options, SearchOptions(chunks=chunks))
    else:
        report = BENCHMARKS[name](settings, options)
    print(json.dumps(report) if as_json else format_report(report))
    return 0


def run_gate(settings: Settings, *, update: bool) -> int:
    """Quick runs of every benchmark; fail when a ratio moved more than the tolerance the wrong way."""
    from xnai_tasks.bench import BENCHMARKS, gate
    from xnai_tasks.errors import BenchRegressionError

    measured = gate.measure(settings, BENCHMARKS)
    if update:
        gate.BASELINE_PATH.write_text(json.dumps({"ratios": gate.as_baseline(measured)}, indent=1) + "\n")
        print(f"wrote {len(measured)} ratios to {gate.BASELINE_PATH}")
        return 0
    rows = gate.compare(gate.read_baseline(), measured)
    print(gate.format_table(rows))
    failed = [row.name for row in rows if row.failed]
    if failed:
        raise BenchRegressionError(
            f"{len(failed)} ratio(s) more than {gate.TOLERANCE:.0%} worse than the baseline: {', '.join(failed)}"
        )
    return 0


def format_report(report: dict[str, Any]) -> str:
    """A report as text: its name, then one ``key: JSON`` line per value."""
    lines = [f"{report.get('benchmark', 'benchmark')}:"]
    for key, value in report.items():
        if key not in ("benchmark", "table"):
            lines.append(f"  {key}: {json.dumps(value)}")
    if isinstance(report.get("table"), str):
        lines.append(report["table"])
    return "\n".join(lines)

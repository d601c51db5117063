"""``xnai bench NAME``: a benchmark side by side with its baseline."""

from __future__ import annotations

import json
from typing import Any

import click

from xnai_tasks.cli.parsing import Command, Number
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
@click.option("--texts", type=Number(int, low=1), default=None, help="texts per embedding measurement (embed, threads)")
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
) -> int:
    """Run a benchmark side by side with its baseline."""
    from xnai_tasks.bench import BENCHMARKS
    from xnai_tasks.bench.options import BenchOptions

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
    report = BENCHMARKS[name](settings, options)
    print(json.dumps(report) if as_json else format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    """A report as text: its name, then one ``key: JSON`` line per value."""
    lines = [f"{report.get('benchmark', 'benchmark')}:"]
    for key, value in report.items():
        if key != "benchmark":
            lines.append(f"  {key}: {json.dumps(value)}")
    return "\n".join(lines)

"""One host against three: ``xnai bench load --running`` on the same four roles, laid out two ways.

``one``: the hub runs Redis and all four role workers. ``three``: the hub runs Redis and the copilot; host a runs
cline and curation, host b grok and curation, each joined with its bundle over mutual TLS. The load (the same
agents, mix and seed) is run from the hub's namespace in both. Run as root from the ``tests`` folder::

    ../.venv/bin/python -m hosts.load_hosts --users 20 --duration 60 > /tmp/load_hosts.json

Every "host" is a network namespace of this one machine: they share its cores and memory, so this shows what
spreading the roles costs and that nothing is lost, not how more machines scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from hosts.cluster import Cluster, HarnessError

#: Real models, as the plan decides (the harness's default is lazy and unprobed, for tests that load none).
MODEL_ENV = {"XNAI_MODEL_MODE": "auto", "XNAI_LLM_SAFE": "auto"}
ALL_ROLES = ("copilot", "cline", "grok", "curation")
LAYOUTS = ("one", "three")


def run_layout(layout: str, users: int, duration: float, seed: int, keep_logs: Path | None) -> dict[str, Any]:
    """Build ``layout``, load it from the hub, tear it down; the load report."""
    with Cluster(task_modules=(), env=MODEL_ENV) as cluster:
        if layout == "one":
            hub = cluster.add_hub(roles=ALL_ROLES)
        else:
            hub = cluster.add_hub()
            cluster.add_host("a", ("cline", "curation"))
            cluster.add_host("b", ("grok", "curation"))
        cluster.start(timeout=900)
        argv = ["bench", "load", "--running", "--json", "--users", str(users), "--duration", str(duration)]
        done = hub.xnai(*argv, "--seed", str(seed), timeout=duration + 1200)
        if keep_logs is not None:  # the cluster's folder goes with it
            shutil.copytree(cluster.logs, keep_logs / layout, dirs_exist_ok=True)
        if done.returncode != 0:
            raise HarnessError(f"bench load ({layout}) exit {done.returncode}: {done.stderr.strip()[-2000:]}")
        report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy every process's log here")
    args = parser.parse_args()
    runs = {}
    for layout in LAYOUTS:
        print(f"load_hosts: {layout} host(s)...", file=sys.stderr)
        runs[layout] = run_layout(layout, args.users, args.duration, args.seed, args.keep_logs)["profiles"]["running"]
    keys = ("submitted", "completed", "lost", "errors", "requests_per_s", "p50_s", "p95_s", "p99_s",
            "memory_peak_mb", "cpu_percent", "availability")  # fmt: skip
    table = {key: {layout: runs[layout].get(key) for layout in LAYOUTS} for key in keys}
    one, three = runs["one"]["requests_per_s"], runs["three"]["requests_per_s"]
    ratios = {"three_vs_one_rps": round(three / one, 3) if one else None}
    options = {"users": args.users, "duration": args.duration, "seed": args.seed}
    print(json.dumps({"options": options, "table": table, "ratios": ratios, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

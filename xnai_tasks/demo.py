"""``make demo``: start the embedded stack, run a real task on every role, print who answered, stop."""

from __future__ import annotations

import time

from xnai_tasks import constants as c
from xnai_tasks.client import Client
from xnai_tasks.settings import Settings
from xnai_tasks.supervisor import Stack, StopRequested, raise_on_stop_signals

TASK_TIMEOUT_S = 300.0


def run_demo(settings: Settings) -> int:
    """Run the demo; 0 when every role answered."""
    from xnai_tasks.celery_app import app

    raise_on_stop_signals()
    started = time.monotonic()
    try:
        with Stack(settings, flower=True) as stack:
            stack.wait_workers(app)
            print(f"stack up in {time.monotonic() - started:.1f} s (Redis, 4 workers, beat, Flower)\n", flush=True)
            client = Client(settings)
            handles = {role: client.submit(role, "health") for role in c.ROLES}
            answers = {role: handle.get(timeout=TASK_TIMEOUT_S) for role, handle in handles.items()}
            client.close()
    except StopRequested:
        return 130
    print(f"{'role':10}{'answered by':28}{'pid':>8}  {'cpus':10}{'rss MB':>8}  celery")
    for role, facts in answers.items():
        cpus = ",".join(str(cpu) for cpu in facts["cpu_affinity"])
        print(
            f"{role:10}{facts['hostname']:28}{facts['pid']:>8}  {cpus:10}"
            f"{facts['rss_bytes'] / 1e6:>8.1f}  {facts['celery_version']}"
        )
    print("\neverything stopped; the demo is done")
    return 0

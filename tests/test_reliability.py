"""A worker child killed mid-task loses nothing: acks late + reject on worker lost requeue the task."""

from __future__ import annotations

import os
import random
import signal
import time

import psutil

from xnai_tasks.client.sync import Client
from xnai_tasks.ops.supervisor import Stack

TASKS = 200


def test_no_task_lost_when_pool_children_are_killed(stack: Stack, client: Client) -> None:
    # Given 200 grok tasks, every fourth sleeping about half a second
    rng = random.Random(7)
    handles = [client.submit("grok", "echo", value=i, delay_s=0.5 if i % 4 == 0 else 0.0) for i in range(TASKS)]
    worker = psutil.Process(stack.children["grok"].pid)
    # When pool children are killed with SIGKILL at random while the tasks run
    kills = 0
    deadline = time.monotonic() + 60
    while kills < 8 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 1.0))
        children = worker.children()
        if children:
            os.kill(rng.choice(children).pid, signal.SIGKILL)
            kills += 1
    # Then every task's result arrives, with the right value
    values = [handle.get(timeout=180) for handle in handles]
    assert values == list(range(TASKS))
    assert kills >= 4
    # And the worker replaced its children
    assert worker.is_running() and worker.children()

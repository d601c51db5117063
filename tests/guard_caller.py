"""A process that uses the real breaker and pool over the real Redis as a role's Redis user: the tests' other host.

``python -m guard_caller '{"mode": ..., ...}'`` with XNAI_* in the environment (``Settings.to_env``); the
JSON may override settings (``"settings": {"breaker_open": 1}``). It prints one JSON line per event:

* ``call``: one guarded call of ``role`` to ``model`` that sleeps ``seconds`` and fails if ``fail``; with ``gate``
  (a file path) it first prints ``{"ready": true}`` and waits until that file exists, so many start at once.
* ``read``: builds a guard (as a starting process does) and prints the breaker's state.
* ``lease``: takes a lease (waiting up to ``wait``), counts itself among the holders in ``count_key`` (admin),
  holds ``seconds`` (forever if null), then releases it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from xnai_tasks.core import broker
from xnai_tasks.errors import XnaiError
from xnai_tasks.resilience.llm_guard import guard
from xnai_tasks.security import redis_urls
from xnai_tasks.settings import Settings


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def call(job: dict[str, Any], settings: Settings) -> None:
    conn = broker.connect(redis_urls.connection_url(settings, job["role"]))
    found = guard(job["role"], job["model"], conn=conn, settings=settings)
    if job.get("gate"):
        say(ready=True)
        while not Path(job["gate"]).exists():
            time.sleep(0.01)

    def work() -> str:
        with open(job["runs_file"], "a", encoding="utf-8") as runs:
            runs.write("ran\n")
        time.sleep(float(job.get("seconds", 0)))
        if job.get("fail"):
            raise RuntimeError("the stand-in LLM failed on purpose")
        return "ok"

    try:
        say(ran=found.run(work))
    except XnaiError as exc:
        say(refused=type(exc).__name__, error=str(exc))
    except RuntimeError as exc:
        say(failed=str(exc))


def read(job: dict[str, Any], settings: Settings) -> None:
    conn = broker.connect(redis_urls.connection_url(settings, job["role"]))
    found = guard(job["role"], job["model"], conn=conn, settings=settings)
    assert found.breaker is not None
    say(**found.breaker.read().as_dict())


def lease(job: dict[str, Any], settings: Settings) -> None:
    conn = broker.connect(redis_urls.connection_url(settings, job["role"]))
    admin = broker.connect(redis_urls.connection_url(settings, "admin"))
    pool = guard(job["role"], job["model"], conn=conn, settings=settings).pool
    try:
        with pool.lease(float(job.get("wait", 0))):
            holders = int(admin.incr(job["count_key"]))
            admin.rpush(f"{job['count_key']}:seen", holders)
            say(held=True, holders=holders)
            time.sleep(float(job["seconds"]) if job.get("seconds") is not None else 3600)
            admin.decr(job["count_key"])
    except XnaiError as exc:
        say(refused=type(exc).__name__, error=str(exc))


def main() -> None:
    job = json.loads(sys.argv[1])
    settings = replace(Settings.from_env(), **job.get("settings", {}))
    {"call": call, "read": read, "lease": lease}[job["mode"]](job, settings)


if __name__ == "__main__":
    main()

"""The role's list of worker-process deaths that ``xnai status`` shows (read by :mod:`.status`): one writer here.

A death is a pool process killed under a task (``worker/deliveries.py``), a whole worker that went silent and whose
messages a peer gave back (``resilience/dead_workers.py``), or a batching worker's encoder process that ended
(``batching/encoder_process.py``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from xnai_tasks.core import constants as c


def push_death(pipe: Any, role: str, *, task: str, ident: str, cause: str, ts: float | None = None) -> None:
    """Queue on ``pipe`` (a redis-py pipeline) one death of ``role``'s, keeping the newest ``DEATHS_MAX``."""
    event = json.dumps({"ts": time.time() if ts is None else ts, "task": task, "id": ident, "cause": cause})
    pipe.lpush(c.deaths_key(role), event)
    pipe.ltrim(c.deaths_key(role), 0, c.DEATHS_MAX - 1)

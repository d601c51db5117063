"""A task every worker role has in the namespaced-host tests only (``XNAI_TASK_MODULES=hosts.node_tasks``):
``ROLE.where(value, delay_s)`` answers which node, host and process ran it. No model is involved.

With ``journal=True`` each run that reaches its end also appends ``{"id", "value", "node"}`` as one JSON line to
``XNAI_HOME/where.jsonl`` on its host, before it returns: a task that ran to its end twice shows there twice, even
when only one of its results was stored."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from xnai_tasks.worker.role_task import RoleTask, role_task

#: File name of the journal in XNAI_HOME (see the module docstring).
JOURNAL_FILE = "where.jsonl"


def _register(role: str) -> None:
    def where(self: RoleTask, value: Any = None, delay_s: float = 0.0, journal: bool = False) -> dict[str, Any]:
        """Sleep ``delay_s``, then say who ran this: the Celery node (``ROLE@HOST``), the host name and the pid."""
        if delay_s:
            time.sleep(float(delay_s))
        if journal:
            line = json.dumps({"id": self.request.id, "value": value, "node": self.request.hostname}) + "\n"
            path = os.path.join(os.environ["XNAI_HOME"], JOURNAL_FILE)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())  # one write of a short line with O_APPEND: lines never interleave
            finally:
                os.close(fd)
        return {"value": value, "node": self.request.hostname, "host": socket.gethostname(), "pid": os.getpid()}

    role_task(role)(where)


for _role in ("cline", "grok", "curation"):
    _register(_role)

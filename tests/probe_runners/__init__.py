"""Stand-ins for the LLM probe runner (``XNAI_LLM_PROBE_RUNNER=probe_runners.NAME``) that fail on purpose.

Each appends its options to the file named by ``XNAI_TEST_PROBE_LOG`` (when set), so a test can count
how often the probe ran; with the safe options, the first two hand over to the real runner.
"""

from __future__ import annotations

import json
import os
import sys


def record() -> dict[str, object]:
    """The ``--options`` this run was given, logged when XNAI_TEST_PROBE_LOG names a file."""
    options: dict[str, object] = json.loads(sys.argv[sys.argv.index("--options") + 1])
    log = os.environ.get("XNAI_TEST_PROBE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(options, sort_keys=True) + "\n")
    return options


def safe(options: dict[str, object]) -> bool:
    return options.get("use_extra_bufts") is False

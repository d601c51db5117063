"""Prints unreadable text unless weight repacking is off (as a build that computes NaNs would)."""

import json
import sys

from probe_runners import record, safe
from xnai_tasks.models.probe_runner import main

if not safe(record()):
    print(json.dumps({"text": "\ufffd\ufffd\ufffd", "completion_tokens": 8}))
    sys.exit(0)
sys.exit(main(sys.argv[1:]))

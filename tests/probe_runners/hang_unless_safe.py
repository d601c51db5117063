"""Hangs unless weight repacking is off."""

import sys
import time

from probe_runners import record, safe
from xnai_tasks.models.probe_runner import main

if not safe(record()):
    time.sleep(3600)
sys.exit(main(sys.argv[1:]))

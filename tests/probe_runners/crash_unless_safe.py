"""Dies by SIGILL unless weight repacking is off, as llama.cpp's AMX kernels do in a VM without AMX."""

import os
import signal
import sys

from probe_runners import record, safe
from xnai_tasks.models.probe_runner import main

if not safe(record()):
    os.kill(os.getpid(), signal.SIGILL)
sys.exit(main(sys.argv[1:]))

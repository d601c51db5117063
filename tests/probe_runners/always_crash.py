"""Dies by SIGILL whatever the options: a model that cannot run on this host at all."""

import os
import signal

from probe_runners import record

record()
os.kill(os.getpid(), signal.SIGILL)

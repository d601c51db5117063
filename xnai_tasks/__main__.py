"""``python -m xnai_tasks`` is the ``xnai`` command."""

import sys

from xnai_tasks.cli import main

sys.exit(main())

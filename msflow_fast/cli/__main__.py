"""``python -m msflow_fast.cli``: the same as the ``msflow-fast`` command."""

import sys

from . import main

sys.exit(main())

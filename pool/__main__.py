"""``python -m pool ...`` is the ``runnable-k8s`` command (LocalPool starts its broker this way)."""

import sys

from pool.cli import main

sys.exit(main())

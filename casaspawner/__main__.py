"""``python -m casaspawner`` is the same as the ``casaspawner`` console script."""

import sys

from casaspawner.cli import main

sys.exit(main())

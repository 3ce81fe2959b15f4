"""``python -m casaspawner``: the same as the ``casaspawner`` console script."""

import sys

from casaspawner.cli import main

sys.exit(main())

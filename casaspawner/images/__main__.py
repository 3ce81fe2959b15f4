"""``python -m casaspawner.images ACTION ...`` = ``casaspawner images ACTION ...``."""

import sys

from casaspawner.images.cli import main

sys.exit(main())

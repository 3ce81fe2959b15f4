"""``python -m casaspawner.images ACTION ...`` is ``casaspawner images ACTION ...``."""

import sys

from casaspawner.cli import main

sys.exit(main(["images", *sys.argv[1:]]))

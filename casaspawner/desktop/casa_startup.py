"""Start-up file of the desktop's CASA terminal (IPython with this build's casatools and casatasks)."""

import os

import casatasks
import casatools
from casatasks import *  # noqa: F403 - the CASA prompt offers every task, as ``casa`` does

# Every tool as well (``casatools.__all__`` names some that do not exist, so no star import).
globals().update({name: getattr(casatools, name) for name in casatools.__all__ if hasattr(casatools, name)})

casalog = casatasks.casalog
_logfile = os.environ.get("CASASPAWNER_CASA_LOGFILE")
if _logfile:
    casalog.setlogfile(_logfile)

print(f"CASA {casatools.version_string()} (casatools and casatasks loaded; tasks and tools are ready)")
if os.environ.get("CASASPAWNER_DATASET"):
    print(f"Dataset: {os.environ['CASASPAWNER_DATASET']}")
if os.environ.get("CASASPAWNER_REASON"):
    print(f"Why this build: {os.environ['CASASPAWNER_REASON']}")
if os.environ.get("CASASPAWNER_APPROXIMATE") == "true":
    print(f"APPROXIMATE SESSION: {os.environ.get('CASASPAWNER_REASON', '')}")
print("GUIs: the tools window, the desktop's right-click menu, or plotms() here.")

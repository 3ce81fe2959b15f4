"""CASA site configuration for casaspawner images (read by casaconfig through ``CASASITECONFIG``).

Measures data are never baked into an image: the spawner mounts a shared casarundata tree read-only at
``CASA_MEASURES_PATH`` (default ``/opt/casa/measures``). Sessions must not try to update it.
"""

import os

measurespath = os.environ.get("CASA_MEASURES_PATH", "/opt/casa/measures")
datapath = [measurespath]
measures_auto_update = False
data_auto_update = False

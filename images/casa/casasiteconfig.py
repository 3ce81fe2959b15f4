"""CASA site configuration for casaspawner images, read by casaconfig through CASASITECONFIG.

casaconfig (CASA 6.6.4 and later; catalog ``data: casaconfig``) reads it. Measures data are not in
the image: the spawner mounts a shared casarundata tree read-only at ``CASA_MEASURES_PATH``
(default ``/opt/casa/measures``), and sessions must not try to update it. Older CASA never reads
this file; its images link the geodetic and ephemerides directories of the data it bundles to the
same mount instead.
"""

import os

measurespath = os.environ.get("CASA_MEASURES_PATH", "/opt/casa/measures")
datapath = [measurespath]
measures_auto_update = False
data_auto_update = False
# A headless run's one CASA log file (casaspawner run on Kubernetes), not a new casa-<time>.log
# wherever CASA starts: as in local environments.
if os.environ.get("CASASPAWNER_CASA_LOGFILE"):
    logfile = os.environ["CASASPAWNER_CASA_LOGFILE"]

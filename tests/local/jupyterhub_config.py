# Loaded by `jupyterhub -f` in the local tier's hub (tests/local/conftest.py's hub fixture): the
# example hub-config/local/jupyterhub_config.py (what `make demo` runs), plus a catalog with two
# deliberately broken releases, a tarball mirror on a closed loopback port (so pipeline tarballs
# are reliably unreachable), and an API service for the tests.
import os
from pathlib import Path

c = get_config()  # noqa: F821
local = Path(__file__).resolve().parents[2] / "hub-config" / "local" / "jupyterhub_config.py"
load_subconfig(str(local))  # noqa: F821

c.LocalCASASpawner.catalog_path = os.environ["CASASPAWNER_TEST_CATALOG"]
c.LocalCASASpawner.tarball_mirror = "http://127.0.0.1:9/"
c.LocalCASASpawner.probe_timeout = 2
c.LocalCASASpawner.allow_approximate = True
# The desktop's notices watcher, faster.
c.LocalCASASpawner.environment = {"CASASPAWNER_NOTICES_INTERVAL": "1"}
c.JupyterHub.log_level = "DEBUG"
# Added to what hub-config/local configures (casa-sessions, the roles, the idle culler).
c.JupyterHub.services.append(
    {"name": "local-tests", "api_token": os.environ["CASASPAWNER_TEST_TOKEN"]}
)
c.JupyterHub.load_roles.append(
    {
        "name": "local-tests",
        "scopes": [
            "admin:users",
            "admin:servers",
            "admin:server_state",
            "access:servers",
            "read:users",
        ],
        "services": ["local-tests"],
    }
)

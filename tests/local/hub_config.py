# Test hub: the example hub-config/local/jupyterhub_config.py (what `make demo` runs), plus a catalog with two
# deliberately broken releases, a tarball mirror on a closed loopback port (so pipeline tarballs are reliably
# unreachable), and an API service for the tests. Started by tests/local/conftest.py.
import os
from pathlib import Path

c = get_config()  # noqa: F821
load_subconfig(str(Path(__file__).resolve().parents[2] / "hub-config" / "local" / "jupyterhub_config.py"))  # noqa: F821

c.LocalCASASpawner.catalog_path = os.environ["CASASPAWNER_TEST_CATALOG"]
c.LocalCASASpawner.tarball_mirror = "http://127.0.0.1:9/"
c.LocalCASASpawner.probe_timeout = 2
c.LocalCASASpawner.allow_approximate = True
c.LocalCASASpawner.environment = {
    "CASASPAWNER_NOTICES_INTERVAL": "1"
}  # the desktop's notices watcher, faster
c.JupyterHub.log_level = "DEBUG"
c.JupyterHub.services = [{"name": "local-tests", "api_token": os.environ["CASASPAWNER_TEST_TOKEN"]}]
c.JupyterHub.load_roles = [
    {
        "name": "local-tests",
        "scopes": ["admin:users", "admin:servers", "admin:server_state", "access:servers", "read:users"],
        "services": ["local-tests"],
    }
]

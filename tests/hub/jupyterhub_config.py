# Loaded by `jupyterhub -f` in the hub tier's hubs (tests/hub/conftest.py's hub_factory): the
# shipped hub-config/jupyterhub_config.py, plus loopback ports, a temporary database, a test admin
# service for the tests' API calls, and the test spawner.
import os
import sys
from pathlib import Path

c = get_config()  # noqa: F821
here = Path(__file__).resolve().parent
load_subconfig(str(here.parents[1] / "hub-config" / "jupyterhub_config.py"))  # noqa: F821

workdir = Path(os.environ["CASA_TEST_WORKDIR"])
c.JupyterHub.bind_url = f"http://127.0.0.1:{os.environ['CASA_TEST_PORT']}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{os.environ['CASA_TEST_HUB_PORT']}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ['CASA_TEST_PROXY_PORT']}"
c.JupyterHub.db_url = f"sqlite:///{workdir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(workdir / "cookie_secret")
c.JupyterHub.pid_file = str(workdir / "jupyterhub.pid")
c.JupyterHub.log_level = "DEBUG"
c.JupyterHub.cleanup_servers = True

# The tests' own API client (reads auth_state to check what the login stored).
c.JupyterHub.services.append(
    {"name": "test-admin", "api_token": os.environ["CASA_TEST_ADMIN_TOKEN"]}
)
c.JupyterHub.load_roles.append(
    {
        "name": "test-admin",
        "scopes": [
            "admin:users",
            "admin:auth_state",
            "admin:servers",
            "admin:groups",
            "tokens",
            "read:services",
            "read:roles:services",
        ],
        "services": ["test-admin"],
    }
)

if os.environ.get("CASA_TEST_SPAWNER") == "casa":
    # The real CASASpawner (selected by hub-config/jupyterhub_config.py) against the test's kmock
    # cluster.
    c.CASASpawner.namespace = "test"
    c.CASASpawner.port = int(os.environ["CASA_TEST_SESSION_PORT"])
    c.CASASpawner.start_timeout = 30
    c.CASASpawner.http_timeout = 30
    c.CASASpawner.k8s_api_request_retry_timeout = 10
    c.CASASpawner.extra_labels = {"hub.jupyter.org/network-access-hub": "true"}
    c.CASASpawner.storage_hub_path = os.environ["CASA_TEST_STORAGE"]
else:
    # The tests' support package (tests/support).
    sys.path.insert(0, str(here.parent))
    from support.spawners import HubTestSpawner

    c.JupyterHub.spawner_class = HubTestSpawner
    c.Spawner.home_dir_template = str(workdir / "home" / "{username}")
    c.Spawner.start_timeout = 60
    c.Spawner.http_timeout = 60
    c.Spawner.cmd = [str(Path(sys.executable).parent / "jupyterhub-singleuser")]

# Activity reaches the hub within seconds (z2jh: the proxy's every 60 s, the sessions' every 300
# s).
if os.environ.get("CASA_TEST_FAST_ACTIVITY"):
    c.JupyterHub.last_activity_interval = 2
    c.Spawner.environment = {"JUPYTERHUB_ACTIVITY_INTERVAL": "2"}

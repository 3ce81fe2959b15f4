# casaspawner on one machine: JupyterHub + LocalCASASpawner, no cluster.
#
# `make demo` (python -m casaspawner.local.demo) starts the hub with this file and the CASASPAWNER_* variables
# below. To run a hub of your own, copy this file and replace the demo parts: the authenticator (e.g. PAM or
# OAuthenticator), the storage root and the port.
import os
from pathlib import Path

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - provided by JupyterHub

demo = Path(os.environ.get("CASASPAWNER_DEMO_DIR", "demo")).resolve()
port = int(os.environ.get("CASASPAWNER_DEMO_PORT", "8000"))

# --- the hub: only on this machine -----------------------------------------------------------------------
c.JupyterHub.bind_url = f"http://127.0.0.1:{port}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{port + 1}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{port + 2}"
c.JupyterHub.db_url = f"sqlite:///{demo / 'hub' / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(demo / "hub" / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(demo / "hub" / "proxy.pid")
# Sessions outlive hub restarts: the hub finds them again through their saved pid.
c.JupyterHub.cleanup_servers = False

# --- login: one demo user with a shared password (fit for one machine, not for a shared server) -------------
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = os.environ.get("CASASPAWNER_DEMO_PASSWORD", "")
c.Authenticator.allowed_users = {"demo"}

# --- sessions: LocalCASASpawner ------------------------------------------------------------------------------
c.JupyterHub.spawner_class = "casa-local"
# Stands in for Cavern: homes are <storage root>/home/<user>, projects <storage root>/projects/<group>. The
# demo gives /arc as root (the paths sessions in the cluster see; also the spawner's default for a root hub)
# and <repo>/demo/arc otherwise (sessions then find the root at ~/arc too).
if os.environ.get("CASASPAWNER_STORAGE_ROOT"):
    c.LocalCASASpawner.storage_root = os.environ["CASASPAWNER_STORAGE_ROOT"]
if os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR"):
    # per-release CASA environments, shared measures data, downloaded tarballs
    c.LocalCASASpawner.environments_dir = os.environ["CASASPAWNER_ENVIRONMENTS_DIR"]
# Run the nearest installable CASA (marked "approximate") when a dataset's exact build cannot be installed.
c.LocalCASASpawner.allow_approximate = os.environ.get("CASASPAWNER_ALLOW_APPROXIMATE", "true") == "true"

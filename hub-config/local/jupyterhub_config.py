# casaspawner on one machine: JupyterHub + LocalCASASpawner, no cluster.
#
# `make demo` (python -m casaspawner.local.demo) starts the hub with this file and the
# CASASPAWNER_* variables below. Everything a casaspawner hub shares with the Kubernetes deployment
# (the casa-sessions operators' page with release drains and in-session notices, the
# administrators' and operators' roles, the idle culler) comes from
# casaspawner.hubconfig.configure_hub, as in hub-config/jupyterhub_config.py; the CASA_* variables
# listed there (CASA_CULL_TIMEOUT, CASA_NOTICES_INTERVAL, …) work here too. To run a hub of your
# own, copy this file and replace the demo parts: the authenticator (e.g. PAM or OAuthenticator),
# the storage root and the ports.
import os
from dataclasses import replace
from pathlib import Path

from casaspawner.hubconfig import configure_headless_runs, configure_hub, settings_from_environment

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - provided by JupyterHub

demo = Path(os.environ.get("CASASPAWNER_DEMO_DIR", "demo")).resolve()
port = int(os.environ.get("CASASPAWNER_DEMO_PORT", "8000"))

# --- the hub, on this machine only: proxy on `port`, its API +1, hub +2, casa-sessions +3 ---
c.JupyterHub.bind_url = f"http://127.0.0.1:{port}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{port + 1}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{port + 2}"
c.JupyterHub.db_url = f"sqlite:///{demo / 'hub' / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(demo / "hub" / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(demo / "hub" / "proxy.pid")
# Sessions outlive hub restarts: the hub finds them again through their saved pid.
c.JupyterHub.cleanup_servers = False
# The spawn-progress page names the dataset, the CASA build and why, above the event log.
c.JupyterHub.template_paths = [str(Path(__file__).resolve().parent / "templates")]

# --- what both deployments share: casa-sessions, roles, drains and notices, the idle culler ------
settings = settings_from_environment(
    {
        **os.environ,
        "CASASPAWNER_SPAWNER": "casa-local",
        "CASA_SESSIONS_URL": f"http://127.0.0.1:{port + 3}",
        "CASASPAWNER_RELEASE_STATE": str(demo / "hub" / "casa-release-state.json"),
    }
)
configure_hub(c, replace(settings, oidc_login=False))
# The form's "Run headless" beside Start: a script in the dataset's CASA build, as casaspawner run,
# on the hub's pages /hub/casa-runs/ (what will run, Start, its output and sentence, Stop); it runs
# as the user's account.
configure_headless_runs(c, settings)

# --- login: a user and an operator sharing a password (for one machine, not a shared server) ---
# The operator is in the administrators' group (JupyterHub's admin page, without entering sessions)
# and the operators' group (the casa-sessions page: sessions by CASA release, drains, notices).
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = os.environ.get("CASASPAWNER_DEMO_PASSWORD", "")
c.Authenticator.allowed_users = {"demo", "operator"}
c.JupyterHub.load_groups = {
    group: {"users": ["operator"]}
    for group in (settings.admins_group, settings.operators_group)
    if group
}

# --- sessions: LocalCASASpawner ------------------------------------------------------------------
# Stands in for Cavern: homes are <storage root>/home/<user>, projects
# <storage root>/projects/<group>. The demo gives /arc as root (the paths sessions in the cluster
# see; also the spawner's default for a root hub) and <repo>/demo/arc otherwise (sessions then find
# the root at ~/arc too).
if os.environ.get("CASASPAWNER_STORAGE_ROOT"):
    c.LocalCASASpawner.storage_root = os.environ["CASASPAWNER_STORAGE_ROOT"]
if os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR"):
    # per-release CASA environments, shared measures data, downloaded tarballs
    c.LocalCASASpawner.environments_dir = os.environ["CASASPAWNER_ENVIRONMENTS_DIR"]
# Run the nearest installable CASA (marked "approximate") when a dataset's exact build cannot be
# installed.
c.LocalCASASpawner.allow_approximate = (
    os.environ.get("CASASPAWNER_ALLOW_APPROXIMATE", "true") == "true"
)
# The form suggests the demo dataset to a user who has named none yet.
if os.environ.get("CASASPAWNER_DEMO_DATASET"):
    c.LocalCASASpawner.suggested_datasets = [os.environ["CASASPAWNER_DEMO_DATASET"]]

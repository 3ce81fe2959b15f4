# The hub of the k8s tier's end-to-end test (tests/k8s/test_browser.py):
# hub-config/jupyterhub_config.py as shipped (OIDC login with auth_state, CASASpawner,
# casa-sessions), on this repository's cluster (cluster/). The tests run it inside the cluster's
# network namespace, where pods reach the hub at the node's address and the proxy reaches pods at
# theirs; KUBECONFIG holds the token of the hub's ServiceAccount (Zero to JupyterHub's hub Role).
# Settings come from the environment, as for the shipped file (OIDC_ISSUER,
# CASA_STORAGE_HUB_PATH, CASASPAWNER_IMAGE_REGISTRY …), plus:
#
#   CASA_K8S_WORKDIR       the hub's database, cookie secret and pid file
#   CASA_K8S_PORT          the proxy's public port on 127.0.0.1
#   CASA_K8S_HUB_PORT      the hub's API port, on the node's address (10.244.0.1)
#   CASA_K8S_PROXY_PORT    the proxy's API port on 127.0.0.1
#   CASA_K8S_NAMESPACE     where sessions run: the namespace of the hub's ServiceAccount
#   CASA_K8S_ADMIN_TOKEN   the tests' own API token (a service with admin scopes)
import os
from pathlib import Path

c = get_config()  # noqa: F821
load_subconfig(str(Path(__file__).resolve().parents[1] / "jupyterhub_config.py"))  # noqa: F821

env = os.environ
workdir = Path(env["CASA_K8S_WORKDIR"])
# Pods reach the network namespace at the node's address (cluster/README.md).
node_ip = "10.244.0.1"
c.JupyterHub.bind_url = f"http://127.0.0.1:{env['CASA_K8S_PORT']}"
c.JupyterHub.hub_bind_url = f"http://{node_ip}:{env['CASA_K8S_HUB_PORT']}"
c.JupyterHub.hub_connect_url = f"http://{node_ip}:{env['CASA_K8S_HUB_PORT']}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env['CASA_K8S_PROXY_PORT']}"
c.JupyterHub.db_url = f"sqlite:///{workdir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(workdir / "cookie_secret")
c.JupyterHub.pid_file = str(workdir / "jupyterhub.pid")
c.JupyterHub.log_level = "DEBUG"
c.JupyterHub.cleanup_servers = True

c.CASASpawner.namespace = env["CASA_K8S_NAMESPACE"]
# A session's Jupyter server imports CASA's Python before it answers.
c.CASASpawner.http_timeout = 180

# The tests' own API client: servers, their state, and auth_state (the token the pod must hold).
c.JupyterHub.services.append({"name": "k8s-tests", "api_token": env["CASA_K8S_ADMIN_TOKEN"]})
c.JupyterHub.load_roles.append(
    {
        "name": "k8s-tests",
        "scopes": ["admin:users", "admin:auth_state", "admin:servers", "admin:server_state"],
        "services": ["k8s-tests"],
    }
)

# The hub of make bench-kube's scale run (benchmarks/kube_scale.py): hub-config/k8s-test as the
# k8s tier runs it (so the shipped configuration and casa-sessions), with sessions on kwok's fake
# nodes. Users and their auth_state come from the hub's API (the benchmark's token may set them):
# nobody logs in. Besides the k8s tier's variables (see hub-config/k8s-test), it reads
#
#   KUBE_SCALE_SPAWNER   JSON: CASASpawner settings (fake nodes, image, command, sizes)
import json
import os
from pathlib import Path

from jupyterhub.auth import Authenticator

c = get_config()  # noqa: F821
load_subconfig(  # noqa: F821
    str(Path(__file__).resolve().parents[1] / "hub-config" / "k8s-test" / "jupyterhub_config.py")
)


class PresetAuthenticator(Authenticator):
    """Lets nobody log in: the benchmark makes the users and sets their auth_state."""

    async def authenticate(self, handler, data):  # type: ignore[no-untyped-def]
        return None


c.JupyterHub.authenticator_class = PresetAuthenticator
c.Authenticator.enable_auth_state = True
c.Authenticator.allow_all = True
c.JupyterHub.log_level = "INFO"
# The namespace goes at the end, with every pod in it.
c.JupyterHub.cleanup_servers = False
c.JupyterHub.concurrent_spawn_limit = 0
for name, value in json.loads(os.environ["KUBE_SCALE_SPAWNER"]).items():
    setattr(c.CASASpawner, name, value)
# The benchmark's token opens casa-sessions as an operator's does.
for role in c.JupyterHub.load_roles:
    if role.get("name") == "k8s-tests":
        role["scopes"] = [*role["scopes"], "access:services!service=casa-sessions"]

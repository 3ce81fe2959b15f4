"""The cluster of the ``k8s`` tier: someone's own, or this repository's.

Someone's own is ``$KUBECONFIG``'s; this repository's is ``cluster/up``'s. The repository's cluster
runs inside network namespace ``casaspawner-k8s``: its API server answers on ``127.0.0.1`` both
there and on the host (same port, one kubeconfig), pod IPs answer only inside the namespace, and
pods reach the namespace at :data:`NODE_IP` (where a hub started with
:meth:`Cluster.netns_argv` listens). See ``cluster/README.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO / "cluster"
NETNS = "casaspawner-k8s"
# The node's address in the namespace: pods reach processes of the namespace there.
NODE_IP = "10.244.0.1"
# The label that makes the API server refuse pods below the restricted Pod Security level.
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# The tests' own image: Debian's static busybox (``/bin/busybox``) and ``/www/index.html``, made
# with buildah and imported into the repository's cluster; on someone's own cluster,
# ``$CASASPAWNER_K8S_BUSYBOX_IMAGE``.
BUSYBOX_IMAGE = "localhost/casaspawner/busybox:k8s-tier"
WWW_INDEX = "casaspawner k8s tier\n"


class ClusterUnavailable(Exception):
    """No cluster can be had here: no ``$KUBECONFIG``, and not root for the repository's own."""


@dataclass(frozen=True)
class Cluster:
    """Where the tests' cluster is and how to reach what runs in it."""

    kubeconfig: Path
    # The network namespace pod IPs answer in; None for someone's own cluster (pod IPs are then
    # reached, if at all, from this host as it is).
    netns: str | None
    # Whether this session started the repository's cluster (and so stops it at the end).
    started: bool = False

    @property
    def own(self) -> bool:
        """Is this the repository's cluster (``cluster/up``'s), not ``$KUBECONFIG``'s?"""
        return self.netns is not None

    def netns_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the cluster's network namespace (as is, on someone's own)."""
        if self.netns is None:
            return list(argv)
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def run_in_netns(
        self, argv: Sequence[str], timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` where the pod IPs answer.

        Its output is captured as text; its exit code is not checked.
        """
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        return subprocess.run(
            self.netns_argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
            **kwargs,
        )

    async def api_client(self) -> Any:
        """A kubernetes_asyncio ApiClient for this cluster (close it, or use ``async with``)."""
        from kubernetes_asyncio import config

        return await config.new_client_from_config(
            config_file=str(self.kubeconfig), persist_config=False
        )

    async def ws_api_client(self) -> Any:
        """A WsApiClient (exec, attach) for this cluster."""
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import Configuration
        from kubernetes_asyncio.stream import WsApiClient

        configuration = Configuration()
        await config.load_kube_config(
            config_file=str(self.kubeconfig),
            client_configuration=configuration,
            persist_config=False,
        )
        return WsApiClient(configuration=configuration)

    async def create_namespace(self, api: Any, prefix: str = "casaspawner-k8s") -> str:
        """Create a namespace with a fresh name that enforces the restricted Pod Security level."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.rest import ApiException

        name = f"{prefix}-{secrets.token_hex(3)}"
        body = {"metadata": {"name": name, "labels": dict(RESTRICTED)}}
        core = client.CoreV1Api(api)
        await core.create_namespace(body)
        # Pods are refused until the controller-manager gives the namespace its ServiceAccount
        # (after an API server restart its watches take a while to come back).
        deadline = time.monotonic() + 120
        while True:
            try:
                await core.read_namespaced_service_account("default", name)
                return name
            except ApiException as error:
                if error.status != 404 or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    def import_image(self, reference: str) -> None:
        """Put ``reference`` from this machine's podman storage into the repository's cluster."""
        if not self.own:
            raise RuntimeError("images are imported only into the repository's own cluster")
        subprocess.run(
            [str(CLUSTER_DIR / "import-image"), reference],
            check=True,
            capture_output=True,
            text=True,
        )


def cluster_from_environment() -> Cluster:
    """``$KUBECONFIG``'s cluster when set, else the repository's, started when not running.

    A ``$KUBECONFIG`` naming the repository's kubeconfig is the repository's own cluster.
    """
    own_kubeconfig = REPO / ".cache" / "k8s" / "kubeconfig"
    if os.environ.get("KUBECONFIG"):
        kubeconfig = Path(os.environ["KUBECONFIG"])
        own = kubeconfig.resolve() == own_kubeconfig.resolve()
        return Cluster(kubeconfig=kubeconfig, netns=NETNS if own else None)
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            "the repository's cluster needs root (cluster/up); or set KUBECONFIG"
        )
    result = subprocess.run([str(CLUSTER_DIR / "up")], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cluster/up failed:\n{result.stdout}{result.stderr}")
    started = "already running" not in result.stdout
    return Cluster(kubeconfig=own_kubeconfig, netns=NETNS, started=started)


def stop(cluster: Cluster) -> None:
    """Stop the repository's cluster if this session started it (``CLUSTER_KEEP=1`` keeps it)."""
    if cluster.started and os.environ.get("CLUSTER_KEEP") != "1":
        subprocess.run([str(CLUSTER_DIR / "down")], capture_output=True, check=True)


def busybox_image(cluster: Cluster) -> str:
    """The tests' busybox image, in the cluster.

    Built with buildah from Debian's busybox-static when missing, then imported into the
    repository's cluster; someone's own cluster names one in ``$CASASPAWNER_K8S_BUSYBOX_IMAGE``.
    """
    if not cluster.own:
        return os.environ.get("CASASPAWNER_K8S_BUSYBOX_IMAGE", "")
    if (
        subprocess.run(
            ["buildah", "inspect", BUSYBOX_IMAGE], capture_output=True, check=False
        ).returncode
        != 0
    ):
        build_busybox_image()
    cluster.import_image(BUSYBOX_IMAGE)
    return BUSYBOX_IMAGE


def build_busybox_image() -> None:
    """``buildah from scratch``, /bin/busybox and /www/index.html; nothing is run inside."""
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
        capture_output=True,
        text=True,
        check=False,
    )
    if "install ok installed" not in installed.stdout:
        raise RuntimeError(
            "the tests' image needs Debian's busybox-static (make deps installs it)"
        )
    busybox = shutil.which("busybox") or "/bin/busybox"
    container = buildah("from", "scratch")
    try:
        with tempfile.TemporaryDirectory() as www:
            Path(www, "index.html").write_text(WWW_INDEX)
            buildah("copy", container, busybox, "/bin/busybox")
            buildah("copy", container, www, "/www")
        buildah("config", "--entrypoint", '["/bin/busybox"]', "--user", "1000:1000", container)
        buildah("commit", "--quiet", container, BUSYBOX_IMAGE)
    finally:
        buildah("rm", container)


@contextlib.contextmanager
def registry(cluster: Cluster, workdir: Path) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 in the cluster's namespace; yields its address.

    containerd pulls from a registry on localhost over plain HTTP.
    """
    port = 15000 + secrets.randbelow(1000)
    storage = workdir / "registry"
    storage.mkdir()
    config = workdir / "registry.yml"
    config.write_text(
        "version: 0.1\nlog: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    with (workdir / "registry.log").open("wb") as log:
        process = subprocess.Popen(
            cluster.netns_argv(["docker-registry", "serve", str(config)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def push(cluster: Cluster, image: str, target: str, timeout: float = 30) -> None:
    """Push ``image`` from this machine's storage to ``target`` in a registry of :func:`registry`.

    The registry may still be starting: the push is tried again until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        argv = ["buildah", "push", "--quiet", "--tls-verify=false", image, f"docker://{target}"]
        pushed = cluster.run_in_netns(argv, timeout=timeout)
        if pushed.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"buildah could not push {image} to {target}: {pushed.stderr}")
        time.sleep(0.5)


def buildah(*args: str) -> str:
    return subprocess.run(
        ["buildah", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def restart_apiserver(cluster: Cluster, down_for: float = 0) -> None:
    """Stop the repository's API server and start it again (``cluster/restart-apiserver``)."""
    if not cluster.own:
        raise RuntimeError("only the repository's own cluster's API server can be restarted")
    subprocess.run(
        [str(CLUSTER_DIR / "restart-apiserver"), str(down_for)],
        check=True,
        capture_output=True,
        text=True,
    )

"""Fixtures of the ``k8s`` tier: a real cluster and what the hub has on it.

* ``cluster`` (session): ``$KUBECONFIG``'s cluster, or the repository's own (started when it is not
  running, stopped at the end unless ``CLUSTER_KEEP=1``); ``api``: an admin API client;
  ``namespace``: a fresh namespace enforcing the restricted Pod Security level; ``busybox``: the
  tests' image, in the cluster; ``pushed_busybox``: the same in a registry the node pulls from.
* ``hub``: a restricted namespace with the hub's ServiceAccount (Zero to JupyterHub's hub Role, a
  token kubeconfig), Cavern and the measures bound to their claims, and in-process
  ``CASASpawner``\\ s acting as that ServiceAccount.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from k8s_hub import (
    Hub,
    bind_storage,
    create_hub_account,
    delete_volumes,
    remove_tree,
    write_cavern,
)

from cluster import (
    Cluster,
    ClusterUnavailable,
    busybox_image,
    cluster_from_environment,
    push,
    registry,
    stop,
)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The cluster: ``$KUBECONFIG``'s when set; else the repository's.

    The repository's is started by ``cluster/up`` when it is not running (and then stopped at the
    end unless ``CLUSTER_KEEP=1``). A failed start fails the tests.
    """
    try:
        found = cluster_from_environment()
    except ClusterUnavailable as reason:
        pytest.skip(str(reason))
    yield found
    stop(found)


@pytest_asyncio.fixture(loop_scope="function")
async def api(cluster: Cluster) -> AsyncIterator[Any]:
    """A kubernetes_asyncio ApiClient for the cluster, as its admin."""
    async with await cluster.api_client() as client:
        yield client


@pytest_asyncio.fixture(loop_scope="function")
async def namespace(cluster: Cluster, api: Any) -> AsyncIterator[str]:
    """A fresh namespace enforcing the restricted Pod Security level, deleted afterwards."""
    from kubernetes_asyncio import client

    name = await cluster.create_namespace(api)
    yield name
    with contextlib.suppress(Exception):
        await client.CoreV1Api(api).delete_namespace(name)


@pytest.fixture(scope="session")
def busybox(cluster: Cluster) -> str:
    """The tests' busybox image, in the cluster.

    On someone's own cluster it is ``$CASASPAWNER_K8S_BUSYBOX_IMAGE``, or the test skips.
    """
    image = busybox_image(cluster)
    if not image:
        pytest.skip(
            "set CASASPAWNER_K8S_BUSYBOX_IMAGE to an image with /bin/busybox and /www/index.html"
        )
    return image


@pytest.fixture(scope="session")
def pushed_busybox(cluster: Cluster, busybox: str) -> Iterator[str]:
    """The busybox image in a registry on 127.0.0.1 in the cluster's namespace, as pulled images
    are named in a real deployment: the node pulls it, and its digest names it again."""
    if not cluster.own:
        pytest.skip("the registry runs in the repository's own cluster's namespace")
    workdir = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-registry-"))
    try:
        with registry(cluster, workdir) as address:
            image = f"{address}/k8s-tier/busybox:pushed"
            push(cluster, busybox, image)
            yield image
    finally:
        remove_tree(workdir)


@pytest.fixture(scope="session")
def cavern() -> Iterator[Path]:
    """A Cavern tree on this machine: alice's home with a dataset of every era, her project.

    The node mounts it through a ``hostPath`` PersistentVolume (the node is this machine).
    """
    root = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-cavern-"))
    try:
        yield write_cavern(root)
    finally:
        remove_tree(root)


@pytest.fixture(scope="session")
def no_measures() -> Iterator[Path]:
    """An empty measures tree, for sessions that never start CASA."""
    root = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-measures-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        remove_tree(root)


@pytest_asyncio.fixture(loop_scope="function")
async def hub(
    cluster: Cluster,
    api: Any,
    namespace: str,
    busybox: str,
    cavern: Path,
    no_measures: Path,
    tmp_path: Path,
) -> AsyncIterator[Hub]:
    """The hub's account and storage in a fresh restricted namespace; cleaned up afterwards."""
    from kubespawner import KubeSpawner

    account = await create_hub_account(api, namespace, cluster.kubeconfig, tmp_path)
    volumes = await bind_storage(api, namespace, cavern, no_measures)
    try:
        yield Hub(cluster, account, cavern, busybox)
    finally:
        await KubeSpawner._stop_all_reflectors()
        await delete_volumes(api, volumes)


@pytest.fixture(scope="session")
def measures() -> Path:
    """The CASA measures data (casadata), fetched once per machine as local hubs fetch it."""
    from casaspawner.local.environments import EnvironmentManager
    from casaspawner.runtime import cache_dir

    manager = EnvironmentManager(
        Path(os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR") or cache_dir())
    )

    async def fetch() -> None:
        async for message in manager.ensure_measures():
            print(f"[k8s] {message}")

    asyncio.run(fetch())
    path = manager.measures_dir()
    assert (path / "geodetic").is_dir(), f"no CASA measures data at {path}"
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With ``CASASPAWNER_K8S_NO_SKIP=1`` (``make k8s-test``), a skipped test fails."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CASASPAWNER_K8S_NO_SKIP") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped, which make k8s-test does not allow: {report.longrepr}"


#: The order of the tier's modules: the harness first, the API server's restarts last (the
#: controller-manager's watches take a while to come back after one).
ORDER = ("test_cluster", "test_admission", "test_lifecycle", "test_failures", "test_browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = Path(str(item.fspath)).stem
        if Path(str(item.fspath)).parent != Path(__file__).parent:
            return -1
        return ORDER.index(module) if module in ORDER else len(ORDER)

    items.sort(key=rank)

"""Fixtures of the ``k8s`` tier: a real cluster (``$KUBECONFIG``'s, or the repository's own), an API client, a
fresh namespace under the restricted Pod Security level, the tests' busybox image."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from cluster import Cluster, ClusterUnavailable, busybox_image, cluster_from_environment, stop


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The cluster: ``$KUBECONFIG``'s when set; else the repository's, started by ``cluster/up`` when it is not
    running (and then stopped at the end unless ``CLUSTER_KEEP=1``). A failed start fails the tests."""
    try:
        found = cluster_from_environment()
    except ClusterUnavailable as reason:
        pytest.skip(str(reason))
    yield found
    stop(found)


@pytest_asyncio.fixture(loop_scope="function")
async def api(cluster: Cluster) -> AsyncIterator[Any]:
    """A kubernetes_asyncio ApiClient for the cluster."""
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
    """The tests' busybox image, in the cluster (skips on someone's own cluster that names none)."""
    image = busybox_image(cluster)
    if not image:
        pytest.skip("set CASASPAWNER_K8S_BUSYBOX_IMAGE to an image with /bin/busybox and /www/index.html")
    return image

"""Fixtures of the Kubernetes tier: a CASASpawner factory and a kmock cluster.

The pure modules' tests (objects, podsecurity, events, quantities) run without the hub extra;
whatever needs KubeSpawner skips when jupyterhub-kubespawner is not installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support.users import FakeUser, auth_state

HAS_KUBESPAWNER = importlib.util.find_spec("kubespawner") is not None


def need_kubespawner() -> None:
    pytest.importorskip(
        "kubespawner", reason="CASASpawner tests need the hub extra (jupyterhub-kubespawner)"
    )


@pytest.fixture(autouse=True)
def _placeholder_kubeconfig(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """KubeSpawner loads a kubeconfig when constructed; these tests never contact its server.

    Without KubeSpawner there is nothing to point. The real cluster's tests live in tests/k8s.
    """
    if not HAS_KUBESPAWNER:
        yield
        return
    from kubernetes_asyncio.config import kube_config
    from support.kube import PLACEHOLDER_KUBECONFIG, use_kubeconfig

    previous = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    path = tmp_path_factory.getbasetemp() / "placeholder-kubeconfig"
    path.write_text(PLACEHOLDER_KUBECONFIG)
    use_kubeconfig(path)
    try:
        yield
    finally:
        use_kubeconfig(Path(previous))


@pytest.fixture
def make_spawner(storage: Path) -> Callable[..., Any]:
    """Build a CASASpawner the way the hub does (config traits + user); needs a running loop."""
    need_kubespawner()
    from casaspawner.kube.spawner import CASASpawner

    def build(user: FakeUser | None = None, **config: Any) -> CASASpawner:
        config.setdefault("storage_hub_path", str(storage))
        config.setdefault("namespace", "test")
        user = user or FakeUser(auth_state=auth_state(groups=("proja",)))
        return CASASpawner(_mock=True, user=user, **config)

    return build


@pytest_asyncio.fixture(loop_scope="function")
async def cluster(tmp_path: Path) -> AsyncIterator[Any]:
    """A kmock Kubernetes emulator on 127.0.0.1 that KubeSpawner talks to."""
    need_kubespawner()
    from kubespawner import KubeSpawner
    from support.kube import emulated_cluster, use_kubeconfig

    async with emulated_cluster(tmp_path / "kubeconfig") as (emulator, server):
        use_kubeconfig(tmp_path / "kubeconfig")
        try:
            yield emulator, server
        finally:
            await KubeSpawner._stop_all_reflectors()

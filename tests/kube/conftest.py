"""Fixtures for CASASpawner tests: storage trees, spawner factory, kmock cluster."""

from __future__ import annotations

import os
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
from kube_support import PLACEHOLDER_KUBECONFIG, Emulator, FakeUser, auth_state, kubeconfig_for

from casaspawner.datasets.synth import write_dataset

pytest.importorskip("kubespawner", reason="CASASpawner tests need the hub extra (jupyterhub-kubespawner)")


def use_kubeconfig(path: Path) -> None:
    """Point KubeSpawner's config loader at ``path`` (kubernetes_asyncio reads KUBECONFIG only at import)."""
    from kubernetes_asyncio.config import kube_config
    from kubespawner.clients import load_config

    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    load_config.cache_clear()


@pytest.fixture(autouse=True)
def _placeholder_kubeconfig(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """KubeSpawner loads a kubeconfig when constructed; these tests never contact the placeholder server.

    Tests marked ``k8s`` keep the real ``KUBECONFIG``.
    """
    from kubernetes_asyncio.config import kube_config

    previous = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    if request.node.get_closest_marker("k8s"):
        use_kubeconfig(Path(os.environ.get("KUBECONFIG", previous)))
        yield
        use_kubeconfig(Path(previous))
        return
    path = tmp_path_factory.getbasetemp() / "placeholder-kubeconfig"
    path.write_text(PLACEHOLDER_KUBECONFIG)
    use_kubeconfig(path)
    try:
        yield
    finally:
        use_kubeconfig(Path(previous))


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Cavern-like storage root: alice's home with datasets of several eras, a project, bob's home."""
    root = tmp_path_factory.mktemp("cavern")
    for era in ("cycle10", "cycle7", "cycle3-pipeline", "cycle2-manual", "no-evidence"):
        write_dataset(root / "home" / "alice" / "data" / era, era)
    write_dataset(root / "projects" / "proja" / "shared", "cycle9")
    write_dataset(root / "home" / "bob" / "data", "cycle8")
    (root / "home" / "alice" / "escape").symlink_to(root / "home" / "bob" / "data")
    (root / "home" / "alice" / "loop").symlink_to(root / "home" / "alice" / "data")
    return root


def dataset_in(storage: Path, user: str, era: str) -> str:
    """The path of a synthetic dataset as the user types it (relative to their home)."""
    base = storage / "home" / user / "data" / era
    member = next(base.glob("*/science_goal.*/group.*/member.*"))
    return str(member.relative_to(storage / "home" / user))


@pytest.fixture
def make_spawner(storage: Path) -> Callable[..., Any]:
    """Build a CASASpawner the way the hub does (config traits + user); needs a running loop."""
    from casaspawner.kube.spawner import CASASpawner

    def build(user: FakeUser | None = None, **config: Any) -> CASASpawner:
        config.setdefault("storage_hub_path", str(storage))
        config.setdefault("namespace", "test")
        return CASASpawner(
            _mock=True, user=user or FakeUser(auth_state=auth_state(groups=("proja",))), **config
        )

    return build


@pytest_asyncio.fixture(loop_scope="function")
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[Emulator, kmock.Server]]:
    """A kmock Kubernetes emulator on 127.0.0.1 that KubeSpawner talks to."""
    from kubespawner import KubeSpawner

    async with Emulator() as emulator, kmock.Server(emulator) as server:
        with warnings.catch_warnings():  # kmock 0.8 reads its bundled resources with a deprecated API
            warnings.simplefilter("ignore", DeprecationWarning)
            emulator.resources.load_bundled()
        use_kubeconfig(kubeconfig_for(tmp_path / "kubeconfig", str(server.url).rstrip("/")))
        try:
            yield emulator, server
        finally:
            await KubeSpawner._stop_all_reflectors()

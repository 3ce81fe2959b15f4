"""Fixtures for the local-mode tests: the demo's CASA environment and dataset, a real hub, a real
browser.

The demo is prepared and the hub runs from a copy of this checkout in a directory only its owner
can enter (as a clone in ``/root`` would be), so whatever a session's user needs must come from
somewhere they can read.

The expensive parts are cached outside the clone (``~/.cache/casaspawner``, or
``/var/cache/casaspawner`` as root): the CASA environment per release, the measures data, the
sessions' Jupyter environment and the demo MeasurementSet. A warm run reuses them all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import REPO
from support.browser import CHROMIUM, chromium
from support.hub import Hub

import casaspawner
from casaspawner.catalog.model import Release
from casaspawner.datasets.synth import DatasetSpec, write_dataset
from casaspawner.local import demo
from casaspawner.local.demo import as_owner_of
from casaspawner.local.environments import CasaEnvironment, EnvironmentManager
from casaspawner.net import free_port
from casaspawner.runtime import cache_dir as default_cache_dir

#: The test hub's configuration, relative to a checkout (it loads ``hub-config/local`` of the same
#: checkout).
TEST_CONFIG = Path("tests") / "local" / "jupyterhub_config.py"

#: Releases only the test hub knows: one whose wheels do not exist (the build fails), one whose
#: wheels need a Python this machine lacks.
BROKEN_RELEASES = """
  - id: casa-1.0.0-1
    role: modular
    casa: "1.0.0-1"
    python: "3.11"
    os: manylinux
    tarball: null
    wheels: {python: ["3.11"], casatools: "1.0.0.1", casatasks: "1.0.0.1"}
    data: casaconfig
    confidence: unconfirmed
    note: "Test release: these wheels do not exist, so building its environment fails."

  - id: casa-6.6.6-1
    role: modular
    casa: "6.6.6-1"
    python: "3.4"
    os: manylinux
    tarball: null
    wheels: {python: ["3.4"], casatools: "6.6.6.1", casatasks: "6.6.6.1"}
    data: casaconfig
    confidence: unconfirmed
    note: "Test release: needs Python 3.4, which no test machine has."
"""

DATASETS = {
    "broken-build": DatasetSpec("2030.1.00001.S", "uid___A001_X9999_X11", "1.0.0.1", None),
    "missing-python": DatasetSpec("2030.1.00002.S", "uid___A001_X9999_X21", "6.6.6.1", None),
    "cycle10": DatasetSpec("2023.1.00026.S", "uid___A001_X3621_X3d68", "6.5.4.9", "2023.1.0.124"),
}


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR") or default_cache_dir())


@pytest.fixture(scope="session")
def demo_release(cache_dir: Path) -> Release:
    """The release the demo runs on this machine (the newest modular one it can install)."""
    return demo.demo_release(EnvironmentManager(cache_dir))


@pytest.fixture(scope="session")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the demo and the test hub need of this checkout, copied into a directory only its owner
    enters."""
    base = tmp_path_factory.mktemp("private")
    base.chmod(0o700)
    copy = base / "casaspawner-checkout"
    copy.mkdir(mode=0o700)
    for name in ("casaspawner", "hub-config"):
        shutil.copytree(
            REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    (copy / TEST_CONFIG).parent.mkdir(parents=True)
    shutil.copy(REPO / TEST_CONFIG, copy / TEST_CONFIG)
    return copy


def from_checkout(checkout: Path, cache_dir: Path) -> dict[str, str]:
    """The environment to run casaspawner from ``checkout`` (not from this repository)."""
    return {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "CASASPAWNER_ENVIRONMENTS_DIR": str(cache_dir),
    }


@pytest.fixture(scope="session")
def demo_root(cache_dir: Path, checkout: Path) -> Iterator[Path]:
    """The demo's state directory, prepared by ``python -m casaspawner.local.demo prepare`` (what
    ``make demo`` runs) from the private checkout; the storage root is ``<root>/arc``.

    It lives in a directory every user can search (pytest's own temporary directories are private
    to root), because sessions of the demo's local account read the storage under it.
    """
    root = Path(tempfile.mkdtemp(prefix="casaspawner-local-tests-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        storage = root / "arc"
        prepared = subprocess.run(
            [
                sys.executable,
                "-m",
                "casaspawner.local.demo",
                "prepare",
                "--dir",
                str(root),
                "--storage",
                str(storage),
            ],
            cwd=checkout,
            env=from_checkout(checkout, cache_dir),
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
        home = storage / "home" / demo.DEMO_USER
        assert f"Demo dataset ready at {home / demo.DEMO_PROJECT}" in prepared.stdout, (
            prepared.stdout
        )
        # Hidden: not in the screenshots.
        as_owner_of(home, write_test_datasets, home / ".tests")
        yield root
    finally:
        # Keep it to read session logs after a failure.
        if not os.environ.get("CASASPAWNER_KEEP_TEST_ROOT"):
            shutil.rmtree(root, ignore_errors=True)


def write_test_datasets(base: Path) -> None:
    for name, spec in DATASETS.items():
        write_dataset(base / name, spec=spec)


@pytest.fixture(scope="session")
def demo_env(cache_dir: Path, demo_root: Path, demo_release: Release) -> CasaEnvironment:
    env = EnvironmentManager(cache_dir).ready(demo_release)
    assert env is not None
    return env


@pytest.fixture(scope="session")
def test_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = (Path(casaspawner.__file__).parent / "catalog" / "releases.yaml").read_text()
    marker = "\nnon_alma_pipelines:"
    assert marker in text
    text = text.replace(marker, BROKEN_RELEASES + marker, 1)
    path = tmp_path_factory.mktemp("catalog") / "releases.yaml"
    path.write_text(text)
    path.parent.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def hub(demo_root: Path, cache_dir: Path, test_catalog: Path, checkout: Path) -> Iterator[Hub]:
    """A real JupyterHub (LocalCASASpawner, the demo's config) on free loopback ports, run from the
    private checkout."""
    token = secrets.token_hex(16)
    password = secrets.token_urlsafe(12)
    root = demo_root
    # The proxy, its API, the hub and casa-sessions.
    port = free_port(count=4)
    env = demo.hub_environment(root, port, password, cache_dir, root / "arc")
    env.update({"CASASPAWNER_TEST_CATALOG": str(test_catalog), "CASASPAWNER_TEST_TOKEN": token})
    # Sessions ask casa-sessions for their notices every second.
    env["CASA_NOTICES_INTERVAL"] = "1"
    env["PYTHONPATH"] = str(checkout)
    config = checkout / TEST_CONFIG
    hub = Hub(config, root / "hub", env, port, token=token, user=demo.DEMO_USER, password=password)
    hub.start()
    try:
        yield hub
    finally:
        try:
            if hub.process is None:
                hub.start()
            hub.stop_server()
        finally:
            hub.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make deps installs it)")
    with chromium() as browser:
        yield browser

"""Fixtures for the ``images`` tier: real buildah/podman builds on an mmdebstrap Debian base.

Builds go through the real ``casaspawner images build`` command and reuse images whose input hash
is unchanged, so a warm run only re-runs the checks. Caches live under
``~/.cache/casaspawner/images``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from support.images import CASADATA, MODULAR, PLOTMS, REGISTRY, build

from casaspawner.catalog import Catalog
from casaspawner.images import engine
from casaspawner.images.matrix import MatrixOptions, Recipe, build_matrix


@pytest.fixture(scope="session")
def tools() -> engine.Tools:
    for tool in ("buildah", "podman", "mmdebstrap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (`make deps` installs it)")
    return engine.detect_tools()


@pytest.fixture(scope="session")
def built(tools: engine.Tools, catalog: Catalog) -> dict[str, Recipe]:
    """The session base, the session image and one modular CASA image, built (or reused) with the
    real CLI."""
    result, seconds = build("--registry", REGISTRY, "--release", MODULAR)
    assert result.returncode == 0, result.stderr + result.stdout
    print(f"\n[images] session + {MODULAR}: {seconds:.0f} s\n{result.stdout}")
    recipes = build_matrix(catalog, MatrixOptions(registry=REGISTRY), [MODULAR])
    probe = engine.detect_tools(probe_image=recipes[0].image)
    tools.env, tools.run_flags, tools.network = probe.env, probe.run_flags, probe.network
    return {r.name: r for r in recipes}


def pip_target(requirement: str, kind: str) -> Path:
    """``requirement`` installed once (no dependencies) into a directory of the images cache."""
    target = engine.CACHE_DIR / kind / requirement.replace("==", "-")
    if not target.is_dir():
        partial = target.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        pip: Sequence[str] = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(partial),
        ]
        subprocess.run([*pip, requirement], check=True, timeout=900)
        partial.rename(target)
    return target


@pytest.fixture(scope="session")
def measures() -> Path:
    """The ``casadata`` package's data directory (installed once into the cache), as a measures
    tree."""
    target = pip_target(CASADATA, "casadata")
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import casadata; "
            "print(casadata.datapath)",
            str(target),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = Path(found)
    assert (path / "geodetic").is_dir(), f"casadata has no geodetic tables at {path}"
    return path


@pytest.fixture(scope="session")
def plotms_appimage() -> Path:
    """A real CASA GUI AppImage: casaplotms's, from its PyPI wheel (installed once, cached)."""
    bin_dir = pip_target(PLOTMS, "casaplotms") / "casaplotms" / "__bin__"
    (appimage,) = bin_dir.glob("*.AppImage")
    return appimage

"""Fixtures shared by every test tier, and the tests' support package on ``sys.path``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Every tier imports its helpers as ``support.<topic>`` (tests/support/).
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from support.datasets import write_cavern  # noqa: E402

from casaspawner.catalog import Catalog, load_catalog  # noqa: E402


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Cavern-like storage root: alice's home with datasets of several eras, a project, bob's."""
    return write_cavern(tmp_path_factory.mktemp("cavern"))

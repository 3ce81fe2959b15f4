"""Fixtures shared by every test tier."""

from __future__ import annotations

from pathlib import Path

import pytest

from casaspawner.catalog import Catalog, load_catalog

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()

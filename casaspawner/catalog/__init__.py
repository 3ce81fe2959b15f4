"""The catalog of ALMA pipeline and CASA releases, and version normalisation.

The catalog itself is ``releases.yaml``. It pairs each ALMA pipeline with its CASA release.
"""

from casaspawner.catalog.model import (
    Catalog,
    Release,
    Tarball,
    Wheels,
    load_catalog,
    parse_catalog,
)
from casaspawner.catalog.versions import (
    CasaVersion,
    normalize_casa,
    normalize_pipeline,
    parse_casa,
)

__all__ = [
    "CasaVersion",
    "Catalog",
    "Release",
    "Tarball",
    "Wheels",
    "load_catalog",
    "normalize_casa",
    "normalize_pipeline",
    "parse_casa",
    "parse_catalog",
]

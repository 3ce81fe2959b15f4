"""The ALMA pipeline ↔ CASA release catalog (``releases.yaml``) and version normalisation."""

from casaspawner.catalog.model import Catalog, Release, Tarball, Wheels, load_catalog, parse_catalog
from casaspawner.catalog.versions import CasaVersion, normalize_casa, normalize_pipeline, parse_casa

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

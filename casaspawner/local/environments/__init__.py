"""Per-release CASA environments for sessions on one machine (venvs from wheels, unpacked tarballs)."""

from casaspawner.environments.build import (
    CasaEnvironment,
    EnvironmentBuildError,
    EnvironmentManager,
    default_cache_dir,
    site_config_text,
)
from casaspawner.environments.pythons import find_python

__all__ = [
    "CasaEnvironment",
    "EnvironmentBuildError",
    "EnvironmentManager",
    "default_cache_dir",
    "find_python",
    "site_config_text",
]

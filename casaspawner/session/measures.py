"""Measures data kept one directory per version, so a relaunch reads what the session read.

A measures volume updated in place changes what every session reads, past ones' relaunches
included. Kept as ``<volume>/<version>/`` instead (each a whole measures tree, named so that
names sort oldest first, e.g. by date), a session mounts one version by sub-path: a new session
the newest, a relaunch the one its past session read, or a refusal in one sentence when the
operators no longer keep it. The hub reads the volume's top directory, read-only, to choose.
"""

from __future__ import annotations

import os
from pathlib import Path

from casaspawner.errors import ConfigurationError, InvalidInput
from casaspawner.plan import MEASURES_VERSION


def kept_versions(root: Path) -> list[str]:
    """The measures versions kept under ``root``, oldest first (by name).

    Only plain directories holding a measures tree (``geodetic/``) count, not links or files,
    and no name starting with a dot, so a version being copied in as ``.<name>`` and then
    renamed is never chosen half written, and a volume of one tree holds no version.
    """
    try:
        with os.scandir(root) as entries:
            names = [
                e.name
                for e in entries
                if MEASURES_VERSION.fullmatch(e.name)
                and e.is_dir(follow_symlinks=False)
                and os.path.isdir(os.path.join(e.path, "geodetic"))
            ]
    except OSError as exc:
        raise ConfigurationError(
            f"CASASpawner.measures_versions_hub_path {str(root)!r} cannot be read "
            f"({exc.strerror or type(exc).__name__})"
        ) from None
    return sorted(names)


def measures_for(root: Path, earlier: str | None = None) -> str:
    """The version a session reads: ``earlier``'s for a relaunch, else the newest kept."""
    versions = kept_versions(root)
    if earlier:
        if earlier in versions:
            return earlier
        raise InvalidInput(
            f"The measures data that session read ({earlier}) is no longer kept on this hub, "
            "so it cannot be relaunched exactly; start a new session instead."
        )
    if not versions:
        raise ConfigurationError(
            f"CASASpawner.measures_versions_hub_path {str(root)!r} holds no measures version "
            "(one directory per version)"
        )
    return versions[-1]

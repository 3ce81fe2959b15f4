"""The releases a local desktop can add apps of: the ready environments, as one JSON file.

The spawner writes ``desktop-releases.json`` under the environments cache before each desktop
session starts, and hands its path to the session as ``CASASPAWNER_RELEASES_FILE``. The desktop's
right-click menu lists its releases when it is opened, and ``casa-app --release ID`` starts an
app of one of them with that release's variables. The variables come from
:meth:`CasaEnvironment.session_environment`, the very ones the session's own release is started
with: the CASA directory and Python, and casaconfig's site config and casarc pointing at the
shared offline measures with auto-updates off.

Format (``schema: 1``), newest release first::

    {"schema": 1,
     "releases": [{"id": "casa-6.7.0-31", "label": "CASA 6.7.0-31", "casa": "6.7.0-31",
                   "kernel_name": "CASA 6.7.0-31",
                   "apps": ["terminal", "plotms", "viewer", "logger"],
                   "environment": {"CASASPAWNER_CASA_HOME": "...", ...,
                                   "CASASPAWNER_CASA_PYTHONPATH": null}}]}

Every release names the same variables: one its environment does not set is ``null``, which
the desktop unsets, so nothing of the session's own release leaks into another's app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from casaspawner.catalog.model import Catalog
from casaspawner.local.environments.manager import EnvironmentManager
from casaspawner.local.environments.steps import atomic_write

#: The file's name under the environments cache.
RELEASES_FILE = "desktop-releases.json"
#: The variable naming the file in desktop sessions.
RELEASES_FILE_ENV = "CASASPAWNER_RELEASES_FILE"
#: The variable naming casa-sessions' ``api/releases`` in desktop sessions.
RELEASES_URL_ENV = "CASASPAWNER_RELEASES_URL"


def desktop_releases(manager: EnvironmentManager, catalog: Catalog) -> dict[str, Any]:
    """The ready environments of ``catalog``'s releases, newest CASA first."""
    found = []
    for release in catalog.releases:
        env = manager.ready(release)
        # Two releases of one tag share a directory, which names one of them.
        if env is None or env.release_id != release.id:
            continue
        found.append((release, env))
    found.sort(key=lambda pair: pair[0].casa_version._key(), reverse=True)
    variables = {name for _, env in found for name in env.session_environment()}
    releases = []
    for release, env in found:
        own = env.session_environment()
        releases.append(
            {
                "id": release.id,
                "label": release.label,
                "casa": release.casa,
                "kernel_name": release.kernel_name,
                "apps": env.desktop_apps(),
                "environment": {name: own.get(name) for name in sorted(variables)},
            }
        )
    return {"schema": 1, "releases": releases}


def write_desktop_releases(manager: EnvironmentManager, catalog: Catalog) -> Path:
    """Write :func:`desktop_releases` under the cache, readable by every user; its path."""
    path = manager.cache_dir / RELEASES_FILE
    text = json.dumps(desktop_releases(manager, catalog), indent=1) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    return path

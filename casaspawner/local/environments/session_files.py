"""The files local sessions read, installed under the cache: desktop, Lab settings, package."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import casaspawner
from casaspawner.local.environments.steps import EnvironmentBuildError, executable

PACKAGE = Path(casaspawner.__file__).resolve().parent
#: The desktop start script, the CASA launcher and the notices watcher.
DESKTOP_SOURCE = PACKAGE / "insession" / "desktop"
#: JupyterLab settings every session starts with: no news feed (notifications stay on).
#:
#: The file a wheel installs in ``share/jupyter/lab/settings/overrides.d``, which local sessions,
#: with an ``app_settings_dir`` of their own, do not read.
LAB_OVERRIDES = PACKAGE / "insession" / "lab-overrides" / "casaspawner.json"


def install_session_files(cache_dir: Path) -> Path:
    """Install the files sessions read under the cache.

    On a hub running as root, the resolver run as the user reads them too. Sessions never read the
    checkout itself, which may be private, such as a clone in ``/root``.

    - ``session/<hash>/desktop/`` is a copy of ``casaspawner/insession/desktop``.
    - ``session/<hash>/lab-settings/`` holds ``overrides.json``, a copy of :data:`LAB_OVERRIDES`.
    - ``session/<hash>/python/casaspawner/`` is the whole package, for ``python -m casaspawner``.

    ``<hash>`` covers the package's content, so a changed checkout gets a new copy. Returns the
    directory ``session/<hash>``.
    """
    package = PACKAGE
    files = sorted(
        p
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"\0{path.relative_to(package)}\0{executable(path)}\0".encode())
        digest.update(path.read_bytes())
    target = cache_dir / "session" / digest.hexdigest()[:12]
    if (target / "desktop" / "xstartup").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for path in files:
                relative = path.relative_to(package)
                copies = [staging / "python" / "casaspawner" / relative]
                if path.is_relative_to(DESKTOP_SOURCE):
                    copies.append(staging / "desktop" / path.relative_to(DESKTOP_SOURCE))
                if path == LAB_OVERRIDES:
                    copies.append(staging / "lab-settings" / "overrides.json")
                for copy in copies:
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    copy.write_bytes(path.read_bytes())
                    copy.chmod(0o755 if executable(path) else 0o644)
            # Every session reads it.
            for dirpath, _dirs, _files in os.walk(staging):
                os.chmod(dirpath, 0o755)  # noqa: S103
            try:
                os.rename(staging, target)
            except OSError:
                # Unless another process finished the same copy first.
                if not (target / "desktop" / "xstartup").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise EnvironmentBuildError(
            f"The session files could not be installed under {target.parent}: "
            f"{error.strerror or error}."
        ) from None
    return target

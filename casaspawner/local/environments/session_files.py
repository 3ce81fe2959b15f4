"""The files local sessions read, installed under the cache: desktop, Lab settings, package."""

from __future__ import annotations

import hashlib
import json
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
#: The notices' prebuilt JupyterLab extension, which a wheel installs in
#: ``share/jupyter/labextensions/casaspawner-notices``.
LAB_EXTENSION = PACKAGE / "insession" / "labextension"
#: The server extensions a wheel enables through ``jupyter_server_config.d``.
SERVER_CONFIG = PACKAGE / "insession" / "jupyter-config" / "casaspawner.json"

#: The sessions' ``jupyter_server_config.py``; see :func:`server_config_text`.
SERVER_CONFIG_TEMPLATE = """\
# Written by casaspawner: its server extensions, from the session files' copy of the package,
# and the desktop started with the session (desktop/bin/with-desktop).
import os
import sys

if {python!r} not in sys.path:
    sys.path.append({python!r})
c.ServerApp.jpserver_extensions.update({extensions!r})
if os.environ.get("CASASPAWNER_DESKTOP_SOCKET"):
    c.ServerProxy.servers.update({{
        "desktop-websockify": {{
            "unix_socket": os.environ["CASASPAWNER_DESKTOP_SOCKET"],
            "raw_socket_proxy": True,
            "launcher_entry": {{"enabled": False}},
        }},
    }})
"""


def server_config_text(python: Path) -> str:
    """The sessions' ``jupyter_server_config.py``: casaspawner's server extensions and desktop.

    The extensions (the notices) are imported from ``python``, the session files' copy of the
    package, which the Jupyter server's own environment may lack; the path is appended, so a
    casaspawner installed there comes first. A desktop started with the session
    (``desktop/bin/with-desktop``) gets noVNC's websocket, jupyter-remote-desktop-proxy's
    ``desktop-websockify``, which would otherwise start another on the first visit.
    """
    extensions = json.loads(SERVER_CONFIG.read_text())["ServerApp"]["jpserver_extensions"]
    return SERVER_CONFIG_TEMPLATE.format(python=str(python), extensions=extensions)


def install_session_files(cache_dir: Path) -> Path:
    """Install the files sessions read under the cache.

    On a hub running as root, the resolver run as the user reads them too. Sessions never read the
    checkout itself, which may be private, such as a clone in ``/root``.

    - ``session/<hash>/desktop/`` is a copy of ``casaspawner/insession/desktop``.
    - ``session/<hash>/lab-settings/`` holds ``overrides.json``, a copy of :data:`LAB_OVERRIDES`.
    - ``session/<hash>/python/casaspawner/`` is the whole package, for ``python -m casaspawner``.
    - ``session/<hash>/jupyter-config/jupyter_server_config.py`` enables the package's server
      extension (the notices) from that copy, and points noVNC at a desktop started with the
      session: the sessions' ``JUPYTER_CONFIG_PATH``.
    - ``session/<hash>/jupyter/labextensions/casaspawner-notices/`` is the notices' JupyterLab
      extension: on the sessions' ``JUPYTER_PATH``.

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
                if path.is_relative_to(LAB_EXTENSION):
                    labextension = staging / "jupyter" / "labextensions" / "casaspawner-notices"
                    copies.append(labextension / path.relative_to(LAB_EXTENSION))
                for copy in copies:
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    copy.write_bytes(path.read_bytes())
                    copy.chmod(0o755 if executable(path) else 0o644)
            config = staging / "jupyter-config" / "jupyter_server_config.py"
            config.parent.mkdir()
            config.write_text(server_config_text(target / "python"))
            config.chmod(0o644)
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

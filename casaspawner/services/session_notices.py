"""In-session notices: a Jupyter server extension that shows the operators' notices inside a CASA session.

Every ``CASASPAWNER_NOTICES_INTERVAL`` seconds (default 60) the session asks the casa-sessions service
(``CASASPAWNER_NOTICES_URL``, e.g. ``http://hub:10101/services/casa-sessions/api/notices``) for its notices,
authenticating with its own ``$JUPYTERHUB_API_TOKEN``, and keeps ``CASA-NOTICES.md`` in the session's root
directory in step: written when there are notices (a drained release, an upcoming idle cull), removed when
there are none. The file shows up in JupyterLab's file browser and on the CASA desktop alike.

The session pulls rather than the hub pushing: requests *to* a session count as activity and would keep
idle sessions alive, and the hub needs no access to the session's storage or servers.

Enable it with ``--ServerApp.jpserver_extensions=casaspawner.services.session_notices=True`` (the shipped hub
configuration adds this to ``Spawner.args``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

NOTICE_FILE = "CASA-NOTICES.md"
_MARKER = "<!-- written by casaspawner: removed when there is nothing to say -->"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "casaspawner.services.session_notices"}]


def render_notices(notices: Iterable[Mapping[str, Any]], server_name: str) -> str | None:
    """The notice file's Markdown for this server's notices, or None when there are none."""
    texts = [
        str(n.get("text", "")) for n in notices if str(n.get("server", "")) == server_name and n.get("text")
    ]
    if not texts:
        return None
    lines = ["# Notices from the CASA operators", "", _MARKER, ""]
    lines += [f"- {text}" for text in texts]
    return "\n".join(lines) + "\n"


def sync_notice_file(root: Path, content: str | None) -> bool:
    """Write or remove ``root/CASA-NOTICES.md``; returns whether the file changed.

    A file of the same name that casaspawner did not write is never overwritten or removed.
    """
    path = root / NOTICE_FILE
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    if existing is not None and _MARKER not in existing:
        return False
    if content is None:
        if existing is None:
            return False
        path.unlink()
        return True
    if existing == content:
        return False
    tmp = path.with_name(f".{NOTICE_FILE}.tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)
    return True


async def fetch_notices(url: str, token: str) -> list[dict[str, Any]]:
    """The caller's notices from the casa-sessions service."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    response = await AsyncHTTPClient().fetch(
        HTTPRequest(url, headers={"Authorization": f"token {token}"}, request_timeout=20)
    )
    body = json.loads(response.body)
    notices = body.get("notices") if isinstance(body, dict) else None
    return [n for n in notices or [] if isinstance(n, dict)]


async def poll_forever(root: Path, url: str, token: str, server_name: str, interval: float, log: Any) -> None:
    while True:
        try:
            notices = await fetch_notices(url, token)
            if sync_notice_file(root, render_notices(notices, server_name)):
                log.info("CASA notices updated in %s (%d notice(s))", root / NOTICE_FILE, len(notices))
        except Exception as exc:  # the session must keep running whatever the service does
            log.warning("Could not fetch CASA notices from %s: %s", url, exc)
        await asyncio.sleep(interval)


def _load_jupyter_server_extension(serverapp: Any) -> None:
    url = os.environ.get("CASASPAWNER_NOTICES_URL", "")
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not url or not token:
        serverapp.log.info("CASA notices off: CASASPAWNER_NOTICES_URL or JUPYTERHUB_API_TOKEN is not set")
        return
    try:
        interval = max(float(os.environ.get("CASASPAWNER_NOTICES_INTERVAL", "60")), 1.0)
    except ValueError:
        interval = 60.0
    root = Path(getattr(serverapp, "root_dir", None) or os.getcwd()).expanduser()
    server_name = os.environ.get("JUPYTERHUB_SERVER_NAME", "")
    task = asyncio.get_event_loop().create_task(
        poll_forever(root, url, token, server_name, interval, serverapp.log)
    )
    serverapp._casa_notices_task = task  # keep a reference so the task is not collected
    serverapp.log.info("CASA notices from %s every %.0f s into %s", url, interval, root / NOTICE_FILE)

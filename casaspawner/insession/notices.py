"""A Jupyter server extension showing the operators' notices inside a CASA session.

The session asks the casa-sessions service for its notices at ``CASASPAWNER_NOTICES_URL``, e.g.
``http://hub:10101/services/casa-sessions/api/notices``. It authenticates with its own
``$JUPYTERHUB_API_TOKEN``. It asks as often as the service says in its ``interval``, and every
60 s until the first answer. What the session has to say, such as a drained release or an
upcoming idle cull, then appears in three places:

* **JupyterLab notifications**: the ``casaspawner-notices`` JupyterLab extension, shipped prebuilt
  with casaspawner, shows each notice's title as a warning. A button opens the notice file for the
  full text. The extension reads the current notices once from ``<base_url>casa-notices/api``
  when JupyterLab opens. It then gets every change pushed as a Jupyter server event, with schema
  :data:`EVENT_SCHEMA_ID`, over the event websocket JupyterLab keeps open anyway.
* **the notice file** ``$CASASPAWNER_NOTICES_FILE``, written when there are notices and removed
  when there are none. The CASA spawners set the variable. The default is ``CASA-NOTICES.md`` in
  the server's root directory, and named servers have one each. The CASA desktop pops it up.
* the server's log.

Nothing here counts as user activity, so notices never keep an idle session alive. The session
pulls from the service, since requests *to* a session count as activity. The API handler does not
track activity. Pushed events travel server → browser, which neither the proxy nor the server
counts.

``jupyter_server_config.d/casaspawner.json``, which casaspawner installs, enables the extension.
Without ``CASASPAWNER_NOTICES_URL`` it does nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

NOTICE_FILE = "CASA-NOTICES.md"
URL_ENV = "CASASPAWNER_NOTICES_URL"
FILE_ENV = "CASASPAWNER_NOTICES_FILE"
#: How often a session asks until the service has said otherwise, in seconds.
DEFAULT_INTERVAL = 60.0
EVENT_SCHEMA_ID = "https://casaspawner.io/events/session-notices"
EVENT_SCHEMA: dict[str, Any] = {
    "$id": EVENT_SCHEMA_ID,
    "version": "1",
    "title": "CASA session notices",
    "description": (
        "The operators' notices for this session, sent whenever they change (empty: none left)."
    ),
    "type": "object",
    "required": ["notices"],
    "properties": {
        "notices": {
            "title": "Notices",
            "description": (
                "Each notice's kind (drain, cull), a title of at most 140 characters and the text."
            ),
            "type": "array",
            "items": {
                "type": "object",
                "required": ["kind", "title", "text"],
                "properties": {
                    "kind": {"type": "string"},
                    "title": {"type": "string"},
                    "text": {"type": "string"},
                },
            },
        },
        "file": {
            "title": "Notice file",
            "description": (
                "The notice file's path relative to the server's root directory "
                "(null: outside it)."
            ),
            "type": ["string", "null"],
        },
    },
}
#: JupyterLab cuts notifications longer than this.
TITLE_MAX = 140
_MARKER = "<!-- written by casaspawner: removed when there is nothing to say -->"

Notice = dict[str, str]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "casaspawner.insession.notices"}]


def _title(notice: Mapping[str, Any]) -> str:
    title = str(notice.get("title") or notice["text"])
    return title if len(title) <= TITLE_MAX else title[: TITLE_MAX - 1] + "…"


def session_notices(notices: Iterable[Mapping[str, Any]], server_name: str) -> list[Notice]:
    """This server's notices, as ``{kind, title, text}``.

    The service answers for all of the user's servers, so the others' notices are left out.
    """
    return [
        {"kind": str(n.get("kind", "")), "title": _title(n), "text": str(n["text"])}
        for n in notices
        if str(n.get("server", "")) == server_name and n.get("text")
    ]


def render_notices(notices: Iterable[Mapping[str, str]]) -> str | None:
    """The notice file's Markdown, or None when there is nothing to say."""
    texts = [n["text"] for n in notices]
    if not texts:
        return None
    lines = ["# Notices from the CASA operators", "", _MARKER, ""]
    lines += [f"- {text}" for text in texts]
    return "\n".join(lines) + "\n"


def sync_notice_file(path: Path, content: str | None) -> bool:
    """Write or remove the notice file at ``path``, and return whether it changed.

    A file of that name that casaspawner did not write is never overwritten or removed.
    """
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)
    return True


class NoticeBoard:
    """What this session currently has to say.

    The notices are kept in memory and in the notice file, and sent as events. ``file`` is the
    notice file's path relative to the server's root directory, which is what JupyterLab opens. It
    is None when the file lies outside.
    """

    def __init__(
        self,
        path: Path,
        emit: Callable[[dict[str, Any]], None] | None = None,
        file: str | None = None,
    ) -> None:
        self.path = path
        self.emit = emit
        self.file = file
        self.notices: list[Notice] = []

    def state(self) -> dict[str, Any]:
        return {"notices": self.notices, "file": self.file}

    def update(self, notices: list[Notice]) -> bool:
        """Show ``notices`` instead of the current ones, and return whether anything changed."""
        # This also restores a file the user deleted.
        sync_notice_file(self.path, render_notices(notices))
        if notices == self.notices:
            return False
        self.notices = notices
        if self.emit is not None:
            self.emit(self.state())
        return True


class NoticesUnavailable(Exception):
    """The casa-sessions service did not answer with notices.

    The poll failed, and the session carries on.
    """


async def fetch_notices(url: str, token: str) -> tuple[list[dict[str, Any]], float | None]:
    """Fetch the caller's notices, and how often the service wants to be asked.

    The notices come from the casa-sessions service. Redirects are never followed, because the
    request carries the session's ``$JUPYTERHUB_API_TOKEN``, which would go along to wherever the
    redirect points. A redirect is a failed poll and raises :class:`NoticesUnavailable`.
    """
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    request = HTTPRequest(
        url,
        headers={"Authorization": f"token {token}"},
        request_timeout=20,
        follow_redirects=False,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    if 300 <= response.code < 400:
        location = response.headers.get("Location", "nowhere")
        raise NoticesUnavailable(
            f"the service answered HTTP {response.code}, a redirect to {location}, "
            "which a session never follows (its token would go along)"
        )
    response.rethrow()
    body = json.loads(response.body)
    if not isinstance(body, dict):
        return [], None
    notices = [n for n in body.get("notices") or [] if isinstance(n, dict)]
    interval = body.get("interval")
    asked = float(interval) if isinstance(interval, int | float) and interval >= 1 else None
    return notices, asked


async def poll_forever(
    board: NoticeBoard, url: str, token: str, server_name: str, log: Any
) -> None:
    interval = DEFAULT_INTERVAL
    while True:
        try:
            notices, asked = await fetch_notices(url, token)
            interval = asked or interval
            if board.update(session_notices(notices, server_name)):
                log.info("CASA notices: %d for this session (%s)", len(board.notices), board.path)
        except Exception as exc:
            # The session must keep running whatever the service does.
            log.warning("Could not fetch CASA notices from %s: %s", url, exc)
        await asyncio.sleep(interval)


class NoticesHandler(APIHandler):
    """``GET <base_url>casa-notices/api`` returns this session's current notices.

    They are what JupyterLab shows on opening.
    """

    # Reading notices is not using the session.
    _track_activity = False

    def initialize(self, board: NoticeBoard) -> None:
        self.board = board

    @web.authenticated
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(self.board.state()))


def _load_jupyter_server_extension(serverapp: Any) -> None:
    root = Path(getattr(serverapp, "root_dir", None) or os.getcwd()).expanduser()
    path = Path(os.environ.get(FILE_ENV) or root / NOTICE_FILE)
    events = getattr(serverapp, "event_logger", None)
    emit = None
    if events is not None:
        events.register_event_schema(EVENT_SCHEMA)

        def emit(state: dict[str, Any]) -> None:
            events.emit(schema_id=EVENT_SCHEMA_ID, data=state)

    try:
        file: str | None = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        file = None
    board = NoticeBoard(path, emit, file)
    web_app = serverapp.web_app
    route = url_path_join(web_app.settings["base_url"], "casa-notices", "api")
    # JupyterLab asks even when notices are off.
    web_app.add_handlers(".*$", [(route, NoticesHandler, {"board": board})])
    url = os.environ.get(URL_ENV, "")
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not url or not token:
        serverapp.log.info("CASA notices off: %s or JUPYTERHUB_API_TOKEN is not set", URL_ENV)
        return
    server_name = os.environ.get("JUPYTERHUB_SERVER_NAME", "")
    task = asyncio.get_event_loop().create_task(
        poll_forever(board, url, token, server_name, serverapp.log)
    )
    # Keep a reference so the task is not collected.
    serverapp._casa_notices_task = task
    serverapp.log.info("CASA notices from %s into JupyterLab notifications and %s", url, path)

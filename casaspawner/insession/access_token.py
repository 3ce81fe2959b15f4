"""A Jupyter server extension fetching the user's access token once, into the session's file.

On Kubernetes the user's access token (for archive and VOSpace services) is never in the pod
spec nor in a Secret: the hub keeps it in memory and hands it out once, to the session's own
pod. When the session's Jupyter server starts, this extension asks the hub for it at
``$CASASPAWNER_TOKEN_URL`` (``<hub API>/casa-token/<user>/<server>``), authenticating with the
session's ``$JUPYTERHUB_API_TOKEN``, and writes it to ``$CASASPAWNER_TOKEN_FILE`` (mode 0600) in
the pod's memory-backed token directory. A container restarted in the same pod finds the file
and asks nothing. The server does not wait for it: the file appears a moment after the server
starts.

A refusal (the token was handed out already, the request came from elsewhere) is logged in one
sentence and not tried again; a hub that does not answer yet is asked again for two minutes.
Redirects are never followed (the request carries the session's token). Without the two
variables the extension does nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

#: Where the session writes the token, and where it fetches it from.
FILE_ENV = "CASASPAWNER_TOKEN_FILE"
URL_ENV = "CASASPAWNER_TOKEN_URL"
#: How long a session keeps asking a hub that does not answer, in seconds.
PATIENCE = 120.0


class TokenRefused(Exception):
    """The hub refused the token for good; ``str()`` is its one sentence."""


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "casaspawner.insession.access_token"}]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only, all at once."""
    part = path.with_name(f".{path.name}.part")
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    part.replace(path)


async def fetch_token(url: str, api_token: str) -> str | None:
    """The token the hub hands out, or None while it cannot answer yet.

    Raises :class:`TokenRefused` when it refuses.
    """
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

    request = HTTPRequest(
        url,
        method="POST",
        body="{}",
        headers={"Authorization": f"token {api_token}", "Content-Type": "application/json"},
        request_timeout=20,
        follow_redirects=False,
    )
    try:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
    except (OSError, HTTPClientError):
        return None
    if response.code == 200:
        try:
            token = json.loads(response.body).get("token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise TokenRefused("the hub's answer held no token")
        return token
    if response.code in (599, 502, 503, 504):
        return None
    try:
        message = json.loads(response.body).get("message")
    except (ValueError, AttributeError):
        message = None
    if not message and response.code == 404:
        message = (
            "the hub has no casaspawner token API (its configuration does not add "
            "casaspawner.services.access_token's handlers)"
        )
    raise TokenRefused(message or f"the hub answered HTTP {response.code}")


async def fetch_into(path: Path, url: str, api_token: str, log: Any) -> bool:
    """Fetch the token into ``path``, asking again while the hub cannot answer; whether it did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    delay = 0.5
    while True:
        try:
            token = await fetch_token(url, api_token)
        except TokenRefused as exc:
            log.error("The session has no access token file: %s", exc)
            return False
        if token is not None:
            write_private(path, token)
            log.info("The user's access token is in %s", path)
            return True
        if loop.time() + delay > deadline:
            log.error("The session has no access token file: the hub at %s did not answer", url)
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


def _load_jupyter_server_extension(serverapp: Any) -> None:
    file, url = os.environ.get(FILE_ENV, ""), os.environ.get(URL_ENV, "")
    api_token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not (file and url and api_token):
        return
    path = Path(file)
    if path.exists():
        serverapp.log.info("The user's access token is in %s already", path)
        return
    task = asyncio.get_event_loop().create_task(fetch_into(path, url, api_token, serverapp.log))
    # Keep a reference so the task is not collected.
    serverapp._casa_token_task = task

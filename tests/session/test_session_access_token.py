"""The session's side of its access token (insession/access_token.py), against HTTP servers.

The hub's side, the real handler in a real JupyterHub, is tests/kube/test_kube_hub.py; the whole
path in a real session pod is tests/k8s/test_browser.py. Here: what the session does while the
hub does not answer yet, when it refuses, and where the file goes.
"""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from casaspawner.insession import access_token as session_token
from casaspawner.insession.access_token import TokenRefused, fetch_into, fetch_token

LOG = logging.getLogger("session")


class Answers:
    """What the stand-in hub answers, in order, and the tokens it was asked with."""

    def __init__(self, *answers: tuple[int, dict[str, str] | str]) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []


class StandIn(web.RequestHandler):
    def initialize(self, answers: Answers) -> None:
        self.answers = answers

    def post(self) -> None:
        self.answers.asked.append(self.request.headers.get("Authorization", ""))
        code, body = self.answers.answers.pop(0)
        self.set_status(code)
        self.finish(body)


@pytest_asyncio.fixture(loop_scope="function")
async def hub() -> AsyncIterator[tuple[str, Answers, HTTPServer]]:
    answers = Answers()
    (sock,) = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(web.Application([("/casa-token/alice/", StandIn, {"answers": answers})]))
    server.add_sockets([sock])
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/casa-token/alice/"
    yield url, answers, server
    server.stop()


async def test_the_token_is_written_for_its_owner_alone(hub, tmp_path: Path) -> None:
    url, answers, _ = hub
    answers.answers.append((200, {"token": "tok-42"}))
    path = tmp_path / "token"
    assert await fetch_into(path, url, "server-token", LOG)
    assert path.read_text() == "tok-42"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert answers.asked == ["token server-token"]
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


async def test_a_busy_hub_is_asked_again_and_a_refusal_is_final(hub, tmp_path, caplog) -> None:
    url, answers, _ = hub
    answers.answers += [(503, {"message": "not yet"}), (200, {"token": "tok-42"})]
    path = tmp_path / "token"
    assert await fetch_into(path, url, "server-token", LOG)
    assert path.read_text() == "tok-42" and len(answers.asked) == 2

    refused = "This session fetched its access token already."
    answers.answers.append((409, {"status": "409", "message": refused}))
    with caplog.at_level(logging.ERROR):
        assert not await fetch_into(tmp_path / "again", url, "server-token", LOG)
    assert f"The session has no access token file: {refused}" in caplog.messages
    assert not (tmp_path / "again").exists()


async def test_an_answer_without_a_token_is_a_refusal(hub) -> None:
    """A 200 that is not the hub's JSON (a proxy's page, say) gives no token file."""
    url, answers, _ = hub
    answers.answers += [(200, {"other": "x"}), (200, "<html>a proxy's page</html>")]
    for _ in range(2):
        with pytest.raises(TokenRefused, match="the hub's answer held no token"):
            await fetch_token(url, "server-token")


async def test_a_hub_without_the_api_is_named(hub) -> None:
    url, answers, _ = hub
    with pytest.raises(TokenRefused, match="the hub has no casaspawner token API"):
        await fetch_token(url.replace("/alice/", "/bob/"), "server-token")
    assert answers.asked == []


async def test_a_hub_that_never_answers_is_given_up_on(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(session_token, "PATIENCE", 1.0)
    (sock,) = bind_sockets(0, "127.0.0.1")
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}/casa-token/alice/"
    with caplog.at_level(logging.ERROR):
        assert not await asyncio.wait_for(
            fetch_into(tmp_path / "token", url, "server-token", LOG), 10
        )
    assert f"The session has no access token file: the hub at {url} did not answer" in (
        caplog.messages
    )

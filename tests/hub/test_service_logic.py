"""The casa-sessions service: its pure parts (release state file, grouping, notices, the in-session
notice file) and how it stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

import pytest
import pytest_asyncio
from support.hub import LAB_OVERRIDES, SESSION_DATA_FILES

from casaspawner.catalog.model import Release
from casaspawner.errors import InvalidInput
from casaspawner.insession.notices import (
    NOTICE_FILE,
    NoticeBoard,
    NoticesUnavailable,
    fetch_notices,
    poll_forever,
    render_notices,
    session_notices,
    sync_notice_file,
)
from casaspawner.net import free_port
from casaspawner.services.app import _TEMPLATES, SessionsSnapshot, reload_query
from casaspawner.services.sessions import (
    CullPolicy,
    Session,
    format_duration,
    group_sessions,
    notices_for,
    parse_time,
    release_of,
    sessions_from_users,
)
from casaspawner.services.state import ReleaseState, ReleaseStateStore, drain_blocker

NOW = datetime(2026, 11, 23, 20, 0, tzinfo=timezone.utc)


def server(
    release: Release, dataset: str, started: datetime, active: datetime, interface: str = "lab"
) -> dict[str, object]:
    """A server model as the hub's API gives it, with what a CASA spawner recorded."""
    summary = f"{release.label} · {interface} · {dataset} · exact"
    output = {
        "summary": summary,
        "release": release.id,
        "casa_version": release.casa,
        "dataset": dataset,
        "interface": interface,
    }
    return {
        "started": started.isoformat(),
        "last_activity": active.isoformat().replace("+00:00", "Z"),
        "ready": True,
        "user_options": {"dataset": dataset, "profile": summary, "casaspawner": output},
    }


@pytest.fixture
def users(catalog) -> list[dict[str, object]]:
    pl = catalog.get("pl-2023.1.0.124")
    other = catalog.get("pl-2022.2.0.64")
    return [
        {
            "name": "alice",
            "servers": {
                "": server(pl, "ds1", NOW - timedelta(hours=2), NOW - timedelta(minutes=55))
            },
        },
        {"name": "bob", "servers": {"": server(pl, "ds1", NOW - timedelta(minutes=5), NOW)}},
        {
            "name": "carol",
            "servers": {"m87": server(other, "ds2", NOW - timedelta(days=1), NOW, "desktop")},
        },
        # Stopped.
        {
            "name": "dave",
            "servers": {"": {"started": None, "pending": None, "user_options": {}}},
        },
        # Not a CASA server.
        {
            "name": "erin",
            "servers": {"": {"started": NOW.isoformat(), "user_options": {}}},
        },
    ]


def test_state_store_round_trip_and_history(tmp_path):
    store = ReleaseStateStore(tmp_path / "sub" / "state.json")
    assert store.load() == {}
    store.update("pl-2023.1.0.124", by="olga", drained=True, message="rebuild")
    store.update("casa-4.2.2", by="olga", retired=True)
    states = store.load()
    assert states["pl-2023.1.0.124"].drained and states["pl-2023.1.0.124"].message == "rebuild"
    assert states["casa-4.2.2"].retired and not states["casa-4.2.2"].drained
    assert set(store.drained()) == {"pl-2023.1.0.124"}
    store.update("pl-2023.1.0.124", by="olga", drained=False, message="")
    # Nothing left to say.
    assert "pl-2023.1.0.124" not in json.loads(store.path.read_text())["releases"]
    # No temporary files left behind.
    assert list(tmp_path.joinpath("sub").iterdir()) == [store.path]


@pytest.mark.parametrize("message", ["x" * 301, "two\nlines"])
def test_state_store_refuses_bad_messages(tmp_path, message):
    with pytest.raises(InvalidInput, match="one line"):
        ReleaseStateStore(tmp_path / "s.json").update(
            "casa-4.2.2", by="o", drained=True, message=message
        )


def test_unreadable_state_is_one_sentence_and_blocks_nothing(tmp_path, catalog):
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.raises(InvalidInput, match="cannot be read"):
        ReleaseStateStore(path).load()
    logged = []

    class Log:
        def error(self, *args):
            logged.append(args)

    class Spawner:
        log = Log()

        def casa_catalog(self):
            return catalog

    assert drain_blocker(path)(Spawner()) == {}
    assert logged


def test_drain_blocker_names_the_release_and_reads_every_time(tmp_path, catalog):
    path = tmp_path / "s.json"
    blocked = drain_blocker(path)

    class Spawner:
        log = None

        def casa_catalog(self):
            return catalog

    assert blocked(Spawner()) == {}
    ReleaseStateStore(path).update("casa-6.6.5-31", by="olga", drained=True)
    assert blocked(Spawner()) == {
        "casa-6.6.5-31": "CASA 6.6.5-31 is being drained by the operators and cannot be started "
        "now; choose another release or try again later."
    }


def test_release_of_reads_what_the_spawner_recorded(catalog):
    assert release_of({"casaspawner": {"release": "casa-4.2.2"}}, catalog).id == "casa-4.2.2"
    assert release_of({"casaspawner": {"release": "casa-99"}}, catalog) is None
    label = catalog.get("pl-2023.1.0.124").label
    assert release_of({"profile": f"{label} · JupyterLab · x · exact"}, catalog) is None
    assert release_of({"dataset": "x"}, catalog) is None


def test_sessions_grouped_by_release_then_dataset(users, catalog):
    sessions = sessions_from_users(users, catalog)
    assert {s.user for s in sessions} == {"alice", "bob", "carol", "erin"}
    states = {"pl-2023.1.0.124": ReleaseState(drained=True)}
    groups = group_sessions(sessions, states)
    assert [g.release_id for g in groups] == ["pl-2023.1.0.124", "pl-2022.2.0.64", "unknown"]
    first = groups[0]
    assert first.state.drained and first.count == 2
    # Oldest first.
    assert [s.user for s in first.datasets[0].sessions] == ["alice", "bob"]
    assert groups[1].datasets[0].sessions[0].server == "m87"
    alice = first.datasets[0].sessions[0]
    assert format_duration(alice.age(NOW)) == "2 h 00 min"
    assert format_duration(alice.idle(NOW)) == "55 min"


@pytest.mark.parametrize(
    ("seconds", "text"), [(40, "40 s"), (420, "7 min"), (7500, "2 h 05 min"), (273600, "3 d 4 h")]
)
def test_format_duration(seconds, text):
    assert format_duration(timedelta(seconds=seconds)) == text
    assert format_duration(None) == "—"


def test_parse_time_accepts_hub_timestamps():
    assert parse_time("2026-11-23T20:00:00.123Z") == NOW + timedelta(milliseconds=123)
    assert parse_time("2026-11-23T20:00:00") == NOW
    assert parse_time("yesterday") is None and parse_time(None) is None


def test_notices_for_drains_and_upcoming_culls(users, catalog):
    sessions = sessions_from_users(users, catalog)
    states = {"pl-2023.1.0.124": ReleaseState(drained=True, message="image rebuild")}
    policy = CullPolicy(timeout=3600, warn_before=600)
    alice = notices_for("alice", sessions, states, policy, NOW)
    assert [n["kind"] for n in alice] == ["drain", "cull"]
    assert all(len(n["title"]) <= 140 for n in alice)
    assert (
        alice[1]["title"]
        == "This idle session will be stopped at about 20:05 UTC unless you use it."
    )
    assert "is being drained by the operators: image rebuild." in alice[0]["text"]
    assert "idle since 19:05 UTC and will be stopped at about 20:05 UTC" in alice[1]["text"]
    # Active.
    assert [n["kind"] for n in notices_for("bob", sessions, states, policy, NOW)] == ["drain"]
    assert notices_for("carol", sessions, states, policy, NOW) == []
    # Culling off.
    assert notices_for("alice", sessions, {}, CullPolicy(timeout=0), NOW) == []


def test_only_this_servers_notices_are_shown():
    notices = [
        {"server": "", "kind": "drain", "text": "A"},
        {"server": "m87", "kind": "cull", "text": "B"},
    ]
    assert session_notices(notices, "") == [{"kind": "drain", "title": "A", "text": "A"}]
    assert session_notices(notices, "m87") == [{"kind": "cull", "title": "B", "text": "B"}]
    # Nothing to say.
    assert session_notices([{"server": "", "kind": "drain"}], "") == []
    (long,) = session_notices([{"server": "", "kind": "drain", "text": "x" * 300}], "")
    assert len(long["title"]) == 140 and long["title"].endswith("…")
    assert long["text"] == "x" * 300


def test_notice_file_is_written_updated_and_removed(tmp_path):
    path = tmp_path / NOTICE_FILE
    content = render_notices([{"kind": "drain", "text": "A"}])
    assert content is not None and "- A" in content
    assert sync_notice_file(path, content) is True
    assert sync_notice_file(path, content) is False
    assert path.read_text() == content
    assert sync_notice_file(path, render_notices([])) is True
    assert not path.exists()
    # No temporary file left behind.
    assert list(tmp_path.iterdir()) == []


def test_notice_file_never_touches_a_users_own_file(tmp_path: Path):
    own = tmp_path / NOTICE_FILE
    own.write_text("my notes")
    assert sync_notice_file(own, "# notices\n") is False
    assert sync_notice_file(own, None) is False
    assert own.read_text() == "my notes"


def test_notice_board_sends_each_change_once(tmp_path):
    sent: list[dict[str, object]] = []
    board = NoticeBoard(tmp_path / "CASA-NOTICES-m87.md", sent.append, "CASA-NOTICES-m87.md")
    drain = [{"kind": "drain", "title": "A", "text": "A"}]
    assert board.update(drain) is True
    # The same notices again: no new event.
    assert board.update(list(drain)) is False
    assert "- A" in board.path.read_text()
    assert board.update([]) is True
    assert sent == [
        {"notices": drain, "file": "CASA-NOTICES-m87.md"},
        {"notices": [], "file": "CASA-NOTICES-m87.md"},
    ]
    assert not board.path.exists()


@pytest_asyncio.fixture(loop_scope="function")
async def redirecting_service():
    """A casa-sessions stand-in on 127.0.0.1 answering every poll with a 302 to a collector on
    127.0.0.2, which records the Authorization header of each request it gets (real Tornado
    servers)."""
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler

    seen: list[str | None] = []
    servers = []

    def serve(handler: type[RequestHandler], host: str) -> str:
        sockets = bind_sockets(0, host)
        server = HTTPServer(Application([(r"/.*", handler)]))
        server.add_sockets(sockets)
        servers.append(server)
        return f"http://{host}:{sockets[0].getsockname()[1]}"

    class Collector(RequestHandler):
        def get(self) -> None:
            seen.append(self.request.headers.get("Authorization"))
            self.finish({"notices": [{"server": "", "kind": "drain", "text": "from elsewhere"}]})

    elsewhere = serve(Collector, "127.0.0.2")

    class Front(RequestHandler):
        def get(self) -> None:
            self.redirect(f"{elsewhere}{self.request.path}")

    yield serve(Front, "127.0.0.1") + "/services/casa-sessions/api/notices", seen
    for server in servers:
        server.stop()
        await server.close_all_connections()


async def test_a_redirected_poll_fails_and_the_token_stays_home(
    redirecting_service, tmp_path, caplog
):
    """The session's token is for the hub's service only: a redirect is not followed (the other
    host never hears from the session, whatever Tornado would do with the header), the poll counts
    as failed, is logged, and shows nothing."""
    import logging

    url, seen = redirecting_service
    with pytest.raises(
        NoticesUnavailable, match=r"HTTP 302, a redirect to http://127\.0\.0\.2:\d+/"
    ):
        await fetch_notices(url, "tok-SECRET-42")
    board = NoticeBoard(tmp_path / NOTICE_FILE)
    log = logging.getLogger("casa-notices-test")
    with caplog.at_level(logging.WARNING, logger=log.name):
        poll = asyncio.ensure_future(poll_forever(board, url, "tok-SECRET-42", "", log))
        try:
            for _ in range(100):
                if caplog.records:
                    break
                await asyncio.sleep(0.05)
        finally:
            poll.cancel()
    # Followed, the redirect reached 127.0.0.2: with the token before Tornado 6.5.6
    # (CVE-2026-49853), and either way that host's answer became the session's notices.
    assert seen == []
    (record,) = caplog.records
    assert record.getMessage().startswith(
        f"Could not fetch CASA notices from {url}: the service answered HTTP 302"
    )
    assert board.notices == [] and not board.path.exists()


class CountingRead:
    """A hub read that counts its calls and can be held open or made to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self) -> list[Session]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise OSError("the hub did not answer")
        return [self.calls]  # type: ignore[list-item]


async def test_snapshot_shares_one_read_and_keeps_it_for_max_age():
    read = CountingRead()
    read.gate = asyncio.Event()
    snapshot = SessionsSnapshot(read, max_age=60, refresh=0, keep_warm=0)
    waiting = [asyncio.ensure_future(snapshot.get()) for _ in range(5)]
    await asyncio.sleep(0.05)
    read.gate.set()
    assert await asyncio.gather(*waiting) == [[1]] * 5
    assert await snapshot.get() == [1] and read.calls == 1
    assert snapshot.taken is not None


async def test_snapshot_reads_again_when_stale_and_every_time_at_zero():
    read = CountingRead()
    stale = SessionsSnapshot(read, max_age=0.1, refresh=0, keep_warm=0)
    assert await stale.get() == [1]
    await asyncio.sleep(0.15)
    assert await stale.get() == [2]
    every = SessionsSnapshot(read, max_age=0, refresh=60)
    assert [await every.get() for _ in range(3)] == [[3], [4], [5]]
    stale.stop()


async def test_snapshot_failure_is_raised_and_the_next_request_retries():
    read = CountingRead()
    read.fail = True
    snapshot = SessionsSnapshot(read, max_age=60, refresh=0, keep_warm=0)
    with pytest.raises(OSError, match="did not answer"):
        await snapshot.get()
    read.fail = False
    assert await snapshot.get() == [2]


async def test_snapshot_is_read_in_the_background_while_somebody_looks():
    """After a look, reads go on at four fifths of max_age for keep_warm seconds, then stop."""
    read = CountingRead()
    snapshot = SessionsSnapshot(read, max_age=0.1, refresh=0, keep_warm=0.5)
    await snapshot.get()
    await asyncio.sleep(0.35)
    # Nobody asked again, yet the snapshot was read again, so a request would not wait.
    assert read.calls >= 3
    await asyncio.sleep(0.6)
    settled = read.calls
    await asyncio.sleep(0.3)
    assert read.calls == settled


async def test_snapshot_kept_while_nobody_looks_answers_a_first_look_at_once():
    """Started with the service, reads go on every ``refresh`` seconds with nobody looking. A
    stale snapshot they keep is read again for a look; a slow hub leaves the look the kept one
    after ``patience``, and the read to the next look."""
    read = CountingRead()
    kept = SessionsSnapshot(read, max_age=0.1, refresh=0.3, keep_warm=0.2)
    kept.start()
    await asyncio.sleep(0.05)
    assert read.calls == 1
    await asyncio.sleep(0.4)
    assert read.calls == 2
    kept.stop()

    read = CountingRead()
    snapshot = SessionsSnapshot(read, max_age=0.3, refresh=60, keep_warm=0, patience=0.05)
    assert await snapshot.get() == [1]
    # A quick hub: the look waits for the fresh read.
    await asyncio.sleep(0.35)
    assert await snapshot.get() == [2]
    # A slow hub: the look gets the kept snapshot; the next look shares the same read.
    await asyncio.sleep(0.35)
    read.gate = asyncio.Event()
    assert await asyncio.wait_for(snapshot.get(), 0.2) == [2]
    assert read.calls == 3
    assert await asyncio.wait_for(snapshot.get(), 0.2) == [2] and read.calls == 3
    read.gate.set()
    await asyncio.sleep(0.01)
    assert await snapshot.get() == [3]
    snapshot.stop()


async def test_snapshot_older_than_the_background_keeps_it_waits_for_the_hub():
    """A failed read leaves a look the kept snapshot; past ``refresh`` + ``max_age`` it is not
    shown: the look waits for the hub, and the hub's failure is the look's."""
    read = CountingRead()
    now = [0.0]
    snapshot = SessionsSnapshot(read, max_age=10, refresh=60, clock=lambda: now[0])
    assert await snapshot.get() == [1]
    snapshot.stop()
    read.fail = True
    now[0] = 69.0
    assert await snapshot.get() == [1] and read.calls == 2
    snapshot.stop()
    now[0] = 71.0
    with pytest.raises(OSError, match="did not answer"):
        await snapshot.get()
    snapshot.stop()
    read.fail = False
    assert await snapshot.get() == [4]
    snapshot.stop()


async def test_a_fresh_request_waits_for_the_hub_rather_than_show_a_kept_snapshot():
    read = CountingRead()
    now = [0.0]
    snapshot = SessionsSnapshot(read, max_age=10, refresh=60, clock=lambda: now[0])
    assert await snapshot.get() == [1]
    snapshot.stop()
    now[0] = 30.0
    read.gate = asyncio.Event()
    waiting = asyncio.ensure_future(snapshot.get(fresh=True))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    read.gate.set()
    assert await waiting == [2]
    snapshot.stop()


def test_a_page_showing_a_kept_snapshot_loads_again_asking_for_fresh_sessions():
    """Only a page older than max_age reloads, keeping its message; a fresh one never does."""
    assert reload_query(12.0, 10, fresh=False, flash="") == "?fresh=1"
    assert reload_query(12.0, 10, fresh=False, flash="drained CASA 6.6 & co") == (
        "?fresh=1&done=drained+CASA+6.6+%26+co"
    )
    assert reload_query(9.5, 10, fresh=False, flash="") is None
    assert reload_query(40.0, 10, fresh=True, flash="") is None
    assert reload_query(40.0, 0, fresh=False, flash="") is None
    page = _TEMPLATES.get_template("sessions.html")
    now = datetime.now(timezone.utc)
    common = dict(
        user={"name": "olga"},
        groups=[],
        releases=[],
        now=now,
        taken=now,
        duration=format_duration,
        prefix="/services/casa-sessions/",
        xsrf_form_html=lambda: "",
        cull_after="",
        flash="",
    )
    stale = page.render(reload="?fresh=1&done=x", **common)
    assert '<meta http-equiv="refresh" content="1; url=?fresh=1&amp;done=x">' in stale
    assert "reading the hub again" in stale
    shown = page.render(reload=None, **common)
    assert "http-equiv" not in shown and "reading the hub again" not in shown


def test_the_committed_labextension_is_built_from_its_source():
    """`make hub-labextension` records what it built from; a changed source needs a rebuild (and a
    commit)."""
    import hashlib

    services = Path(__file__).resolve().parents[2] / "casaspawner" / "insession"
    recorded = dict(
        reversed(line.split())
        for line in (services / "labextension" / "built-from.sha256").read_text().splitlines()
    )
    for name in ("package.json", "index.js"):
        digest = hashlib.sha256((services / "notices-lab" / name).read_bytes()).hexdigest()
        assert recorded[name] == digest, (
            f"notices-lab/{name} changed since the build: run make hub-labextension"
        )
    built = json.loads((services / "labextension" / "package.json").read_text())
    assert built["name"] == "casaspawner-notices"
    assert (services / "labextension" / built["jupyterlab"]["_build"]["load"]).is_file()


@pytest.mark.integration
def test_the_wheel_installs_what_sessions_need(tmp_path):
    """The data files the hub tests link into the venv are the ones a wheel of this checkout
    installs (what the session image gets): the notices' Lab extension, the server config enabling
    their server extension, and JupyterLab's setting defaults without the news feed, in overrides.d
    (one file per package)."""
    import sys
    import sysconfig
    import zipfile

    from casaspawner.images.engine import casaspawner_wheel

    wheel = zipfile.ZipFile(casaspawner_wheel(tmp_path))
    data = {
        PurePosixPath(name.split(".data/data/", 1)[1]): name
        for name in wheel.namelist()
        if ".data/data/" in name
    }
    assert set(SESSION_DATA_FILES) <= set(data)
    for path in SESSION_DATA_FILES:
        # Linked, not copied, by make hub-dev-install.
        installed = Path(sys.prefix) / path
        assert installed.read_bytes() == wheel.read(data[path]), (
            f"{installed} is not the wheel's {path}"
        )
    overrides = json.loads(wheel.read(data[LAB_OVERRIDES]))
    assert overrides == {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false"}}
    # Where pip puts a wheel's data files.
    assert sysconfig.get_paths()["data"] == sys.prefix


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_service_stops_when_the_hub_stops_it_even_with_sigint_ignored(tmp_path, signum):
    """The hub stops services with SIGINT, then SIGTERM. A hub launched in the background by a
    shell passes SIGINT on ignored; the service must stop promptly all the same (else the hub
    waits, then kills it)."""
    port = free_port()
    env = {
        **os.environ,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_API_TOKEN": "not-used-here",
        "JUPYTERHUB_API_URL": f"http://127.0.0.1:{free_port()}/hub/api",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "casaspawner.services",
            "--state-file",
            str(tmp_path / "state.json"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "casa-sessions did not listen"
            time.sleep(0.1)
        process.send_signal(signum)
        assert process.wait(5) == 0
        assert "casa-sessions stopped" in (
            process.stdout.read().decode() if process.stdout else ""
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

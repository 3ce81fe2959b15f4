"""Apps of other CASA releases on a local desktop.

Unit: the releases file the spawner writes (the ready environments, newest first, with the
variables of :meth:`CasaEnvironment.session_environment`), the desktop's pipe menu (the session's
own release first, commands that split back into ``casa-app --release ID APP``), the launch's
variables and refusals, and the drain check against a stand-in of casa-sessions' answer.

Integration (``hub``, ``browser``): a desktop session of one release in the browser; its menu's
Other CASA releases, as openbox computes it; the other release's CASA terminal and plotms, chosen
from the desktop's right-click menu through noVNC, open on the session's X display as the
session's user, from the other release's environment, plotms on the session's MeasurementSet; a
drained release's app is refused with the operators' sentence; ``api/releases`` answers the
session's token and refuses others. The open menu and the desktop are saved for the docs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support.browser import choose_from_menu, menu_commands, password_login, screenshot_path
from support.hub import Hub
from support.local import argv_of, wait_for_display, wait_for_title
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

import casaspawner
from casaspawner.catalog.model import Catalog, Release, load_catalog
from casaspawner.insession.desktop import casa_releases
from casaspawner.local import demo
from casaspawner.local.environments import EnvironmentManager
from casaspawner.local.environments.desktop import (
    RELEASES_FILE,
    desktop_releases,
    write_desktop_releases,
)
from casaspawner.local.environments.model import FORMAT, META
from casaspawner.local.processes import descendants
from casaspawner.services.state import ReleaseStateStore, release_states

DESKTOP = Path(casaspawner.__file__).parent / "insession" / "desktop"
CASA_APP = str(DESKTOP / "casa-app")


def fake_environment(
    cache: Path,
    release: Release,
    *,
    python: str | None = "venv/bin/python",
    casa_home: str = "venv",
    kernel_site: str | None = None,
    guis: tuple[str, ...] = (),
    bins: tuple[str, ...] = (),
) -> Path:
    """A finished environment's files, as the manager reads them (no CASA in it)."""
    root = cache / "envs" / release.tag
    (root / casa_home / "bin").mkdir(parents=True)
    for program in bins:
        (root / casa_home / "bin" / program).write_text("#!/bin/sh\n")
    for gui in guis:
        (root / "apps" / gui).mkdir(parents=True)
    meta = {
        "release": release.id,
        "tag": release.tag,
        "casa": release.casa,
        "python": python,
        "casa_home": casa_home,
        "measures": str(cache / "measures"),
        "kernel_site": kernel_site,
        "shared": True,
        "format": FORMAT,
    }
    (root / META).write_text(json.dumps(meta))
    # An older casaspawner's site config: the manager writes the current one.
    (root / "casasiteconfig.py").write_text("# old\n")
    return root


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def cache(tmp_path: Path, catalog: Catalog) -> Path:
    """Three ready environments: two wheel releases and a CASA 4 tarball; and a broken one."""
    cache = tmp_path / "cache"
    fake_environment(
        cache, catalog.get("casa-6.6.5-31"), guis=("casaplotms", "casaviewer", "casalogger")
    )
    fake_environment(
        cache, catalog.get("casa-6.7.0-31"), guis=("casaplotms",), kernel_site="kernel-site"
    )
    fake_environment(
        cache,
        catalog.get("casa-4.5.0"),
        python=None,
        casa_home="casa",
        bins=("casa", "casaplotms", "casabrowser"),
    )
    # Half-built (no metadata): not listed.
    (cache / "envs" / catalog.get("casa-4.2.2").tag / "casa").mkdir(parents=True)
    return cache


def manager(cache: Path) -> EnvironmentManager:
    return EnvironmentManager(cache, shared=True)


def test_the_releases_file_lists_the_ready_environments_newest_first(
    cache: Path, catalog: Catalog
) -> None:
    document = desktop_releases(manager(cache), catalog)
    releases = document["releases"]
    assert [r["id"] for r in releases] == ["casa-6.7.0-31", "casa-6.6.5-31", "casa-4.5.0"]
    assert [r["apps"] for r in releases] == [
        ["terminal", "plotms"],
        ["terminal", "plotms", "viewer", "logger"],
        ["terminal", "plotms", "browser"],
    ]
    newest, _, old = releases
    assert newest["label"] == "CASA 6.7.0-31" and newest["kernel_name"] == "CASA 6.7.0-31"
    # The variables the session's own release is started with, from the same method: casaconfig's
    # site config and casarc with the shared offline measures.
    env = manager(cache).ready(catalog.get("casa-6.7.0-31"))
    assert env is not None
    assert newest["environment"] == env.session_environment()
    assert newest["environment"]["CASASITECONFIG"] == str(env.site_config)
    assert "measurespath" in env.site_config.read_text()
    # Every release names every variable: those its environment does not set are null.
    assert set(old["environment"]) == set(newest["environment"])
    assert old["environment"]["CASASPAWNER_CASA_PYTHON"] is None
    assert old["environment"]["CASASPAWNER_CASA_PYTHONPATH"] is None


def test_the_releases_file_is_written_once_readable_by_all(cache: Path, catalog: Catalog) -> None:
    path = write_desktop_releases(manager(cache), catalog)
    assert path == cache / RELEASES_FILE
    assert path.stat().st_mode & 0o777 == 0o644
    written = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert write_desktop_releases(manager(cache), catalog) == path
    assert path.stat().st_mtime_ns == written, "an unchanged list is not written again"
    assert json.loads(path.read_text()) == desktop_releases(manager(cache), catalog)


def test_the_menu_puts_the_sessions_release_first_then_the_newest(
    cache: Path, catalog: Catalog
) -> None:
    releases = desktop_releases(manager(cache), catalog)["releases"]
    awkward = "/opt/desk top & co's <x>/casa-app"
    menu = ET.fromstring(casa_releases.menu_xml(releases, "casa-6.6.5-31", awkward))
    assert menu.tag == "openbox_pipe_menu"
    submenus = menu.findall("menu")
    assert [m.get("label") for m in submenus] == [
        "CASA 6.6.5-31 (this session)",
        "CASA 6.7.0-31",
        "CASA 4.5.0",
    ]
    assert [child.tag for child in menu][:2] == ["menu", "separator"]
    commands = {
        (m.get("label"), item.get("label")): shlex.split(item.findtext(".//command") or "")
        for m in submenus
        for item in m.findall("item")
    }
    # Openbox splits a command as a shell does: the program comes back whole.
    assert commands[("CASA 6.6.5-31 (this session)", "plotms")] == [awkward, "plotms"]
    assert commands[("CASA 6.7.0-31", "plotms")] == [
        awkward,
        "--release",
        "casa-6.7.0-31",
        "plotms",
    ]
    assert commands[("CASA 4.5.0", "casabrowser")][-1] == "browser"
    assert ("CASA 6.7.0-31", "viewer (imview)") not in commands
    assert ("CASA 6.6.5-31 (this session)", "viewer (imview)") in commands
    # No releases file (a session image): one line saying so.
    empty = ET.fromstring(casa_releases.menu_xml([], "casa-6.6.5-31", awkward))
    assert [i.get("label") for i in empty.iter("item")] == [
        "No other CASA release is prepared on this hub"
    ]


def test_casa_app_prints_the_menu_from_the_releases_file(cache: Path, catalog: Catalog) -> None:
    path = write_desktop_releases(manager(cache), catalog)
    env = {
        "PATH": "/usr/bin:/bin",
        "CASASPAWNER_RELEASES_FILE": str(path),
        "CASASPAWNER_RELEASE": "casa-4.5.0",
    }
    shown = subprocess.run(
        [CASA_APP, "releases-menu"], env=env, capture_output=True, text=True, check=True
    )
    menu = ET.fromstring(shown.stdout)
    first = menu.find("menu")
    assert first is not None and first.get("label") == "CASA 4.5.0 (this session)"


def session_environ(path: Path) -> dict[str, str]:
    """What a 6.6.5-31 desktop session's processes see (with the releases file)."""
    return {
        "HOME": "/arc/home/demo",
        "DISPLAY": ":7",
        "CASASPAWNER_RELEASE": "casa-6.6.5-31",
        "CASASPAWNER_KERNEL_NAME": "CASA 6.6.5-31 (approximate)",
        "CASASPAWNER_PIPELINE": "2023.1.0.124",
        "CASASPAWNER_APPROXIMATE": "true",
        "CASASPAWNER_CASA_HOME": "/envs/6.6.5-31/venv",
        "CASASPAWNER_CASA_PYTHON": "/envs/6.6.5-31/venv/bin/python",
        "CASASPAWNER_CASA_LOGFILE": "/arc/home/demo/casa.log",
        "CASASPAWNER_DATASET": "~/2023.1.01234.S",
        "CASASPAWNER_RELEASES_FILE": str(path),
    }


def test_a_launch_runs_the_other_releases_casa_and_keeps_the_sessions_files(
    cache: Path, catalog: Catalog
) -> None:
    path = write_desktop_releases(manager(cache), catalog)
    release, env = casa_releases.prepare_launch("casa-4.5.0", "browser", session_environ(path))
    assert release["id"] == "casa-4.5.0"
    assert env["CASASPAWNER_CASA_HOME"] == str(cache / "envs" / "4.5.0" / "casa")
    # CASA 4 has no Python 3: the session's own is not left for it.
    assert "CASASPAWNER_CASA_PYTHON" not in env
    assert env["CASASPAWNER_KERNEL_NAME"] == "CASA 4.5.0"
    assert env["CASASPAWNER_RELEASE"] == "casa-4.5.0"
    assert env["CASASPAWNER_APPROXIMATE"] == "false" and "CASASPAWNER_PIPELINE" not in env
    assert env["CASASPAWNER_REASON"] == (
        "CASA 4.5.0, added from the desktop menu beside this session's "
        "CASA 6.6.5-31 (approximate)."
    )
    # Its terminal goes where openbox finds room, not on the session's own.
    assert env["CASASPAWNER_TERMINAL_GEOMETRY"] == "110x32"
    # The same user's home, log, dataset and display.
    for name in ("HOME", "DISPLAY", "CASASPAWNER_CASA_LOGFILE", "CASASPAWNER_DATASET"):
        assert env[name] == session_environ(path)[name]
    _, env = casa_releases.prepare_launch("casa-6.7.0-31", "plotms", session_environ(path))
    assert env["CASASPAWNER_CASA_PYTHONPATH"] == str(cache / "envs" / "6.7.0-31" / "kernel-site")
    assert env["CASASITECONFIG"] == str(cache / "envs" / "6.7.0-31" / "casasiteconfig.py")


@pytest.mark.parametrize(
    ("release_id", "app", "sentence"),
    [
        (
            "casa-6.6.1-17",
            "plotms",
            "CASA release casa-6.6.1-17 is not prepared on this hub; "
            "the desktop menu lists those that are.",
        ),
        ("casa-6.7.0-31", "viewer", "viewer (imview) is not part of CASA 6.7.0-31."),
        (
            "casa-6.7.0-31",
            "rm -rf",
            "casa-app: unknown tool 'rm -rf' (terminal, plotms, viewer, browser, logger).",
        ),
    ],
)
def test_what_cannot_be_launched_is_one_sentence(
    cache: Path, catalog: Catalog, release_id: str, app: str, sentence: str
) -> None:
    path = write_desktop_releases(manager(cache), catalog)
    with pytest.raises(casa_releases.Refused) as refused:
        casa_releases.prepare_launch(release_id, app, session_environ(path))
    assert str(refused.value) == sentence


def test_casa_app_refuses_a_release_it_does_not_know_with_one_sentence(
    cache: Path, catalog: Catalog
) -> None:
    path = write_desktop_releases(manager(cache), catalog)
    env = {**session_environ(path), "PATH": "/usr/bin:/bin"}
    del env["DISPLAY"]
    refused = subprocess.run(
        [CASA_APP, "--release", "casa-9.9.9", "plotms"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert refused.stderr == (
        "CASA release casa-9.9.9 is not prepared on this hub; "
        "the desktop menu lists those that are.\n"
    )


def test_the_service_lists_every_release_with_the_spawners_refusal(
    tmp_path: Path, catalog: Catalog
) -> None:
    store = ReleaseStateStore(tmp_path / "state.json")
    store.update("casa-6.7.0-31", by="olga", drained=True, message="New build at 18:00")
    store.update("casa-4.5.0", by="olga", retired=True)
    entries = {e["id"]: e for e in release_states(catalog, store.load())}
    assert list(entries) == [r.id for r in catalog.releases]
    assert entries["casa-6.7.0-31"] == {
        "id": "casa-6.7.0-31",
        "label": "CASA 6.7.0-31",
        "casa": "6.7.0-31",
        "drained": True,
        "retired": False,
        "message": "New build at 18:00",
        "refusal": (
            "CASA 6.7.0-31 is being drained by the operators and cannot be started now: "
            "New build at 18:00."
        ),
    }
    assert entries["casa-4.5.0"]["retired"] and entries["casa-4.5.0"]["refusal"] is None
    assert not entries["casa-6.6.5-31"]["drained"]


@pytest_asyncio.fixture(loop_scope="function")
async def releases_service(catalog: Catalog, tmp_path: Path) -> Any:
    """A stand-in for casa-sessions' ``api/releases`` (its real answer, from a real state file)
    that records the token it was sent, and one that redirects elsewhere."""
    store = ReleaseStateStore(tmp_path / "state.json")
    store.update("casa-6.7.0-31", by="olga", drained=True, message="")
    seen: list[str | None] = []

    class Releases(RequestHandler):
        def get(self) -> None:
            seen.append(self.request.headers.get("Authorization"))
            self.finish({"releases": release_states(catalog, store.load())})

    class Elsewhere(RequestHandler):
        def get(self) -> None:
            self.redirect("http://127.0.0.2:9/api/releases")

    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(Application([("/api/releases", Releases), ("/moved", Elsewhere)]))
    server.add_sockets(sockets)
    yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}", seen
    server.stop()
    await server.close_all_connections()


async def test_a_drained_release_is_refused_with_the_operators_sentence(
    releases_service: Any, cache: Path, catalog: Catalog
) -> None:
    import asyncio

    base, seen = releases_service
    path = write_desktop_releases(manager(cache), catalog)
    environ = {
        **session_environ(path),
        "CASASPAWNER_RELEASES_URL": f"{base}/api/releases",
        "JUPYTERHUB_API_TOKEN": "session-token",
    }
    with pytest.raises(casa_releases.Refused) as refused:
        await asyncio.to_thread(casa_releases.prepare_launch, "casa-6.7.0-31", "plotms", environ)
    assert str(refused.value) == (
        "CASA 6.7.0-31 is being drained by the operators and cannot be started now; "
        "choose another release or try again later."
    )
    assert refused.value.title == "CASA 6.7.0-31"
    assert seen == ["token session-token"]
    # Another release starts.
    release, _ = await asyncio.to_thread(
        casa_releases.prepare_launch, "casa-4.5.0", "terminal", environ
    )
    assert release["id"] == "casa-4.5.0"
    # A redirect is not followed (the token would go along), and counts as a failure.
    with pytest.raises(OSError, match=r"answered HTTP 302"):
        await asyncio.to_thread(
            casa_releases.drain_refusal, f"{base}/moved", "session-token", "casa-6.7.0-31"
        )
    # A service that cannot be asked does not stop the app: drains refuse new work, the
    # session's own work goes on.
    unreachable = {**environ, "CASASPAWNER_RELEASES_URL": "http://127.0.0.1:9/api/releases"}
    release, _ = await asyncio.to_thread(
        casa_releases.prepare_launch, "casa-6.7.0-31", "plotms", unreachable
    )
    assert release["id"] == "casa-6.7.0-31"


# -------------------------------------------------------------------------------------------------
# integration: a desktop session in the browser

DATASET = f"~/{demo.DEMO_PROJECT}"
DRAIN_MESSAGE = "New measures tables until 18:00 UTC"


@pytest.fixture(scope="module")
def session_release(cache_dir: Path, demo_release: Release) -> Release:
    """The desktop session's release: another modular release prepared here, newest first (the
    local tier's approximate sessions prepare one), built now if none is. The demo's release is
    the other one, whose apps the session adds."""
    import asyncio

    manager = EnvironmentManager(cache_dir)
    others = sorted(
        (r for r in load_catalog().available(("modular",)) if r.id != demo_release.id),
        key=lambda r: r.casa_version,
        reverse=True,
    )
    ready = [r for r in others if manager.ready(r) is not None]
    if ready:
        return ready[0]
    buildable = [r for r in others if manager.unavailable_reason(r) is None]
    if not buildable:
        pytest.skip("no second CASA release can be installed on this machine")

    async def build() -> None:
        async for _ in manager.ensure(buildable[0]):
            pass

    # A fixture may run while the module's event loop does: the build gets a loop of its own.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, build()).result()
    return buildable[0]


class SessionDesktop:
    """The session's openbox: its display, its variables and user, and its menu's commands."""

    def __init__(self, session_pid: int) -> None:
        self.display, self.xauthority = wait_for_display(session_pid)
        deadline = time.monotonic() + 60
        while not (pids := [p for p in descendants(session_pid) if _program(p) == "openbox"]):
            assert time.monotonic() < deadline, "no openbox runs below the session's process"
            time.sleep(0.5)
        pid = pids[0]
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        self.env = dict(
            item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item
        )
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        self.uid, self.gid = int(status["Uid"].split()[0]), int(status["Gid"].split()[0])
        self.groups = [int(g) for g in status["Groups"].split()]
        argv = argv_of(pid)
        self.rc = Path(argv[argv.index("--config-file") + 1])
        self.cwd = os.readlink(f"/proc/{pid}/cwd")

    def other_releases_command(self) -> list[str]:
        """The command of the menu's "Other CASA releases" (a pipe menu), as openbox splits it."""
        namespace = {"ob": "http://openbox.org/3.4/rc", "m": "http://openbox.org/3.4/menu"}
        menu_file = ET.parse(self.rc).getroot().findtext("ob:menu/ob:file", namespaces=namespace)
        menu = ET.parse(menu_file or "").getroot()
        (entry,) = menu.iterfind(".//m:menu[@id='casa-other-releases']", namespace)
        return shlex.split(entry.get("execute") or "")

    def _as_user(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as openbox runs its menu's commands: its user, its variables."""
        return subprocess.run(
            argv,
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
            **self._as_user(),
        )

    def windows(self) -> list[tuple[int, str]]:
        """(pid, title) of the windows the window manager lists (``wmctrl -lp``)."""
        env = {**os.environ, "DISPLAY": self.display, "XAUTHORITY": self.xauthority}
        out = subprocess.run(
            ["wmctrl", "-lp"], capture_output=True, text=True, env=env, check=True
        ).stdout
        rows = [line.split(None, 4) for line in out.splitlines()]
        return [(int(row[2]), row[4] if len(row) == 5 else "") for row in rows if len(row) >= 4]

    def move(self, title: str, x: int, y: int, width: int, height: int) -> None:
        env = {**os.environ, "DISPLAY": self.display, "XAUTHORITY": self.xauthority}
        subprocess.run(
            ["wmctrl", "-F", "-r", title, "-e", f"0,{x},{y},{width},{height}"], env=env, check=True
        )


def _program(pid: int) -> str:
    argv = argv_of(pid)
    return Path(argv[0]).name if argv else ""


def ask_releases(url: str, token: str | None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"token {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_an_app_of_another_release_opens_on_the_sessions_desktop(
    hub: Hub,
    browser: Any,
    demo_release: Release,
    session_release: Release,
    demo_root: Path,
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    hub.stop_server()
    hub.spawn({"dataset": DATASET, "interface": "desktop", "release": session_release.id})
    page = password_login(browser, hub, demo.DEMO_USER)
    page.goto(f"{hub.url}/user/{demo.DEMO_USER}/desktop/")
    page.wait_for_function(
        "(document.querySelector('#status') || {}).textContent === 'Connected'", timeout=60_000
    )
    desktop = SessionDesktop(hub.session_pid())
    state = ReleaseStateStore(demo_root / "hub" / "casa-release-state.json")
    try:
        titles = wait_for_title(desktop.display, desktop.xauthority, session_release.label)
        assert session_release.label in titles, titles

        # The desktop menu's "Other CASA releases", as openbox computes it when it opens: the
        # session's own release first, then the others, newest first.
        shown = desktop.run(desktop.other_releases_command())
        assert shown.returncode == 0, shown.stderr
        menu = ET.fromstring(shown.stdout)
        labels = [m.get("label") for m in menu.findall("menu")]
        assert labels[:1] == [f"{session_release.label} (this session)"], labels
        assert demo_release.label in labels, labels
        apps = menu_commands(shown.stdout, demo_release.label)
        assert list(apps) == ["CASA terminal", "plotms", "viewer (imview)", "logger"], apps
        assert apps["plotms"][1:] == ["--release", demo_release.id, "plotms"], apps

        # Its CASA terminal, from the desktop's right-click menu through noVNC: named after the
        # other release once that CASA is loaded, so the window list names both releases.
        release_row = labels.index(demo_release.label)
        app_rows = list(apps)
        choose_from_menu(page, (900, 300), release_row, app_rows.index("CASA terminal"))
        titles = wait_for_title(desktop.display, desktop.xauthority, demo_release.label)
        assert demo_release.label in titles and session_release.label in titles, titles
        assert f"{demo_release.label}: start-up failed" not in titles
        desktop.move(session_release.label, 10, 10, 660, 380)
        desktop.move(demo_release.label, 10, 420, 660, 380)

        # Its plotms, from the menu too (the open menu is saved for the docs): a window on the
        # session's display, run by the session's user from the other release's environment, on
        # the session's MeasurementSet, logging to the session's log.
        home = demo_root / "arc" / "home" / demo.DEMO_USER
        log = home / "casa.log"
        plotted = "PlotMS::plot\tPlotting 9600 unflagged points."
        before = log.read_text(errors="replace").count(plotted) if log.exists() else 0
        page.wait_for_timeout(1000)
        choose_from_menu(
            page,
            (760, 200),
            release_row,
            app_rows.index("plotms"),
            screenshot=screenshot_path("local-desktop-other-release-menu.png", tmp_path),
        )
        other_root = EnvironmentManager(cache_dir).path_for(demo_release).resolve()
        deadline = time.monotonic() + 120
        while not [p for p, t in desktop.windows() if t == "PlotMS"]:
            assert time.monotonic() < deadline, desktop.windows()
            time.sleep(1)
        ((pid, _),) = [(p, t) for p, t in desktop.windows() if t == "PlotMS"]
        assert pid in descendants(hub.session_pid()), "openbox, the session's, started it"
        executable = Path(f"/proc/{pid}/exe").resolve()
        assert executable.is_relative_to(other_root), executable
        assert Path(f"/proc/{pid}").stat().st_uid == desktop.uid
        ms = next((home / demo.DEMO_PROJECT).rglob("*.ms"))
        assert f"vis={ms}" in argv_of(pid), argv_of(pid)
        while log.read_text(errors="replace").count(plotted) <= before:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(1)

        # The noVNC canvas, for the docs: the session's terminal, the other release's terminal
        # and its plotms.
        desktop.move("PlotMS", 690, 40, 690, 560)
        page.wait_for_timeout(8000)
        target = screenshot_path("local-desktop-other-release.png", tmp_path)
        page.locator("canvas").first.screenshot(path=str(target))
        assert target.stat().st_size > 10_000

        # casa-sessions answers the session's own token, not a service's or none.
        url = desktop.env["CASASPAWNER_RELEASES_URL"]
        assert url.endswith("/services/casa-sessions/api/releases"), url
        token = desktop.env["JUPYTERHUB_API_TOKEN"]
        assert ask_releases(url, None) == (403, {"error": "A user's token is required."})
        assert ask_releases(url, hub.token)[0] == 403
        status, body = ask_releases(url, token)
        assert status == 200
        entry = next(e for e in body["releases"] if e["id"] == demo_release.id)
        assert not entry["drained"]

        # The operators drain the other release: its apps are refused with their sentence, in a
        # window and on stderr; the session's own release still opens its apps.
        state.update(demo_release.id, by="operator", drained=True, message=DRAIN_MESSAGE)
        sentence = (
            f"{demo_release.label} is being drained by the operators and cannot be started now: "
            f"{DRAIN_MESSAGE}."
        )
        status, body = ask_releases(url, token)
        entry = next(e for e in body["releases"] if e["id"] == demo_release.id)
        assert entry["drained"] and entry["refusal"] == sentence
        refused = desktop.run(apps["plotms"])
        assert refused.returncode == 1
        assert refused.stderr == sentence + "\n"
        window = f"{demo_release.label}: not started"
        assert window in wait_for_title(desktop.display, desktop.xauthority, window, timeout=20)
        assert [t for _, t in desktop.windows()].count("PlotMS") == 1
    finally:
        state.update(demo_release.id, by="operator", drained=False, message="")
        page.close()
        hub.stop_server()

"""What a user sees when things go wrong on the embedded hub, and that sessions survive a hub
restart.

Driven through the hub's REST API (the same spawn path as the form) against the test hub of
conftest.py, whose catalog adds a release with non-existent wheels and one needing Python 3.4, and
whose tarball mirror is a closed loopback port (so every pipeline tarball is unreachable).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

import pytest
from support.hub import Hub
from support.local import wait_for_display, wait_for_title

from casaspawner.catalog.model import Release, load_catalog
from casaspawner.local import demo
from casaspawner.local.demo import as_owner_of
from casaspawner.local.environments import EnvironmentManager

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def nearest(cache_dir: Path, test_catalog: Path) -> dict[str, Release]:
    """What the test hub substitutes for each test release this machine cannot install (as the hub
    decides)."""
    catalog = load_catalog(str(test_catalog))
    manager = EnvironmentManager(cache_dir, tarball_mirror="http://127.0.0.1:9/", probe_timeout=2)
    found = {
        rid: manager.nearest_installable(catalog.get(rid), catalog)
        for rid in ("casa-6.6.6-1", "pl-2023.1.0.124")
    }
    assert all(found.values()), found
    return found  # type: ignore[return-value]


def spawn_and_watch(
    hub: Hub, options: dict[str, str]
) -> tuple[list[dict[str, object]], dict[str, object] | None]:
    """Start a server and follow its whole progress stream; (events, server model or None if it
    failed).

    The POST may not return before the spawn ends, so it runs in a thread while the stream is read
    (the spawner replays every event to each new reader).
    """
    hub.stop_server()
    outcome: dict[str, object] = {}

    def post() -> None:
        try:
            hub.api("POST", "/hub/api/users/demo/server", {"user_options": options}, timeout=900)
        except urllib.error.HTTPError as error:
            outcome["failed"] = json.loads(error.read())["message"]

    thread = threading.Thread(target=post)
    thread.start()
    events: list[dict[str, object]] = []
    while thread.is_alive() and not events:
        if ((hub.server() or {}).get("pending")) != "spawn":
            # Not pending yet (a stream now would replay the previous spawn's end).
            time.sleep(0.05)
            continue
        with contextlib.suppress(urllib.error.HTTPError):
            events = hub.progress()
    thread.join()
    if "failed" in outcome and not any(e.get("failed") for e in events):
        events.append({"failed": True, "message": outcome["failed"]})
    return events, hub.server()


def messages(events: list[dict[str, object]]) -> list[str]:
    return [str(e.get("message", "")) for e in events]


def assert_progress_never_drops(events: list[dict[str, object]]) -> None:
    progress = [e["progress"] for e in events if isinstance(e.get("progress"), int)]
    values = [int(p) for p in progress]  # type: ignore[call-overload]
    assert values == sorted(values), values


def test_failing_environment_build_gives_one_sentence(hub: Hub) -> None:
    events, server = spawn_and_watch(
        hub, {"dataset": "~/.tests/broken-build/2030.1.00001.S", "interface": "lab"}
    )
    assert server is None, "a failed build leaves no server behind"
    assert_progress_never_drops(events)
    assert events[-1].get("failed") is True
    final = str(events[-1]["message"])
    assert "Installing CASA 1.0.0-1 failed:" in final, final
    assert "casatools==1.0.0.1" in final, final
    assert "Traceback" not in final and final.count("\n") == 0


def test_missing_python_runs_the_nearest_release_marked_approximate(
    hub: Hub, nearest: dict[str, Release]
) -> None:
    events, server = spawn_and_watch(
        hub, {"dataset": "~/.tests/missing-python/2030.1.00002.S", "interface": "lab"}
    )
    assert server is not None and server["ready"], messages(events)
    substitute = nearest["casa-6.6.6-1"].label
    expected = (
        "CASA 6.6.6-1 cannot be installed on this hub: its wheels need Python 3.4, which this "
        f"machine does not have; the session runs {substitute} instead (the dataset calls for "
        "CASA 6.6.6-1)."
    )
    ours = [m for m in messages(events) if m != "Server requested"]
    # Said first, before anything else.
    assert ours[0] == f"Approximate session: {expected}", ours
    assert ours.count(expected) == 0, "the reason is not repeated on its own line"
    assert_progress_never_drops(events)
    profile = server["user_options"]["profile"]  # type: ignore[index]
    assert profile.endswith("approximate"), profile
    specs = hub.api("GET", "/user/demo/api/kernelspecs")
    names = {spec["spec"]["display_name"] for spec in specs["kernelspecs"].values()}
    assert f"{substitute} (approximate)" in names, names
    hub.stop_server()


def test_unreachable_pipeline_tarball_gives_an_approximate_desktop_with_a_banner(
    hub: Hub, nearest: dict[str, Release]
) -> None:
    events, server = spawn_and_watch(
        hub, {"dataset": "~/.tests/cycle10/2023.1.00026.S", "interface": "desktop"}
    )
    assert server is not None and server["ready"], messages(events)
    notes = [m for m in messages(events) if m.startswith("Approximate session:")]
    assert (
        notes
        and "CASA 6.5.4-9 (pipeline 2023.1.0.124) cannot be installed on this hub" in notes[0]
    ), notes
    assert "is unreachable" in notes[0]
    # Desktops start with the first visit of /desktop/ (jupyter-server-proxy starts TigerVNC on
    # demand): the websockify URL is no websocket here, but it starts the VNC server.
    with contextlib.suppress(urllib.error.HTTPError):
        hub.api("GET", "/user/demo/desktop-websockify/", timeout=60)
    display, xauthority = wait_for_display(hub.session_pid())
    name = f"{nearest['pl-2023.1.0.124'].label} (approximate)"
    titles = wait_for_title(display, xauthority, f"{name}: approximate session")
    # The banner.
    assert f"{name}: approximate session" in titles, titles
    titles = wait_for_title(display, xauthority, name)
    # The CASA terminal, ready.
    assert name in titles, titles
    hub.stop_server()


def test_a_session_log_that_is_a_link_is_refused_and_nothing_outside_is_touched(
    hub: Hub, demo_root: Path
) -> None:
    """A user who links ~/.casaspawner-session.log to a file they may not write (``/etc/shadow`` on
    a hub running as root) gets a sentence, and the file keeps its content, owner and mode."""
    home = demo_root / "arc" / "home" / demo.DEMO_USER
    fd, name = tempfile.mkstemp(prefix="casaspawner-victim-", dir=demo_root)
    victim = Path(name)
    os.write(fd, b"secret\n")
    os.close(fd)
    victim.chmod(0o600)
    before = victim.stat()
    log = home / ".casaspawner-session.log"
    as_owner_of(home, lambda: (log.unlink(missing_ok=True), log.symlink_to(victim)))
    try:
        events, server = spawn_and_watch(
            hub, {"dataset": f"~/{demo.DEMO_PROJECT}", "interface": "lab"}
        )
        assert server is None, messages(events)
        # "Spawn failed: " is the hub's own.
        assert events[-1]["message"] == (
            "Spawn failed: ~/.casaspawner-session.log in your home is not a regular file of "
            "yours (a link?); remove it and start again."
        ), events[-1]
        after = victim.stat()
        assert victim.read_bytes() == b"secret\n"
        assert (after.st_uid, after.st_gid, after.st_mode) == (
            before.st_uid,
            before.st_gid,
            before.st_mode,
        )
    finally:
        as_owner_of(home, log.unlink)
        victim.unlink()


def test_session_survives_a_hub_restart(hub: Hub) -> None:
    events, server = spawn_and_watch(
        hub, {"dataset": f"~/{demo.DEMO_PROJECT}", "interface": "lab"}
    )
    assert server is not None and server["ready"], messages(events)
    pid = hub.session_pid()
    hub.stop(keep_sessions=True)
    # Still running without the hub.
    os.kill(pid, 0)
    hub.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (hub.server() or {}).get("ready"):
        time.sleep(0.5)
    assert (hub.server() or {}).get("ready"), "the restarted hub found the running session"
    # Through the restarted proxy.
    status = hub.api("GET", "/user/demo/api/status")
    assert "started" in status
    assert hub.session_pid() == pid
    hub.stop_server()


@pytest.mark.parametrize(
    ("port", "sentence"),
    [
        (
            "70000",
            "Port 70000 is out of range; give one from 1 to 65533 with --port (the hub also uses "
            "the next two).",
        ),
        (
            "-5",
            "Port -5 is out of range; give one from 1 to 65533 with --port (the hub also uses "
            "the next two).",
        ),
        (
            "65535",
            "Port 65535 is out of range; give one from 1 to 65533 with --port (the hub also uses "
            "the next two).",
        ),
        (
            "abc",
            "The port 'abc' is not a number; give one from 1 to 65533 with --port (the hub also "
            "uses the next two).",
        ),
    ],
)
@pytest.mark.parametrize("given", ["option", "environment"])
def test_demo_refuses_a_bad_port_with_one_sentence(
    port: str, sentence: str, given: str, tmp_path: Path
) -> None:
    args = ["--port", port] if given == "option" else []
    result = subprocess.run(
        [sys.executable, "-m", "casaspawner.local.demo", "prepare", *args, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CASASPAWNER_DEMO_PORT": port if given == "environment" else "8000"},
    )
    assert (result.returncode, result.stderr, result.stdout) == (
        2,
        f"casaspawner demo: {sentence}\n",
        "",
    )


def test_demo_refuses_a_port_in_use_with_one_sentence(tmp_path: object) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "casaspawner.local.demo",
                "run",
                "--port",
                str(port),
                "--dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"casaspawner demo: Port {port} on 127.0.0.1 is already in use; stop what uses it or "
        "choose another port with --port (make demo DEMO_PORT=8100)."
    )

"""What a user sees when things go wrong on the embedded hub, and that sessions survive a hub restart.

Driven through the hub's REST API (the same spawn path as the form) against the test hub of conftest.py,
whose catalog adds a release with non-existent wheels and one needing Python 3.4, and whose tarball mirror
is a closed loopback port (so every pipeline tarball is unreachable).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error

import pytest
from local_support import Hub, session_display, window_titles

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def spawn_and_watch(
    hub: Hub, options: dict[str, str]
) -> tuple[list[dict[str, object]], dict[str, object] | None]:
    """Start a server and follow its whole progress stream; (events, server model or None if it failed).

    The POST may not return before the spawn ends, so it runs in a thread while the stream is read (the
    spawner replays every event to each new reader).
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
            time.sleep(0.05)  # not pending yet (a stream now would replay the previous spawn's end)
            continue
        with contextlib.suppress(urllib.error.HTTPError):
            events = hub.progress()
    thread.join()
    if "failed" in outcome and not any(e.get("failed") for e in events):
        events.append({"failed": True, "message": outcome["failed"]})
    return events, hub.server()


def messages(events: list[dict[str, object]]) -> list[str]:
    return [str(e.get("message", "")) for e in events]


def test_failing_environment_build_gives_one_sentence(hub: Hub) -> None:
    events, server = spawn_and_watch(
        hub, {"dataset": "~/tests/broken-build/2030.1.00001.S", "interface": "lab"}
    )
    assert server is None, "a failed build leaves no server behind"
    assert events[-1].get("failed") is True
    final = str(events[-1]["message"])
    assert "Installing CASA 1.0.0-1 failed:" in final, final
    assert "casatools==1.0.0.1" in final, final
    assert "Traceback" not in final and final.count("\n") == 0


def test_missing_python_runs_the_nearest_release_marked_approximate(hub: Hub) -> None:
    events, server = spawn_and_watch(
        hub, {"dataset": "~/tests/missing-python/2030.1.00002.S", "interface": "lab"}
    )
    assert server is not None and server["ready"], messages(events)
    expected = (
        "CASA 6.6.6-1 cannot be installed on this hub: its wheels need Python 3.4, which this machine does not "
        "have; the session runs CASA 6.6.5-31 instead (the dataset calls for CASA 6.6.6-1)."
    )
    assert f"Approximate session: {expected}" in messages(events)
    profile = server["user_options"]["profile"]  # type: ignore[index]
    assert profile.endswith("approximate"), profile
    specs = hub.api("GET", "/user/demo/api/kernelspecs")
    names = {spec["spec"]["display_name"] for spec in specs["kernelspecs"].values()}
    assert "CASA 6.6.5-31 (approximate)" in names, names
    hub.stop_server()


def test_unreachable_pipeline_tarball_gives_an_approximate_desktop_with_a_banner(hub: Hub) -> None:
    events, server = spawn_and_watch(
        hub, {"dataset": "~/tests/cycle10/2023.1.00026.S", "interface": "desktop"}
    )
    assert server is not None and server["ready"], messages(events)
    notes = [m for m in messages(events) if m.startswith("Approximate session:")]
    assert notes and "CASA 6.5.4-9 (pipeline 2023.1.0.124) cannot be installed on this hub" in notes[0], notes
    assert "is unreachable" in notes[0]
    # Desktops start with the first visit of /desktop/ (jupyter-server-proxy starts TigerVNC on demand).
    with contextlib.suppress(urllib.error.HTTPError):  # not a websocket, but it starts the VNC server
        hub.api("GET", "/user/demo/desktop-websockify/", timeout=60)
    deadline = time.monotonic() + 60
    titles: list[str] = []
    while time.monotonic() < deadline:
        try:
            titles = window_titles(*session_display("jupyter-demo"))
        except AssertionError:
            titles = []
        if any("approximate session" in t for t in titles):
            break
        time.sleep(1)
    assert "CASA 6.6.5-31 (approximate): approximate session" in titles, titles
    assert "CASA 6.6.5-31 (approximate)" in titles, titles
    hub.stop_server()


def test_session_survives_a_hub_restart(hub: Hub) -> None:
    events, server = spawn_and_watch(hub, {"dataset": "~/2023.1.01234.S", "interface": "lab"})
    assert server is not None and server["ready"], messages(events)
    pid = hub.api("GET", "/hub/api/users/demo")["servers"][""]["state"]["pid"]
    hub.stop()
    os.kill(pid, 0)  # still running without the hub
    hub.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (hub.server() or {}).get("ready"):
        time.sleep(0.5)
    assert (hub.server() or {}).get("ready"), "the restarted hub found the running session"
    status = hub.api("GET", "/user/demo/api/status")  # through the restarted proxy
    assert "started" in status
    assert hub.api("GET", "/hub/api/users/demo")["servers"][""]["state"]["pid"] == pid
    hub.stop_server()


def test_demo_refuses_a_port_in_use_with_one_sentence(tmp_path: object) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "casaspawner.demo", "run", "--port", str(port), "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"casaspawner demo: Port {port} on 127.0.0.1 is already in use; stop what uses it or choose another "
        "port with --port."
    )

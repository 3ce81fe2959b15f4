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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import NPM_BIN
from support.hub import Hub
from support.local import wait_for_display, wait_for_title

from casaspawner.catalog.model import Release, load_catalog
from casaspawner.local import demo
from casaspawner.local.demo import as_owner_of
from casaspawner.local.environments import EnvironmentManager
from casaspawner.local.processes import descendants
from casaspawner.net import free_port

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
    # The desktop starts with the session, before anyone visits /desktop/: by the time the hub
    # has the server, the X server runs.
    display, xauthority = wait_for_display(hub.session_pid(), timeout=5)
    name = f"{nearest['pl-2023.1.0.124'].label} (approximate)"
    titles = wait_for_title(display, xauthority, f"{name}: approximate session")
    # The banner.
    assert f"{name}: approximate session" in titles, titles
    titles = wait_for_title(display, xauthority, name)
    # The CASA terminal, ready.
    assert name in titles, titles
    # The desktop's socket is in a private directory of its own, which goes with the session.
    environ = Path(f"/proc/{hub.session_pid()}/environ").read_bytes().split(b"\0")
    socket = Path(
        next(v for v in environ if v.startswith(b"CASASPAWNER_DESKTOP_SOCKET="))
        .split(b"=", 1)[1]
        .decode()
    )
    assert socket.is_socket() and (socket.parent.stat().st_mode & 0o777) == 0o700
    hub.stop_server()
    assert not socket.parent.exists()


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
            "Port 70000 is out of range; give one from 1 to 65532 with --port (the hub also uses "
            "the next three).",
        ),
        (
            "-5",
            "Port -5 is out of range; give one from 1 to 65532 with --port (the hub also uses "
            "the next three).",
        ),
        (
            "65533",
            "Port 65533 is out of range; give one from 1 to 65532 with --port (the hub also uses "
            "the next three).",
        ),
        (
            "abc",
            "The port 'abc' is not a number; give one from 1 to 65532 with --port (the hub also "
            "uses the next three).",
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


def status_field(pid: int, name: str) -> str:
    """A field of /proc/<pid>/status, such as ``SigIgn``."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line.split()[1] for line in lines if line.startswith(f"{name}:"))


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_demo_names_the_logins_after_the_hubs_start_up_lines_and_again_when_stopped(
    checkout: Path, cache_dir: Path, demo_release: Release, tmp_path: Path
) -> None:
    """``make demo`` as a newcomer meets it: the URL, the logins and the dataset come after the
    hub's own start-up lines, the hub answers, and Ctrl-C (SIGINT to the whole process group, as a
    terminal sends it) stops the hub and says them again. Started as a shell starts a background
    job (``make demo &``: SIGINT ignored), neither the hub nor its services ignore Ctrl-C."""
    root = Path(tempfile.mkdtemp(prefix="casaspawner-demo-run-", dir="/tmp"))
    os.chmod(root, 0o755)
    port = free_port(count=4)
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "CASASPAWNER_ENVIRONMENTS_DIR": str(cache_dir),
        "PATH": os.pathsep.join([str(NPM_BIN), os.environ.get("PATH", "")]),
    }
    command = [sys.executable, "-m", "casaspawner.local.demo", "run", "--port", str(port)]
    command += ["--dir", str(root), "--storage", str(root / "arc")]
    with open(tmp_path / "demo.out", "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=checkout,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 600
        output = ""
        while f"Open {url}" not in output:
            assert process.poll() is None and time.monotonic() < deadline, output[-3000:]
            time.sleep(0.5)
            output = (tmp_path / "demo.out").read_text(errors="replace")
        password = (root / "hub" / "password").read_text().strip()
        banner = [
            f"[casaspawner demo] {line}" for line in demo.banner(port, password, demo_release)
        ]
        lines = output.splitlines()
        start = lines.index(banner[0])
        assert lines[start : start + len(banner)] == banner, lines[start:]
        assert any("JupyterHub is now running at" in line for line in lines[:start])
        # The banner is the last thing said.
        assert not lines[start + len(banner) :], lines[start + len(banner) :]
        with urllib.request.urlopen(f"{url}hub/login", timeout=10) as response:
            assert response.status == 200
        # The hub, casa-sessions and the idle culler (each in a session of its own).
        below = descendants(process.pid)
        assert len(below) >= 3, below
        for pid in [process.pid, *below]:
            ignored = int(status_field(pid, "SigIgn"), 16)
            assert not ignored & (1 << (signal.SIGINT - 1)), (pid, cmdline(pid))
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(90) == 0
        lines = (tmp_path / "demo.out").read_text(errors="replace").splitlines()
        assert lines[-len(banner) :] == banner, lines[-10:]
        assert "The hub has stopped; sessions keep running" in lines[-len(banner) - 1]
    finally:
        # Whatever of the demo is left (nothing, when it stopped as it should): its process group,
        # and the hub's proxy and services, each in a session of its own.
        for pid in descendants(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait(10)
        shutil.rmtree(root, ignore_errors=True)

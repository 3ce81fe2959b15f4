"""Idle culling for real: jupyterhub-idle-culler runs as a hub-managed service with its
least-privilege role; the user is warned inside the session (a JupyterLab notification and the
notice file) before the culler stops it; and someone working only on the CASA desktop (noVNC over
jupyter-server-proxy's websocket) counts as active, while an open desktop nobody uses is culled."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support.browser import oidc_login

from casaspawner.datasets.synth import write_dataset
from casaspawner.insession.notices import NOTICE_FILE

pytestmark = pytest.mark.integration


def server_running(hub: Any, user: str) -> bool:
    return bool(hub.api("GET", f"/hub/api/users/{user}")["servers"])


def wait_until_culled(hub: Any, user: str, timeout: float) -> float:
    """Seconds until the culler stopped ``user``'s server (fails after ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not server_running(hub, user):
            return time.monotonic() - start
        time.sleep(0.5)
    pytest.fail(f"{user}'s idle session was not culled within {timeout:.0f} s")


def test_idle_session_is_warned_then_culled(hub_factory, browser):
    hub = hub_factory(CASA_CULL_TIMEOUT="12", CASA_CULL_EVERY="2", CASA_CULL_WARN_BEFORE="10")
    # auth_state (uid, gid, groups) comes from this login.
    page = oidc_login(browser, hub, "bob")
    dataset = write_dataset(hub.workdir / "data", era="cycle9")
    # The options as the body: JupyterHub 5's shape, which 6 still accepts.
    hub.api("POST", "/hub/api/users/bob/server", {"dataset": str(dataset)})
    page.goto(f"{hub.url}/user/bob/lab")
    page.locator("#jp-main-dock-panel").wait_for(timeout=60_000)

    # bob's open JupyterLab shows the warning as a notification; the notice file has it too.
    warning = page.locator(
        ".jp-toastContainer .Toastify__toast", has_text="will be stopped at about"
    )
    warning.first.wait_for(timeout=30_000)
    assert "unless you use it" in warning.first.inner_text()
    assert "will be stopped at about" in (hub.workdir / "home" / "bob" / NOTICE_FILE).read_text()
    # Showing notices is not activity: an idle Lab is still culled.
    wait_until_culled(hub, "bob", 60)
    page.context.close()
    assert "DELETE /hub/api/users/bob/server (jupyterhub-idle-culler@127.0.0.1)" in hub.log()
    culler = hub.api("GET", "/hub/api/services/jupyterhub-idle-culler")
    assert culler["roles"] == ["jupyterhub-idle-culler"]


def end_desktop(workdir: Path, pid_file: Path) -> None:
    """The test spawner stops only the Jupyter server: end the X server and session it left (ours
    only)."""
    pids = [int(pid_file.read_text())] if pid_file.is_file() else []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            proc.name.isdigit()
            and cmdline[0].endswith(b"Xtigervnc")
            and str(workdir).encode() in b" ".join(cmdline)
        ):
            pids.append(int(proc.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@pytest.mark.skipif(
    shutil.which("vncserver") is None, reason="TigerVNC is not installed (`make deps`)"
)
def test_desktop_use_counts_as_activity(hub_factory, browser, tmp_path):
    """Mouse moves on the noVNC canvas keep the session past the cull timeout; once they stop, it
    is culled.

    The desktop is a bare X server (no window manager, nothing on screen changes), so only the
    user's input travels over the websocket.
    """
    timeout = 12
    xstartup = tmp_path / "xstartup"
    pid_file = tmp_path / "desktop.pid"
    xstartup.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 600\n")
    xstartup.chmod(0o755)
    hub = hub_factory(
        CASA_CULL_TIMEOUT=str(timeout),
        CASA_CULL_EVERY="2",
        CASA_CULL_WARN_BEFORE="6",
        CASA_TEST_FAST_ACTIVITY="1",
        CASA_TEST_XSTARTUP=str(xstartup),
    )
    page = oidc_login(browser, hub, "bob")
    dataset = write_dataset(hub.workdir / "data", era="cycle9")
    hub.api("POST", "/hub/api/users/bob/server", {"dataset": str(dataset), "interface": "desktop"})
    try:
        check_desktop_activity(hub, page, timeout)
    finally:
        page.context.close()
        end_desktop(hub.workdir, pid_file)


def check_desktop_activity(hub: Any, page: Any, timeout: int) -> None:
    page.goto(f"{hub.url}/user/bob/desktop/")
    page.wait_for_function(
        "(document.querySelector('#status') || {}).textContent === 'Connected'", timeout=60_000
    )
    canvas = page.locator("canvas").first.bounding_box()
    assert canvas is not None

    # Active on the desktop only, for three cull timeouts: the session stays.
    started = time.monotonic()
    step = 0
    while time.monotonic() - started < 3 * timeout:
        step += 1
        page.mouse.move(canvas["x"] + 50 + (step % 20) * 10, canvas["y"] + 50 + (step % 7) * 10)
        time.sleep(1)
        assert server_running(hub, "bob"), (
            f"culled after {time.monotonic() - started:.0f} s of desktop use"
        )
    server = hub.api("GET", "/hub/api/users/bob")["servers"][""]
    assert server["last_activity"] > server["started"]

    # The desktop stays open, nobody touches it: warned (the notice file the desktop shows), then
    # culled.
    notice = Path(hub.workdir / "home" / "bob" / NOTICE_FILE)
    deadline = time.monotonic() + 3 * timeout
    while time.monotonic() < deadline and not (
        notice.is_file() and "will be stopped" in notice.read_text()
    ):
        time.sleep(0.5)
    assert notice.is_file() and "will be stopped" in notice.read_text()
    wait_until_culled(hub, "bob", 4 * timeout)

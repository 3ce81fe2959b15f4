"""The local sessions' desktop: the X server a session runs, its windows and their titles."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from casaspawner.local.processes import descendants


def argv_of(pid: int) -> list[str]:
    """The command line of process ``pid``; empty when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def session_display(pid: int) -> tuple[str, str]:
    """DISPLAY and XAUTHORITY of the TigerVNC server the session with server pid ``pid`` runs —
    found among that process's descendants, whoever the session runs as (a local account, or the
    hub's own user)."""
    seen = []
    for child in descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parts = [a.decode(errors="replace") for a in argv if a]
        seen.append(" ".join(parts[:2]))
        if parts and Path(parts[0]).name == "Xtigervnc":
            display = next((p for p in parts[1:] if p.startswith(":")), None)
            auth = parts[parts.index("-auth") + 1] if "-auth" in parts else ""
            if display:
                return display, auth
    raise AssertionError(f"no Xtigervnc runs below the session process {pid}: {seen}")


def wait_for_display(pid: int, timeout: float = 60) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return session_display(pid)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_for_title(display: str, xauthority: str, title: str, timeout: float = 90) -> list[str]:
    """Wait until a window titled exactly ``title`` is listed; returns the titles (the last ones on
    timeout)."""
    deadline = time.monotonic() + timeout
    titles = window_titles(display, xauthority)
    while title not in titles and time.monotonic() < deadline:
        time.sleep(0.5)
        titles = window_titles(display, xauthority)
    return titles


def window_geometry(display: str, xauthority: str, title: str) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the window titled ``title`` on the root window (``xwininfo``)."""
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    out = subprocess.run(
        ["xwininfo", "-name", title], capture_output=True, text=True, env=env, check=True
    ).stdout
    field = {
        k.strip(): v.strip()
        for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)
    }
    return (
        int(field["Absolute upper-left X"]),
        int(field["Absolute upper-left Y"]),
        int(field["Width"]),
        int(field["Height"]),
    )


def window_titles(display: str, xauthority: str) -> list[str]:
    """Titles of the windows the window manager lists (``wmctrl -l``), each also in ``xwininfo``'s
    tree."""
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    for _ in range(10):
        # A window may open, close or be renamed between the two looks.
        wm = subprocess.run(["wmctrl", "-l"], capture_output=True, text=True, env=env)
        if wm.returncode != 0:
            # The window manager has not published its client list yet.
            return []
        # A window that closes while xwininfo walks the tree makes it fail (BadWindow): look again.
        tree = subprocess.run(
            ["xwininfo", "-root", "-tree"], capture_output=True, text=True, env=env
        )
        titles = [
            line.split(None, 3)[3]
            for line in wm.stdout.splitlines()
            if len(line.split(None, 3)) == 4
        ]
        if tree.returncode == 0 and all(f'"{title}"' in tree.stdout for title in titles):
            return titles
        time.sleep(0.2)
    raise AssertionError(
        f"wmctrl and xwininfo disagree: {titles} / {(tree.stdout + tree.stderr)[-2000:]}"
    )

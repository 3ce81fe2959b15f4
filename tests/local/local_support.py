"""Helpers for the local-mode tests: a real JupyterHub with LocalCASASpawner, driven over HTTP and a browser."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from casaspawner.local.processes import descendants

REPO = Path(__file__).resolve().parents[2]
#: The test hub's configuration, relative to a checkout (it loads ``hub-config/local`` of the same checkout).
TEST_CONFIG = Path("tests") / "local" / "hub_config.py"
SCREENSHOTS = REPO / "docs" / "_static" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port_block(count: int = 3) -> int:
    """A port P such that P … P+count-1 are all free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65000:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports on 127.0.0.1")


@dataclass
class Hub:
    """A JupyterHub process started with ``tests/local/hub_config.py`` (which loads the example config)."""

    root: Path
    env: dict[str, str]
    token: str
    password: str = ""
    port: int = 0
    checkout: Path = REPO
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        state = self.root / "hub"
        state.mkdir(parents=True, exist_ok=True)
        log = self.root / f"hub-{len(self.logs)}.log"
        self.logs.append(log)
        env = {**self.env, "CASASPAWNER_DEMO_PORT": str(self.port)}
        jupyterhub = str(Path(sys.prefix) / "bin" / "jupyterhub")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [jupyterhub, "-f", str(self.checkout / TEST_CONFIG)],
                cwd=state,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # as `make demo` runs it: not in pytest's process group
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the hub exited: {log.read_text()[-3000:]}")
            try:
                self.api("GET", "/hub/api/")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"the hub did not start: {log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs if path.exists())

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
        return json.loads(text) if text.strip() else None

    def session_pid(self, user: str = "demo") -> int:
        """The pid of the user's session server (from the hub's saved state)."""
        return int(self.api("GET", f"/hub/api/users/{user}")["servers"][""]["state"]["pid"])

    def server(self, user: str = "demo") -> dict[str, Any] | None:
        model = self.api("GET", f"/hub/api/users/{user}")
        servers: dict[str, Any] = model.get("servers") or {}
        return servers.get("")

    def stop_server(self, user: str = "demo", timeout: float = 120) -> None:
        if self.server(user) is None:
            return
        try:
            self.api("DELETE", f"/hub/api/users/{user}/server")
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server(user) is None:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the server of {user} did not stop")

    def spawn(self, options: dict[str, str], user: str = "demo", timeout: float = 900) -> dict[str, Any]:
        """Start a server through the REST API and wait until it is ready (or failed)."""
        self.api("POST", f"/hub/api/users/{user}/server", {"user_options": options})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.server(user)
            if server is None:
                raise RuntimeError(f"the spawn failed: {self.log_text()[-3000:]}")
            if server.get("ready"):
                return server
            time.sleep(1)
        raise RuntimeError("the spawn timed out")

    def progress(self, user: str = "demo") -> list[dict[str, Any]]:
        """The spawn-progress events (server-sent events) until the stream ends."""
        request = urllib.request.Request(
            f"{self.url}/hub/api/users/{user}/server/progress",
            headers={"Authorization": f"token {self.token}"},
        )
        events = []
        with urllib.request.urlopen(request, timeout=900) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        return events


def session_display(pid: int) -> tuple[str, str]:
    """DISPLAY and XAUTHORITY of the TigerVNC server the session with server pid ``pid`` runs — found among
    that process's descendants, whoever the session runs as (a local account, or the hub's own user)."""
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
    """Wait until a window titled exactly ``title`` is listed; returns the titles (the last ones on timeout)."""
    deadline = time.monotonic() + timeout
    titles = window_titles(display, xauthority)
    while title not in titles and time.monotonic() < deadline:
        time.sleep(0.5)
        titles = window_titles(display, xauthority)
    return titles


def window_geometry(display: str, xauthority: str, title: str) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the window titled ``title``, on the root window, from ``xwininfo``."""
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    out = subprocess.run(
        ["xwininfo", "-name", title], capture_output=True, text=True, env=env, check=True
    ).stdout
    field = {
        k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)
    }
    return (
        int(field["Absolute upper-left X"]),
        int(field["Absolute upper-left Y"]),
        int(field["Width"]),
        int(field["Height"]),
    )


def window_titles(display: str, xauthority: str) -> list[str]:
    """Titles of the windows the window manager lists (``wmctrl -l``), each also in ``xwininfo``'s tree."""
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    for _ in range(10):  # a window may open, close or be renamed between the two looks
        wm = subprocess.run(["wmctrl", "-l"], capture_output=True, text=True, env=env)
        if wm.returncode != 0:  # the window manager has not published its client list yet
            return []
        tree = subprocess.run(
            ["xwininfo", "-root", "-tree"], capture_output=True, text=True, env=env, check=True
        )
        titles = [line.split(None, 3)[3] for line in wm.stdout.splitlines() if len(line.split(None, 3)) == 4]
        if all(f'"{title}"' in tree.stdout for title in titles):
            return titles
        time.sleep(0.2)
    raise AssertionError(f"wmctrl and xwininfo disagree: {titles} / {tree.stdout[-2000:]}")

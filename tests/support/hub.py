"""A JupyterHub process on 127.0.0.1, started from a config file, and its REST API.

The one launcher of the tests and the benchmarks. The hub runs in a session of its own (as
``make demo`` runs it: not in pytest's process group), logs into its working directory and is
ready when ``/hub/health`` answers through its proxy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from casaspawner.local.processes import descendants

#: What a wheel install of casaspawner puts beside the package (setup.cfg's data_files, relative
#: to the environment's prefix) and the sessions need; ``make hub-dev-install`` links them into
#: the development venv.
LAB_OVERRIDES = PurePosixPath("share/jupyter/lab/settings/overrides.d/casaspawner.json")
SESSION_DATA_FILES = (
    PurePosixPath("share/jupyter/labextensions/casaspawner-notices/package.json"),
    PurePosixPath("etc/jupyter/jupyter_server_config.d/casaspawner.json"),
    LAB_OVERRIDES,
)


@dataclass
class Hub:
    """``jupyterhub -f config`` in ``workdir``; its proxy listens on ``port``.

    ``token`` is the API token of a service ``config`` declares; ``user`` is whose server the
    server helpers act on unless told, and ``password`` the shared password of a hub that logs
    users in with one. The hub may be stopped and started again: each start logs into a file of
    its own, and :meth:`log` reads them all.
    """

    config: Path
    workdir: Path
    env: dict[str, str]
    port: int
    token: str = ""
    user: str = ""
    password: str = ""
    name: str = "jupyterhub"
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        """Start the hub and wait until it answers; fail with the end of its log if it does not."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{self.name}-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(self.config)],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # As a hub runs: a test run started in the background (`make test &`) has SIGINT
                # ignored, which the hub would pass on to its services; stopping one would then
                # wait out JupyterHub's SIGINT grace, and a hub killed meanwhile orphans them.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/hub/health", timeout=2) as response:
                    if response.status == 200:
                        return
            # Refused, or the proxy's 404 before the hub has added its route.
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not answer at {self.url}:\n{self.log()[-4000:]}")

    def stop(self, keep_sessions: bool = False) -> None:
        """Stop the hub, then whatever it started that outlived it (proxy, services, sessions).

        With ``keep_sessions``, only the hub is stopped, as when it restarts.
        """
        if self.process is None:
            return
        stop_tree(self.process, children=not keep_sessions)
        self.process = None

    def log(self) -> str:
        """Everything the hub logged, over all its starts."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        """Call ``path`` (the hub's REST API, or a session's through the proxy) with ``token``."""
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
        return json.loads(text) if text.strip() else None

    def server(self, user: str = "") -> dict[str, Any] | None:
        """The model of the user's default server, None when it is not running."""
        model = self.api("GET", f"/hub/api/users/{user or self.user}")
        servers: dict[str, Any] = model.get("servers") or {}
        return servers.get("")

    def session_pid(self, user: str = "") -> int:
        """The pid of the user's session server (from the hub's saved state)."""
        return int(self.server(user)["state"]["pid"])  # type: ignore[index]

    def spawn(
        self, options: dict[str, str], user: str = "", timeout: float = 900
    ) -> dict[str, Any]:
        """Start a server through the REST API and wait until it is ready (or failed)."""
        user = user or self.user
        self.api("POST", f"/hub/api/users/{user}/server", {"user_options": options})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.server(user)
            if server is None:
                raise RuntimeError(f"the spawn failed: {self.log()[-3000:]}")
            if server.get("ready"):
                return server
            time.sleep(1)
        raise RuntimeError("the spawn timed out")

    def progress(self, user: str = "") -> list[dict[str, Any]]:
        """The spawn-progress events (server-sent events) until the stream ends."""
        request = urllib.request.Request(
            f"{self.url}/hub/api/users/{user or self.user}/server/progress",
            headers={"Authorization": f"token {self.token}"},
        )
        events = []
        with urllib.request.urlopen(request, timeout=900) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        return events

    def stop_server(self, user: str = "", timeout: float = 120) -> None:
        """Stop the user's server, if it runs, and wait until the hub says it has stopped."""
        user = user or self.user
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


def stop_tree(
    process: subprocess.Popen[bytes], children: bool = True, timeout: float = 10
) -> None:
    """SIGTERM ``process`` (SIGKILL after 30 s), then what it started and left running."""
    started = descendants(process.pid) if children else []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    terminate(started, timeout)


def terminate(pids: list[int], timeout: float = 10) -> None:
    """SIGTERM the processes still alive, then SIGKILL those that are left after ``timeout``."""
    alive = [pid for pid in pids if _signal(pid, signal.SIGTERM)]
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if _signal(pid, 0)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True

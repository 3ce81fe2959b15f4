"""Fixtures for the hub tests: a real OIDC provider, a real JupyterHub process and headless Chromium, all on
127.0.0.1.

* ``oidc``: oidc-provider-mock (a real OpenID Connect provider) in a thread, with the test users' claims.
* ``hub_factory``: starts ``jupyterhub`` as a subprocess with ``hub-config/jupyterhub_config.py`` (loaded by
  ``hub_test_config.py``, which adds ports, a temporary database and the test spawner).
* ``browser``: Playwright's Chromium from Debian (``/usr/bin/chromium``), never a downloaded browser.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hub_helpers import CHROMIUM, CHROMIUM_ARGS, SESSION_DATA_FILES, free_port

from casaspawner.local.processes import descendants

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NPM_BIN = REPO / ".cache" / "npm" / "node_modules" / ".bin"  # mk/local.mk's `chp` installs the proxy here
CLIENT_ID = "casaspawner-hub"
CLIENT_SECRET = "not-a-real-secret-" + secrets.token_hex(8)
ADMIN_TOKEN = secrets.token_hex(16)

#: The provider's users: uid/gid/groups/gids are the claims the spawner maps (``oauth_user.*``).
USERS: dict[str, dict[str, Any]] = {
    "alice": {
        "preferred_username": "alice",
        "uid": 41001,
        "gid": 41001,
        "groups": ["alma-users", "proj-m87"],
        "gids": [52001],
    },
    "bob": {"preferred_username": "bob", "uid": 41002, "gid": 41002, "groups": ["alma-users"], "gids": []},
    "olga": {
        "preferred_username": "olga",
        "uid": 41003,
        "gid": 41003,
        "groups": ["alma-users", "casa-operators"],
        "gids": [],
    },
    "eve": {"preferred_username": "eve", "uid": 41004, "gid": 41004, "groups": ["visitors"], "gids": []},
    "ada": {"preferred_username": "ada", "uid": 41005, "gid": 41005, "groups": ["hub-admins"], "gids": []},
}


@dataclass
class OIDCProvider:
    url: str
    users: dict[str, dict[str, Any]]

    def set_user(self, sub: str, claims: dict[str, Any]) -> None:
        import json

        request = urllib.request.Request(
            f"{self.url}/users/{sub}",
            data=json.dumps(claims).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 204


@pytest.fixture(scope="session")
def oidc() -> Iterator[OIDCProvider]:
    oidc_provider_mock = pytest.importorskip("oidc_provider_mock")
    from werkzeug.serving import make_server

    app = oidc_provider_mock.app()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    provider = OIDCProvider(f"http://127.0.0.1:{server.server_port}", dict(USERS))
    for sub, claims in USERS.items():  # registered through the provider's own HTTP API
        provider.set_user(sub, claims)
    try:
        yield provider
    finally:
        server.shutdown()
        thread.join(5)


@dataclass
class Hub:
    url: str
    workdir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    state_file: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def api(self, path: str, token: str, method: str = "GET", body: Any = None) -> Any:
        import json

        request = urllib.request.Request(
            f"{self.url}/hub/api{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return json.loads(raw) if raw else None

    def admin(self, path: str, method: str = "GET", body: Any = None) -> Any:
        return self.api(path, ADMIN_TOKEN, method, body)

    def stop(self) -> None:
        """Stop the hub, then whatever it started that outlived it (proxy, services, sessions)."""
        started = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        terminate(started)


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


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyterhub exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, or the proxy's 404 before the hub has added its route
            pass
        time.sleep(0.3)
    raise RuntimeError(f"jupyterhub did not answer at {url}:\n{log.read_text()[-4000:]}")


def require_tools() -> None:
    path = os.pathsep.join([str(NPM_BIN), os.environ.get("PATH", "")])
    if shutil.which("configurable-http-proxy", path=path) is None:
        pytest.skip("configurable-http-proxy is not installed (`make test` installs it)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (`make deps` installs Debian's chromium)")
    pytest.importorskip("playwright")
    pytest.importorskip("oauthenticator")
    missing = [
        str(Path(sys.prefix) / path) for path in SESSION_DATA_FILES if not (Path(sys.prefix) / path).exists()
    ]
    if missing:
        pytest.skip(f"{missing[0]} is not installed (`make hub-dev-install` links it into the venv)")


@pytest.fixture(scope="module")
def hub_factory(oidc: OIDCProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_tools()
    hubs: list[Hub] = []

    def start(**extra_env: str) -> Hub:
        workdir = tmp_path_factory.mktemp("hub")
        port, hub_port, service_port, proxy_port = free_port(), free_port(), free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        state_file = workdir / "casa-release-state.json"
        env = {
            **os.environ,
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), str(NPM_BIN), os.environ.get("PATH", "")]
            ),
            "OIDC_ISSUER": oidc.url,
            "OAUTH_CLIENT_ID": CLIENT_ID,
            "OAUTH_CLIENT_SECRET": CLIENT_SECRET,
            "OAUTH_CALLBACK_URL": f"{url}/hub/oauth_callback",
            "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
            "CASASPAWNER_RELEASE_STATE": str(state_file),
            "CASA_SESSIONS_URL": f"http://127.0.0.1:{service_port}",
            "CASA_TEST_PORT": str(port),
            "CASA_TEST_HUB_PORT": str(hub_port),
            "CASA_TEST_PROXY_PORT": str(proxy_port),
            "CASA_TEST_WORKDIR": str(workdir),
            "CASA_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
            "CASA_NOTICES_INTERVAL": "1",
            **extra_env,
        }
        log_path = workdir / "jupyterhub.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(HERE / "hub_test_config.py")],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        hub = Hub(url, workdir, process, log_path, state_file, env)
        hubs.append(hub)
        _wait_for(f"{url}/hub/health", process, log_path)
        return hub

    try:
        yield start
    finally:
        for hub in hubs:
            hub.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_tools()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()

"""Fixtures for the hub tests: a real OIDC provider, a real JupyterHub process and headless
Chromium, all on 127.0.0.1.

* ``oidc``: oidc-provider-mock (a real OpenID Connect provider) in a thread, with the test users'
  claims.
* ``hub_factory``: starts ``jupyterhub`` as a subprocess (``support.hub.Hub``) with
  ``tests/hub/jupyterhub_config.py``, which loads ``hub-config/jupyterhub_config.py`` and adds
  ports, a temporary database and the test spawner.
* ``browser``: Playwright's Chromium from Debian (``/usr/bin/chromium``), never a downloaded
  browser.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import NPM_BIN
from support.browser import CHROMIUM, chromium
from support.hub import SESSION_DATA_FILES, Hub

from casaspawner.net import free_port

HERE = Path(__file__).resolve().parent
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
    "bob": {
        "preferred_username": "bob",
        "uid": 41002,
        "gid": 41002,
        "groups": ["alma-users"],
        "gids": [],
    },
    "olga": {
        "preferred_username": "olga",
        "uid": 41003,
        "gid": 41003,
        "groups": ["alma-users", "casa-operators"],
        "gids": [],
    },
    "eve": {
        "preferred_username": "eve",
        "uid": 41004,
        "gid": 41004,
        "groups": ["visitors"],
        "gids": [],
    },
    "ada": {
        "preferred_username": "ada",
        "uid": 41005,
        "gid": 41005,
        "groups": ["hub-admins"],
        "gids": [],
    },
}


@dataclass
class OIDCProvider:
    url: str
    users: dict[str, dict[str, Any]]

    def set_user(self, sub: str, claims: dict[str, Any]) -> None:
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
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    )
    thread.start()
    provider = OIDCProvider(f"http://127.0.0.1:{server.server_port}", dict(USERS))
    for sub, claims in USERS.items():
        # Registered through the provider's own HTTP API.
        provider.set_user(sub, claims)
    try:
        yield provider
    finally:
        server.shutdown()
        thread.join(5)


def require_tools() -> None:
    path = os.pathsep.join([str(NPM_BIN), os.environ.get("PATH", "")])
    if shutil.which("configurable-http-proxy", path=path) is None:
        pytest.skip("configurable-http-proxy is not installed (`make test` installs it)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (`make deps` installs Debian's chromium)")
    pytest.importorskip("playwright")
    pytest.importorskip("oauthenticator")
    missing = [
        str(Path(sys.prefix) / path)
        for path in SESSION_DATA_FILES
        if not (Path(sys.prefix) / path).exists()
    ]
    if missing:
        pytest.skip(
            f"{missing[0]} is not installed (`make hub-dev-install` links it into the venv)"
        )


@pytest.fixture(scope="module")
def hub_factory(
    oidc: OIDCProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Hub]]:
    """Start hubs on tests/hub/jupyterhub_config.py (and ``extra_env``); all stop at the end."""
    require_tools()
    hubs: list[Hub] = []

    def start(**extra_env: str) -> Hub:
        workdir = tmp_path_factory.mktemp("hub")
        # The proxy, the hub, the casa-sessions service and the proxy's API.
        port = free_port(count=4)
        url = f"http://127.0.0.1:{port}"
        path = [str(Path(sys.executable).parent), str(NPM_BIN), os.environ.get("PATH", "")]
        env = {
            **os.environ,
            "PATH": os.pathsep.join(path),
            "OIDC_ISSUER": oidc.url,
            "OAUTH_CLIENT_ID": CLIENT_ID,
            "OAUTH_CLIENT_SECRET": CLIENT_SECRET,
            "OAUTH_CALLBACK_URL": f"{url}/hub/oauth_callback",
            "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
            "CASASPAWNER_RELEASE_STATE": str(workdir / "casa-release-state.json"),
            "CASA_SESSIONS_URL": f"http://127.0.0.1:{port + 2}",
            "CASA_TEST_PORT": str(port),
            "CASA_TEST_HUB_PORT": str(port + 1),
            "CASA_TEST_PROXY_PORT": str(port + 3),
            "CASA_TEST_WORKDIR": str(workdir),
            "CASA_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
            "CASA_NOTICES_INTERVAL": "1",
            **extra_env,
        }
        hub = Hub(HERE / "jupyterhub_config.py", workdir, env, port, token=ADMIN_TOKEN)
        hubs.append(hub)
        hub.start()
        return hub

    try:
        yield start
    finally:
        for hub in hubs:
            hub.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_tools()
    with chromium() as browser:
        yield browser

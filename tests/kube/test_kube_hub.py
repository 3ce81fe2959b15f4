"""A real JupyterHub process with ``spawner_class = "casa"`` against kmock: form → pod →
progress → admin → hub restart (a new process on the same database keeps and polls the running
server) → stop.

The hub runs as a subprocess (its own configurable-http-proxy, SQLite, an authenticator that puts
a uid and a token in ``auth_state``); the test process runs the Kubernetes emulator, the fake
kubelet, and a stand-in for the session's HTTP server on the pod's port, all on 127.0.0.1. The
hub starts once for the module, and its tests run in order: each goes on from where the one
before left the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import stat
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support import CHP
from support.datasets import dataset_in
from support.hub import Hub

from casaspawner.insession.access_token import TokenRefused, fetch_into, fetch_token
from casaspawner.net import free_port

pytest.importorskip("kubespawner", reason="the hub's spawner is CASASpawner (the hub extra)")

import aiohttp
from support.kube import FakeKubelet, emulated_cluster, session_stand_in, stored

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not CHP.exists(), reason="configurable-http-proxy missing: run `make chp`"),
]

HUB_CONFIG = """
from jupyterhub.auth import DummyAuthenticator

class LoginWithUid(DummyAuthenticator):
    async def authenticate(self, handler, data):
        name = data["username"]
        return {{
            "name": name,
            "auth_state": {{
                "oauth_user": {{"uid": 1001, "gid": 1001, "groups": ["proja"]}},
                "access_token": "tok-HUB-77",
            }},
        }}

c.JupyterHub.authenticator_class = LoginWithUid
c.Authenticator.enable_auth_state = True
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "casa"
# Where sessions fetch the user's access token (casaspawner.hubconfig adds it too).
from casaspawner.services.access_token import token_handlers
c.JupyterHub.extra_handlers = token_handlers()
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = "sqlite:///{tmp}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{tmp}/cookie_secret"
# A hub restart leaves sessions running, as in z2jh.
c.JupyterHub.cleanup_servers = False
c.ConfigurableHTTPProxy.command = ["{chp}"]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.services = [{{"name": "test", "api_token": "{token}"}}]
c.JupyterHub.load_roles = [
    {{"name": "tester", "scopes": ["admin:users", "admin:servers"], "services": ["test"]}}
]
c.CASASpawner.namespace = "test"
c.CASASpawner.port = {session_port}
c.CASASpawner.storage_hub_path = "{storage}"
c.CASASpawner.start_timeout = 30
c.CASASpawner.http_timeout = 30
c.CASASpawner.k8s_api_request_retry_timeout = 10
c.CASASpawner.extra_labels = {{"hub.jupyter.org/network-access-hub": "true"}}
c.CASASpawner.blocked_releases = ["pl-2022.2.0.64"]
"""


def hub_pod_lists(emulator) -> list:
    """Lists of session pods by a hub's pod reflector (not by the fake kubelet)."""
    return [
        r
        for r in emulator
        if r.url.path == "/api/v1/namespaces/test/pods"
        and r.params.get("labelSelector") == "component=singleuser-server"
        and "watch" not in r.params
    ]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """The emulator and the fake kubelet, for the module; and the directory the hub runs in."""
    workdir = tmp_path_factory.mktemp("kube-hub")
    async with (
        emulated_cluster(workdir / "kubeconfig") as (emulator, server),
        FakeKubelet(server, pull_seconds=2).running() as kubelet,
    ):
        yield emulator, kubelet, workdir


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def hub(cluster, storage: Path) -> AsyncIterator[Hub]:
    """The hub, with the test service's token; the session's server answers on the pod's port."""
    _emulator, _kubelet, workdir = cluster
    port = free_port(count=3)
    async with session_stand_in() as session_port:
        config = workdir / "jupyterhub_config.py"
        token = secrets.token_hex(16)
        settings = textwrap.dedent(HUB_CONFIG).format(
            port=port,
            hub_port=port + 1,
            proxy_api_port=port + 2,
            tmp=workdir,
            chp=CHP,
            token=token,
            session_port=session_port,
            storage=storage,
        )
        config.write_text(settings)
        env = {
            **os.environ,
            "KUBECONFIG": str(workdir / "kubeconfig"),
            "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
        }
        hub = Hub(config, workdir, env, port, token=token)
        # In a thread: the emulator answers the hub from this loop.
        await asyncio.to_thread(hub.start)
        try:
            yield hub
        finally:
            await asyncio.to_thread(hub.stop)


class Browser:
    """alice's browser on the hub (its cookies and XSRF token), and the hub's API as the test
    service."""

    def __init__(self, hub: Hub, client: aiohttp.ClientSession) -> None:
        self.hub, self.client = hub, client
        self.api = {"Authorization": f"token {hub.token}"}

    def xsrf(self) -> str:
        return next(c.value for c in self.client.cookie_jar if c.key == "_xsrf")

    async def spawn(self, dataset: str, **fields: str) -> list[str]:
        """Submit the form, then read the progress stream like the spawn-pending page does."""
        form = {"dataset": dataset, **fields, "_xsrf": self.xsrf()}
        url = f"{self.hub.url}/hub/spawn"
        async with self.client.post(url, data=form, allow_redirects=False) as response:
            # Failed within the hub's first second: the form again.
            if response.status == 400:
                page = await response.text()
                return [m.strip() for m in re.findall(r"Spawn failed:([^<]*)<", page)] or [page]
            location = response.headers["Location"]
            assert location.endswith("/hub/spawn-pending/alice"), response.headers
        messages = []
        url = f"{self.hub.url}/hub/api/users/alice/server/progress"
        timeout = aiohttp.ClientTimeout(total=60)
        async with self.client.get(url, headers=self.api, timeout=timeout) as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    messages.append(event["message"])
                    if event.get("ready") or event.get("failed"):
                        break
        return messages

    async def model(self) -> dict[str, Any]:
        """alice's user model, from the hub's API."""
        url = f"{self.hub.url}/hub/api/users/alice"
        async with self.client.get(url, headers=self.api) as response:
            return await response.json()  # type: ignore[no-any-return]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def alice(hub: Hub) -> AsyncIterator[Browser]:
    """alice, logged in through the hub's login form."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        browser = Browser(hub, client)
        async with client.get(f"{hub.url}/hub/login") as response:
            assert response.status == 200
        login = {"username": "alice", "password": "x", "_xsrf": browser.xsrf()}
        async with client.post(f"{hub.url}/hub/login", data=login) as response:
            assert response.status == 200
        yield browser


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def spawned(alice: Browser, storage: Path) -> list[str]:
    """alice's desktop session on the Cycle 10 dataset, spawned through the form: its progress."""
    dataset = dataset_in(storage, "alice", "cycle10")
    return await alice.spawn(dataset, interface="desktop", size="small")


async def test_the_spawn_form_is_casaspawners_inside_the_hubs_page(hub, alice):
    async with alice.client.get(f"{hub.url}/hub/spawn") as response:
        page = await response.text()
    for field in ('name="dataset"', 'name="interface"', 'name="size"', 'name="release"'):
        assert field in page


async def test_a_drained_release_is_refused_before_anything_exists_in_kubernetes(
    cluster, alice, storage
):
    emulator, _kubelet, _workdir = cluster
    project = next((storage / "projects" / "proja" / "shared").glob("*/*/*/member.*"))
    relative = project.relative_to(storage / "projects" / "proja")
    messages = await alice.spawn(f"/arc/projects/proja/{relative}")
    drained = "CASA 6.4.1-12 (pipeline 2022.2.0.64) cannot be started right now"
    assert drained in messages[-1], messages
    assert stored(emulator, "pods") == {}


async def test_the_progress_tells_the_build_then_the_pull_then_ready(cluster, spawned):
    _emulator, kubelet, _workdir = cluster
    messages = spawned
    assert not kubelet.errors, kubelet.errors
    assert messages[0] == "Server requested", messages
    exact = "CASA 6.5.4-9 (pipeline 2023.1.0.124), the exact build."
    assert messages[1].endswith(exact), messages
    assert any(m.startswith("Pulling the session image") for m in messages)
    assert messages[-1].startswith("Server ready at"), messages


async def test_the_admin_model_carries_the_sessions_summary(alice, spawned):
    options = (await alice.model())["servers"][""]["user_options"]
    profile = "CASA 6.5.4-9 (pipeline 2023.1.0.124) · CASA desktop · "
    assert options["profile"].startswith(profile)
    output = options["casaspawner"]
    assert (output["casa_version"], output["interface"], output["size"]) == (
        "6.5.4-9",
        "desktop",
        "small",
    )


async def test_the_pod_runs_as_the_user_and_never_holds_the_token(cluster, spawned):
    emulator, kubelet, _workdir = cluster
    (pod,) = kubelet.pods
    assert pod["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"
    assert pod["spec"]["securityContext"]["runAsUser"] == 1001
    assert "tok-HUB-77" not in json.dumps(pod)
    assert stored(emulator, "secrets") == {}


async def test_the_session_fetches_its_token_from_the_hub_once(cluster, alice, spawned, tmp_path):
    """The session's own extension code, from the pod's address (the fake kubelet's 127.0.0.1),
    with the pod's own variables, against the real hub's API."""
    _emulator, kubelet, _workdir = cluster
    (pod,) = kubelet.pods
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    url, api_token = env["CASASPAWNER_TOKEN_URL"], env["JUPYTERHUB_API_TOKEN"]
    assert url.endswith("/hub/api/casa-token/alice/")
    log = logging.getLogger("session")
    # alice's own token may access her server, but is not the server's.
    tokens = f"{alice.hub.url}/hub/api/users/alice/tokens"
    body = {"note": "alice's own", "scopes": ["access:servers!user"]}
    xsrf = {"X-XSRFToken": alice.xsrf()}
    async with alice.client.post(tokens, headers=xsrf, json=body) as response:
        assert response.status == 201, await response.text()
        own = (await response.json())["token"]
    with pytest.raises(TokenRefused, match="Only the session's own server may fetch"):
        await fetch_token(url, own)
    # The server's own token from another address, even one claiming the pod's in headers the
    # hub would believe for remote_ip (it runs with xheaders).
    spoof = {"X-Real-Ip": "127.0.0.1", "X-Forwarded-For": "127.0.0.1"}
    headers = {"Authorization": f"token {api_token}", **spoof}
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with (
        aiohttp.ClientSession(connector=elsewhere) as client,
        client.post(url, headers=headers, json={}) as response,
    ):
        assert (response.status, (await response.json())["message"]) == (
            403,
            "Only the session's own pod may fetch its access token.",
        )
    path = tmp_path / "token"
    assert await fetch_into(path, url, api_token, log)
    assert path.read_text() == "tok-HUB-77"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(TokenRefused, match="This session fetched its access token already."):
        await fetch_token(url, api_token)


async def test_a_restarted_hub_keeps_polls_and_routes_the_running_session(
    cluster, hub, alice, spawned
):
    """A new process on the same database; the session pod keeps running."""
    emulator, kubelet, _workdir = cluster
    (pod,) = kubelet.pods
    await asyncio.to_thread(hub.stop)
    pod_lists = len(hub_pod_lists(emulator))
    await asyncio.to_thread(hub.start)
    # The new hub asked Kubernetes about the pod.
    assert len(hub_pod_lists(emulator)) > pod_lists
    server = (await alice.model())["servers"][""]
    assert server["ready"] and server["user_options"]["casaspawner"]["casa_version"] == "6.5.4-9"
    uids = [p["metadata"]["uid"] for p in stored(emulator, "pods").values()]
    assert uids == [pod["metadata"]["uid"]]
    # Routed again by the new proxy.
    async with alice.client.get(f"{hub.url}/user/alice/api/status") as response:
        assert (response.status, (await response.json())["version"]) == (200, "stand-in")


async def test_stopping_the_server_deletes_the_pod(cluster, hub, alice, spawned):
    emulator, _kubelet, _workdir = cluster
    url = f"{hub.url}/hub/api/users/alice/server"
    async with alice.client.delete(url, headers=alice.api) as response:
        assert response.status in (202, 204)
    for _ in range(100):
        if "jupyter-alice" not in stored(emulator, "pods"):
            break
        await asyncio.sleep(0.1)
    assert "jupyter-alice" not in stored(emulator, "pods")


async def test_the_token_never_reaches_the_hubs_log(hub, spawned):
    assert "tok-HUB-77" not in hub.log()

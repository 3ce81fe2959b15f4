"""A real JupyterHub process with ``spawner_class = "casa"`` against kmock: form → pod → progress → admin →
hub restart (a new process on the same database keeps and polls the running server) → stop.

The hub runs as a subprocess (its own configurable-http-proxy, SQLite, an authenticator that puts a uid and a
token in ``auth_state``); the test process runs the Kubernetes emulator, the fake kubelet, and a stand-in for the
session's HTTP server on the pod's port, all on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import dataset_in
from kube_support import FakeKubelet, stored

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CHP = REPO / ".cache" / "npm" / "node_modules" / ".bin" / "configurable-http-proxy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = "sqlite:///{tmp}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{tmp}/cookie_secret"
c.JupyterHub.cleanup_servers = False  # a hub restart leaves sessions running, as in z2jh
c.ConfigurableHTTPProxy.command = ["{chp}"]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.services = [{{"name": "test", "api_token": "{token}"}}]
c.JupyterHub.load_roles = [{{"name": "tester", "scopes": ["admin:users", "admin:servers"], "services": ["test"]}}]
c.CASASpawner.namespace = "test"
c.CASASpawner.port = {session_port}
c.CASASpawner.storage_hub_path = "{storage}"
c.CASASpawner.start_timeout = 30
c.CASASpawner.http_timeout = 30
c.CASASpawner.k8s_api_request_retry_timeout = 10
c.CASASpawner.extra_labels = {{"hub.jupyter.org/network-access-hub": "true"}}
c.CASASpawner.blocked_releases = ["pl-2022.2.0.64"]
"""


@pytest_asyncio.fixture(loop_scope="function")
async def session_stand_in():
    """Answers on the pod's port like a single-user server would (the hub only checks that it answers)."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"version": "stand-in"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield port
    await runner.cleanup()


def hub_pod_lists(emulator) -> list:
    """Lists of session pods by a hub's pod reflector (not by the fake kubelet)."""
    return [
        r
        for r in emulator
        if r.url.path == "/api/v1/namespaces/test/pods"
        and r.params.get("labelSelector") == "component=singleuser-server"
        and "watch" not in r.params
    ]


async def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as client:
        while loop.time() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"the hub exited:\n{log.read_text()[-3000:]}")
            try:
                async with client.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"the hub did not answer at {url}:\n{log.read_text()[-3000:]}")


@pytest.mark.skipif(not CHP.exists(), reason="configurable-http-proxy missing: run `make chp`")
async def test_real_hub_spawns_casa_pod(cluster, storage, session_stand_in, tmp_path):
    emulator, server = cluster
    port, token = free_port(), secrets.token_hex(16)
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        textwrap.dedent(HUB_CONFIG).format(
            port=port,
            hub_port=free_port(),
            proxy_api_port=free_port(),
            tmp=tmp_path,
            chp=CHP,
            token=token,
            session_port=session_stand_in,
            storage=storage,
        )
    )
    env = {
        **os.environ,
        "KUBECONFIG": str(tmp_path / "kubeconfig"),  # written by the cluster fixture
        "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
    }
    log = tmp_path / "hub.log"

    def start_hub() -> subprocess.Popen:
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(config)],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=out,
            )

    hub = start_hub()
    base = f"http://127.0.0.1:{port}"
    api = {"Authorization": f"token {token}"}
    try:
        await wait_for(f"{base}/hub/api/", hub, log)
        jar = aiohttp.CookieJar(unsafe=True)
        async with (
            aiohttp.ClientSession(cookie_jar=jar) as client,
            FakeKubelet(server, pull_seconds=2).running() as kubelet,
        ):

            async def xsrf() -> str:
                return next(c.value for c in jar if c.key == "_xsrf")

            async with client.get(f"{base}/hub/login") as response:
                assert response.status == 200
            login = {"username": "alice", "password": "x", "_xsrf": await xsrf()}
            async with client.post(f"{base}/hub/login", data=login) as response:
                assert response.status == 200

            # the form: our fields, rendered inside the hub's own page
            async with client.get(f"{base}/hub/spawn") as response:
                page = await response.text()
            for field in ('name="dataset"', 'name="interface"', 'name="size"', 'name="release"'):
                assert field in page

            async def spawn(dataset: str, **fields: str) -> list[str]:
                """Submit the form, then read the progress stream like the spawn-pending page does."""
                form = {"dataset": dataset, **fields, "_xsrf": await xsrf()}
                async with client.post(f"{base}/hub/spawn", data=form, allow_redirects=False) as response:
                    if response.status == 400:  # failed within the hub's first second: the form again
                        page = await response.text()
                        return [m.strip() for m in re.findall(r"Spawn failed:([^<]*)<", page)] or [page]
                    assert response.headers["Location"].endswith("/hub/spawn-pending/alice"), response.headers
                messages = []
                url = f"{base}/hub/api/users/alice/server/progress"
                async with client.get(url, headers=api, timeout=aiohttp.ClientTimeout(total=60)) as response:
                    async for line in response.content:
                        if line.startswith(b"data:"):
                            event = json.loads(line[5:])
                            messages.append(event["message"])
                            if event.get("ready") or event.get("failed"):
                                break
                return messages

            # a drained release: refused with the operators' sentence, nothing created in Kubernetes
            project = next((storage / "projects" / "proja" / "shared").glob("*/*/*/member.*"))
            relative = project.relative_to(storage / "projects" / "proja")
            messages = await spawn(f"/arc/projects/proja/{relative}")
            assert "CASA 6.4.1-12 (pipeline 2022.2.0.64) cannot be started right now" in messages[-1], (
                messages
            )
            assert stored(emulator, "pods") == {}

            messages = await spawn(dataset_in(storage, "alice", "cycle10"), interface="desktop", size="small")
            assert not kubelet.errors, kubelet.errors
            assert messages[0] == "Server requested", messages
            assert messages[1].endswith("CASA 6.5.4-9 (pipeline 2023.1.0.124), the exact build."), messages
            assert any(m.startswith("Pulling the session image") for m in messages)
            assert messages[-1].startswith("Server ready at"), messages

            async with client.get(f"{base}/hub/api/users/alice", headers=api) as response:
                model = await response.json()
            options = model["servers"][""]["user_options"]
            assert options["profile"].startswith("CASA 6.5.4-9 (pipeline 2023.1.0.124) · CASA desktop · ")
            output = options["casaspawner"]
            assert (output["casa_version"], output["interface"], output["size"]) == (
                "6.5.4-9",
                "desktop",
                "small",
            )

            (pod,) = kubelet.pods
            assert pod["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"
            assert pod["spec"]["securityContext"]["runAsUser"] == 1001
            assert "tok-HUB-77" not in json.dumps(pod)
            assert "jupyter-alice-token" in stored(emulator, "secrets")

            # the hub restarts: a new process, the same database; the session pod keeps running
            hub.terminate()
            hub.wait(30)
            pod_lists = len(hub_pod_lists(emulator))
            hub = start_hub()
            await wait_for(f"{base}/hub/api/", hub, log)
            assert len(hub_pod_lists(emulator)) > pod_lists  # the new hub asked Kubernetes about the pod
            async with client.get(f"{base}/hub/api/users/alice", headers=api) as response:
                server = (await response.json())["servers"][""]
            assert server["ready"] and server["user_options"]["casaspawner"]["casa_version"] == "6.5.4-9"
            assert [p["metadata"]["uid"] for p in stored(emulator, "pods").values()] == [
                pod["metadata"]["uid"]
            ]
            async with client.get(
                f"{base}/user/alice/api/status"
            ) as response:  # routed again by the new proxy
                assert (response.status, (await response.json())["version"]) == (200, "stand-in")

            async with client.delete(f"{base}/hub/api/users/alice/server", headers=api) as response:
                assert response.status in (202, 204)
            for _ in range(100):
                if "jupyter-alice" not in stored(emulator, "pods"):
                    break
                await asyncio.sleep(0.1)
            assert "jupyter-alice" not in stored(emulator, "pods")
        assert "tok-HUB-77" not in log.read_text()
    finally:
        hub.terminate()
        try:
            hub.wait(15)
        except subprocess.TimeoutExpired:
            hub.kill()

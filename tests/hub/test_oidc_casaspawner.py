"""End to end with the real Kubernetes spawner: OIDC login in Chromium → auth_state → CASASpawner in the hub
(hub-config/jupyterhub_config.py, spawner "casa") → a pod in a kmock cluster. The uid, gid and groups of the
provider's claims run the pod; the access token is only in the pod's Secret — not in the pod, not in the log."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import pytest
from hub_helpers import CHROMIUM, CHROMIUM_ARGS, free_port

from casaspawner.datasets.synth import write_dataset

pytestmark = pytest.mark.integration
KUBE_TESTS = Path(__file__).resolve().parents[1] / "kube"


async def test_oidc_login_to_casaspawner_pod(hub_factory, oidc, tmp_path):
    kmock = pytest.importorskip("kmock")
    pytest.importorskip("kubespawner")
    from aiohttp import web
    from playwright.async_api import async_playwright

    sys.path.insert(0, str(KUBE_TESTS))
    try:
        from kube_support import Emulator, FakeKubelet, kubeconfig_for, stored
    finally:
        sys.path.remove(str(KUBE_TESTS))

    storage = tmp_path / "cavern"
    write_dataset(storage / "home" / "alice" / "data", "cycle10")
    member = next((storage / "home" / "alice" / "data").glob("*/science_goal.*/group.*/member.*"))
    dataset = str(member.relative_to(storage / "home" / "alice"))

    async def answer(request: web.Request) -> web.Response:  # the session's server, as the hub sees it
        return web.json_response({"version": "stand-in"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    session_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", session_port).start()

    async with Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        kubeconfig = kubeconfig_for(tmp_path / "kubeconfig", str(server.url).rstrip("/"))
        hub = await asyncio.to_thread(
            hub_factory,
            CASA_TEST_SPAWNER="casa",
            CASASPAWNER_SPAWNER="casa",
            KUBECONFIG=str(kubeconfig),
            CASA_TEST_SESSION_PORT=str(session_port),
            CASA_TEST_STORAGE=str(storage),
        )
        async with FakeKubelet(server).running() as kubelet, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            page.set_default_timeout(30_000)
            await page.goto(f"{hub.url}/hub/login")
            await page.locator("a[href*='oauth_login']").click()
            await page.wait_for_url("**/oauth2/authorize**")
            await page.get_by_placeholder("sub").fill("alice")
            await page.get_by_role("button", name="Authorize").click()
            await page.wait_for_url("**/hub/spawn")
            await page.locator("input[name=dataset]").fill(dataset)
            await page.locator(
                "form#spawn_form input[type=submit], form#spawn_form button[type=submit]"
            ).first.click()
            await page.wait_for_url("**/user/alice/**", timeout=60_000)
            await browser.close()

        model = await asyncio.to_thread(hub.admin, "/users/alice")
        token = model["auth_state"]["access_token"]
        (pod,) = kubelet.pods
        secrets = stored(emulator, "secrets")
        await asyncio.to_thread(hub.admin, "/users/alice/server", "DELETE")
        await asyncio.to_thread(hub.stop)  # before the cluster goes: the hub's watches would hold it open
    await runner.cleanup()

    assert model["servers"][""]["user_options"]["profile"].startswith("CASA 6.5.4-9 (pipeline 2023.1.0.124)")
    context = pod["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (41001, 41001)  # the provider's claims
    assert 52001 in context["supplementalGroups"]
    assert pod["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "notebook")
    assert any(m["mountPath"] == "/arc/projects/proj-m87" for m in container["volumeMounts"])
    assert token not in json.dumps(pod)
    (secret,) = (s for name, s in secrets.items() if name.endswith("-token"))
    assert base64.b64decode(secret["data"]["token"]).decode() == token
    assert token not in hub.log()

"""End to end with the real Kubernetes spawner: OIDC login in Chromium → auth_state →
CASASpawner in the hub (hub-config/jupyterhub_config.py, spawner "casa") → a pod in a kmock
cluster. The uid, gid and groups of the provider's claims run the pod; the access token reaches
the session only when it fetches it from the hub (from the pod's address, the fake kubelet's
127.0.0.1): not in the pod, not in a Secret, not in the log."""

from __future__ import annotations

import asyncio
import json

import pytest
from support.browser import CHROMIUM, CHROMIUM_ARGS
from support.datasets import dataset_in

from casaspawner.datasets.synth import write_dataset
from casaspawner.insession.access_token import fetch_token

pytestmark = pytest.mark.integration


async def test_oidc_login_to_casaspawner_pod(hub_factory, oidc, tmp_path):
    pytest.importorskip("kmock")
    pytest.importorskip("kubespawner")
    from playwright.async_api import async_playwright
    from support.kube import FakeKubelet, emulated_cluster, session_stand_in, stored

    storage = tmp_path / "cavern"
    write_dataset(storage / "home" / "alice" / "data" / "cycle10", "cycle10")
    dataset = dataset_in(storage, "alice", "cycle10")
    kubeconfig = tmp_path / "kubeconfig"

    async with (
        session_stand_in() as session_port,
        emulated_cluster(kubeconfig) as (emulator, server),
    ):
        hub = await asyncio.to_thread(
            hub_factory,
            CASA_TEST_SPAWNER="casa",
            CASASPAWNER_SPAWNER="casa",
            KUBECONFIG=str(kubeconfig),
            CASA_TEST_SESSION_PORT=str(session_port),
            CASA_TEST_STORAGE=str(storage),
        )
        async with FakeKubelet(server).running() as kubelet, async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS
            )
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

        model = await asyncio.to_thread(hub.api, "GET", "/hub/api/users/alice")
        token = model["auth_state"]["access_token"]
        (pod,) = kubelet.pods
        secrets = stored(emulator, "secrets")
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        fetched = await fetch_token(env["CASASPAWNER_TOKEN_URL"], env["JUPYTERHUB_API_TOKEN"])
        await asyncio.to_thread(hub.api, "DELETE", "/hub/api/users/alice/server")
        # Before the cluster goes: the hub's watches would hold it open.
        await asyncio.to_thread(hub.stop)

    assert model["servers"][""]["user_options"]["profile"].startswith(
        "CASA 6.5.4-9 (pipeline 2023.1.0.124)"
    )
    context = pod["spec"]["securityContext"]
    # The provider's claims.
    assert (context["runAsUser"], context["runAsGroup"]) == (41001, 41001)
    assert 52001 in context["supplementalGroups"]
    assert pod["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "notebook")
    assert any(m["mountPath"] == "/arc/projects/proj-m87" for m in container["volumeMounts"])
    assert token not in json.dumps(pod)
    assert secrets == {} and fetched == token
    assert token not in hub.log()

"""The spawn's lean Kubernetes client: same configuration, no per-request environment lookups."""

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes_asyncio", reason="the client is kubernetes_asyncio's (hub extra)")

from kubernetes_asyncio import client

from casaspawner.kube import api
from casaspawner.net import free_port


def core_api(host: str) -> client.CoreV1Api:
    configuration = client.Configuration(host=host)
    return client.CoreV1Api(client.ApiClient(configuration=configuration))


async def test_the_lean_client_keeps_the_configuration_and_trusts_no_environment(monkeypatch):
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    like = core_api("https://api.cluster.test:6443")
    lean = api.lean_core_api(like)
    assert lean.api_client.configuration is like.api_client.configuration
    assert lean.api_client.rest_client.pool_manager.trust_env is False
    assert like.api_client.rest_client.pool_manager.trust_env is True
    assert lean.api_client.rest_client.proxy is None
    # One per loop and configuration.
    assert api.lean_core_api(like) is lean
    assert api.lean_core_api(core_api("https://api.cluster.test:6443")) is not lean
    await like.api_client.close()


async def test_the_environments_proxy_for_the_api_server_is_looked_up_once(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://user:secret@proxy.cluster.test:3128")
    monkeypatch.setenv("NO_PROXY", "other.cluster.test")
    monkeypatch.setenv("no_proxy", "other.cluster.test")
    lean = api.lean_core_api(core_api("https://api.cluster.test:6443"))
    rest = lean.api_client.rest_client
    assert rest.proxy == "http://proxy.cluster.test:3128"
    assert rest.proxy_headers == {"Proxy-Authorization": "Basic dXNlcjpzZWNyZXQ="}
    # NO_PROXY is honoured as aiohttp honours it.
    monkeypatch.setenv("NO_PROXY", "api.cluster.test")
    monkeypatch.setenv("no_proxy", "api.cluster.test")
    assert (
        api.lean_core_api(core_api("https://api.cluster.test:6443")).api_client.rest_client.proxy
        is None
    )


async def test_a_manifest_is_sent_as_it_is_and_other_bodies_are_walked():
    from aiohttp import web

    received: list[object] = []

    async def create(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"kind": "Pod"}, status=201)

    app = web.Application()
    app.router.add_post("/api/v1/namespaces/{namespace}/pods", create)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    like = core_api(f"http://127.0.0.1:{port}")
    try:
        lean = api.lean_core_api(like)
        pod = {"metadata": {"name": "jupyter-ada"}, "spec": {"containers": [{"name": "c"}]}}
        manifest = api.Manifest(pod)
        # The hook's manifest goes out as it is; anything else is walked into new JSON data.
        assert lean.api_client.sanitize_for_serialization(manifest) is manifest
        plain = dict(pod)
        assert lean.api_client.sanitize_for_serialization(plain) is not plain
        model = client.V1Pod(metadata=client.V1ObjectMeta(name="jupyter-bob"))
        assert lean.api_client.sanitize_for_serialization(model) == {
            "metadata": {"name": "jupyter-bob"}
        }
        await api.send(lean.create_namespaced_pod, "test", manifest, timeout=10)
        assert received == [pod]
    finally:
        await like.api_client.close()
        await runner.cleanup()

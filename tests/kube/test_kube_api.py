"""The spawn's lean Kubernetes client: same configuration, no per-request environment lookups."""

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes_asyncio", reason="the client is kubernetes_asyncio's (hub extra)")

from kubernetes_asyncio import client

from casaspawner.kube import api


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

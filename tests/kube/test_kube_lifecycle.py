"""The real KubeSpawner start → poll → stop lifecycle against kmock on 127.0.0.1 (emulator + fake kubelet)."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from conftest import dataset_in
from kube_support import FakeKubelet, stored
from kubernetes_asyncio.client.rest import ApiException

from casaspawner.spawners.common import SpawnException

TIMEOUTS = {"start_timeout": 15, "k8s_api_request_retry_timeout": 5}


async def start_collecting_progress(spawner) -> tuple[str, list[str]]:
    """Start as the hub does (apply_user_options, then start) while reading progress like the spawn page."""
    await spawner._run_apply_user_options(spawner.user_options)
    future = spawner.start()
    messages = [event["message"] async for event in spawner.progress()]
    return await asyncio.wait_for(future, 20), messages


async def test_start_poll_stop_with_token_secret(cluster, make_spawner, storage):
    emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10"), "interface": "desktop"}
    async with FakeKubelet(server).running() as kubelet:
        url, messages = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        assert await spawner.poll() is None

        (pod,) = kubelet.pods
        assert (
            pod["spec"]["containers"][0]["image"] == "ghcr.io/casaspawner/casa:6.5.4-9-pipeline-2023.1.0.124"
        )
        assert pod["metadata"]["labels"]["casaspawner.io/interface"] == "desktop"
        assert "tok-SECRET-42" not in str(pod)
        secret = stored(emulator, "secrets")["jupyter-alice-token"]
        assert base64.b64decode(secret["data"]["token"]) == b"tok-SECRET-42"
        owner = secret["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "Pod",
            "jupyter-alice",
            pod["metadata"]["uid"],
        )

        # progress: resolution result and reason first, then image pull, then container start
        assert messages[0].startswith("Dataset data/cycle10/") and messages[0].endswith(
            "CASA 6.5.4-9 (pipeline 2023.1.0.124), the exact build."
        )
        assert messages[1].startswith("The pipeline manifest names pipeline 2023.1.0.124")
        pulling = next(i for i, m in enumerate(messages) if m.startswith("Pulling the session image"))
        started = next(i for i, m in enumerate(messages) if m.startswith("The session container started"))
        assert 1 < pulling < started

        await spawner.stop(now=True)
        assert await spawner.poll() == 1
        assert "jupyter-alice" not in stored(emulator, "pods")


async def test_image_pull_failure_ends_spawn_with_one_sentence(cluster, make_spawner, storage):
    _emulator, server = cluster
    spawner = make_spawner(start_timeout=30, k8s_api_request_retry_timeout=5)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle7")}
    image = "ghcr.io/casaspawner/casa:6.1.1-15-pipeline-2020.1.0.40"
    async with FakeKubelet(server, mode="errimagepull").running():
        began = time.perf_counter()
        with pytest.raises(SpawnException) as info:
            await start_collecting_progress(spawner)
        assert time.perf_counter() - began < 10  # ended by the event, not by start_timeout
        assert info.value.jupyterhub_message == (
            f'The session image {image} could not be pulled (Failed to pull image "{image}": {image} not found).'
        )
        await spawner.stop(now=True)  # what the hub does after a failed start
        assert await spawner.poll() == 1


async def test_unschedulable_pod_ends_spawn(cluster, make_spawner, storage):
    _emulator, server = cluster
    spawner = make_spawner(start_timeout=30, k8s_api_request_retry_timeout=5)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10"), "size": "large"}
    async with FakeKubelet(server, mode="unschedulable").running():
        with pytest.raises(SpawnException) as info:
            await start_collecting_progress(spawner)
        assert info.value.jupyterhub_message == (
            "No node can run this session: 0/3 nodes are available: 3 Insufficient memory."
        )
        await spawner.stop(now=True)


async def test_api_500s_are_retried(cluster, make_spawner, storage):
    emulator, server = cluster
    emulator["list /api/v1/namespaces/test/pods"][:1] << 500
    emulator["list /api/v1/namespaces/test/events"][:1] << 500
    emulator["post /api/v1/namespaces/test/secrets"][:1] << 500
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server).running():
        url, _ = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        # the failed create had stored the Secret (as a real API server may): 409, delete, create again
        secret_calls = [(r.method.value, r.url.path) for r in emulator if "/secrets" in r.url.path]
        assert [method for method, _ in secret_calls] == ["POST", "POST", "DELETE", "POST"]
        assert "jupyter-alice-token" in stored(emulator, "secrets")
        await spawner.stop(now=True)


async def test_pod_creation_500_fails_the_spawn(cluster, make_spawner, storage):
    emulator, server = cluster
    emulator["post /api/v1/namespaces/test/pods"] << 500
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server).running():
        await spawner._run_apply_user_options(spawner.user_options)
        with pytest.raises(ApiException) as info:
            await asyncio.wait_for(spawner.start(), 20)
        assert info.value.status == 500
    assert "jupyter-alice-token" not in stored(emulator, "secrets")


async def test_hub_restart_restores_state(cluster, make_spawner, storage):
    emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS, pod_name_template="casa-{username}")
    dataset = dataset_in(storage, "alice", "cycle10")
    spawner.user_options = {"dataset": dataset}
    async with FakeKubelet(server).running():
        await start_collecting_progress(spawner)
        state = spawner.get_state()
        assert state["pod_name"] == "casa-alice" and state["casa_recent_datasets"] == [dataset]

        # the hub restarts with a changed template: the saved state still finds the running pod
        restored = make_spawner(**TIMEOUTS, pod_name_template="other-{username}")
        restored.load_state(state)
        assert restored.pod_name == "casa-alice" and restored.recent_datasets == [dataset]
        assert await restored.poll() is None
        await restored.stop(now=True)
        assert await restored.poll() == 1
        assert "casa-alice" not in stored(emulator, "pods")


async def test_older_hub_plans_inside_start(cluster, make_spawner, storage):
    """JupyterHub < 5.3 has no apply_user_options: the plan is made in start() and still leads the progress."""
    _emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle7"), "interface": "desktop"}
    async with FakeKubelet(server).running() as kubelet:
        future = spawner.start()
        messages = [event["message"] async for event in spawner.progress()]
        assert await asyncio.wait_for(future, 20) == "http://127.0.0.1:8888"
        assert messages[0].endswith("CASA 6.1.1-15 (pipeline 2020.1.0.40), the exact build.")
        env = {e["name"]: e.get("value") for e in kubelet.pods[0]["spec"]["containers"][0]["env"]}
        assert env["JUPYTERHUB_DEFAULT_URL"] == "/desktop/"
        assert spawner.user_options["casa_version"] == "6.1.1-15"
        await spawner.stop(now=True)

"""Faults of the real API server during a spawn: the spawn completes, nothing is orphaned.

The API server is restarted (``cluster/restart-apiserver``) while a spawn waits for its pod, and
is down when a spawn begins; and KubeSpawner's pod watch gets a real ``410 Gone`` (its
resourceVersion older than the restarted API server's watch cache). The sessions' pods become
ready only after a while (a readiness probe), so that the faults fall inside the spawn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from k8s_hub import (
    assert_no_failed_mount,
    dataset_of,
    eventually,
    nothing_left,
    spawn,
)
from kubernetes_asyncio import client

from cluster import restart_apiserver

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(600)]

#: A session that becomes ready READY seconds after it starts.
READY = 15
#: Zero to JupyterHub's start timeout. After the API server restarts, the kubelet's and the
#: controller-manager's watches back off (client-go: up to a minute, growing with each restart
#: within two minutes); a pod created meanwhile waited up to 100 s before the kubelet saw it.
START_TIMEOUT = 300
SLOW = {
    "start_timeout": START_TIMEOUT,
    "cmd": [
        "/bin/busybox",
        "sh",
        "-c",
        f"/bin/busybox sleep {READY}; /bin/busybox touch /tmp/ready; exec /bin/busybox sleep 3600",
        "--",
    ],
    "extra_container_config": {
        "readinessProbe": {
            "exec": {"command": ["/bin/busybox", "test", "-e", "/tmp/ready"]},
            "periodSeconds": 1,
        }
    },
}


@pytest.fixture
def own_cluster(cluster):
    if not cluster.own:
        pytest.skip("restarting the API server needs the repository's own cluster")
    return cluster


async def settle(cluster: Any, namespace: str) -> Any:
    """A fresh admin client once the restarted API server answers again, and its checks pass."""
    fresh = await cluster.api_client()
    await eventually(lambda: _answers(fresh, namespace), 60, "the API server did not come back")
    return fresh


async def _answers(api: Any, namespace: str) -> bool:
    try:
        await client.CoreV1Api(api).list_namespaced_pod(namespace)
    except Exception:
        return False
    return True


async def finish(spawner: Any, cluster: Any, namespace: str) -> None:
    """The session runs; stopping it leaves nothing behind."""
    api = await settle(cluster, namespace)
    async with api:
        core = client.CoreV1Api(api)
        pod = await core.read_namespaced_pod(spawner.pod_name, namespace)
        assert pod.status.phase == "Running", pod.status
        await spawner.stop(now=True)
        await nothing_left(api, namespace)
        # The kubelet may have asked the stopped API server for a claim's volume: it tries again.
        await assert_no_failed_mount(api, namespace, api_server_down=True)


async def test_the_api_server_restarts_while_a_spawn_waits_for_its_pod(hub, api, own_cluster):
    spawner = hub.spawner(**SLOW)
    spawning = asyncio.ensure_future(
        spawn(spawner, {"dataset": dataset_of(hub.cavern, "cycle10")}, START_TIMEOUT + 30)
    )
    core = client.CoreV1Api(api)

    async def pod_created() -> bool:
        pods = await core.list_namespaced_pod(hub.namespace)
        return bool(pods.items)

    await eventually(pod_created, 60, "the session pod was not created")
    began = time.monotonic()
    await asyncio.to_thread(restart_apiserver, own_cluster)
    assert time.monotonic() - began > 2
    url, _messages = await spawning
    assert isinstance(url, str), getattr(url, "jupyterhub_message", url)
    await finish(spawner, own_cluster, hub.namespace)


async def test_a_spawn_that_begins_while_the_api_server_is_down_completes(hub, api, own_cluster):
    spawner = hub.spawner(**SLOW)
    restarting = asyncio.ensure_future(asyncio.to_thread(restart_apiserver, own_cluster, 5))
    client.CoreV1Api(api)

    async def down() -> bool:
        return not await _answers(api, hub.namespace)

    await eventually(down, 30, "the API server did not stop")
    url, _messages = await spawn(
        spawner, {"dataset": dataset_of(hub.cavern, "cycle10")}, START_TIMEOUT + 30
    )
    await restarting
    assert isinstance(url, str), getattr(url, "jupyterhub_message", url)
    await finish(spawner, own_cluster, hub.namespace)


class Records(logging.Handler):
    """Keeps the records of a logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_watch_too_old_for_the_api_server_gets_410_and_the_spawn_completes(
    hub, api, own_cluster
):
    """Between KubeSpawner's list and its watch, the API server restarts (and etcd moves on).

    The watch from the list's resourceVersion is then older than the new API server's watch
    cache, which answers 410 Gone; the reflector lists again and the spawn goes on. The shared
    reflector may have listed already: it is made to end its watch at the next event (the
    spawn's pod), so that its next list is the patched one.
    """
    spawner = hub.spawner(**SLOW)
    reflector = await spawner._start_watching_pods()
    records = Records()
    reflector.log.addHandler(records)
    listing = reflector._list_and_update
    restart_seconds = reflector.restart_seconds
    restarted = asyncio.Event()
    core = client.CoreV1Api(api)

    async def list_then_restart(resource_version: Any = None) -> Any:
        version = await listing(resource_version)
        if not restarted.is_set():
            reflector.restart_seconds = restart_seconds
            # Something written after the list, so that etcd's revision moves past it.
            await core.create_namespaced_config_map(
                hub.namespace, {"metadata": {"generateName": "after-the-list-"}}
            )
            await asyncio.to_thread(restart_apiserver, own_cluster)
            restarted.set()
        return version

    reflector._list_and_update = list_then_restart
    reflector.restart_seconds = 0
    try:
        url, _messages = await spawn(
            spawner, {"dataset": dataset_of(hub.cavern, "cycle10")}, START_TIMEOUT + 30
        )
    finally:
        reflector.log.removeHandler(records)
        reflector.restart_seconds = restart_seconds
        del reflector._list_and_update
    assert isinstance(url, str), getattr(url, "jupyterhub_message", url)
    assert restarted.is_set()
    gone = [
        r.exc_info[1]
        for r in records.records
        if r.exc_info and getattr(r.exc_info[1], "status", None) == 410
    ]
    assert gone, [r.getMessage() for r in records.records]
    assert "too old resource version" in str(gone[0].reason)
    await finish(spawner, own_cluster, hub.namespace)

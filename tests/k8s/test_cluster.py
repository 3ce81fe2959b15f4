"""The ``k8s`` tier's cluster does what the spawner's real-cluster tests rely on.

Pod Security admission, a real node that runs a hardened pod from an imported image (reachable
pod IP, logs and exec through the API server), the controller-manager's garbage collector and
ServiceAccounts.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from k8s_hub import eventually, hardened_pod
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from cluster import WWW_INDEX, Cluster

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]


async def test_a_restricted_namespace_refuses_a_privileged_root_pod(api, namespace):
    root_pod = {
        "metadata": {"name": "root"},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "localhost/never-pulled:1",
                    "securityContext": {"privileged": True},
                }
            ],
            "securityContext": {"runAsUser": 0},
        },
    }
    with pytest.raises(ApiException) as refused:
        await client.CoreV1Api(api).create_namespaced_pod(namespace, root_pod)
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert 'privileged (container "main" must not set securityContext.privileged=true)' in message
    assert "runAsNonRoot != true" in message


async def test_a_hardened_pod_runs_on_the_real_node_and_answers_in_the_namespace(
    cluster: Cluster, api, namespace, busybox
):
    core = client.CoreV1Api(api)
    serve = [
        "/bin/busybox",
        "sh",
        "-c",
        "echo serving /www; exec /bin/busybox httpd -f -p 8080 -h /www",
    ]
    await core.create_namespaced_pod(namespace, hardened_pod("web", busybox, serve))

    async def running() -> Any:
        pod = await core.read_namespaced_pod("web", namespace)
        waiting = [s.state.waiting for s in pod.status.container_statuses or [] if s.state.waiting]
        assert not any(w.reason in ("ErrImageNeverPull", "ErrImagePull") for w in waiting), waiting
        return pod if pod.status.phase == "Running" else None

    pod = await eventually(running, 120, "the hardened pod did not reach Running")
    node = await core.read_node(pod.spec.node_name)
    assert node.status.node_info.container_runtime_version.startswith("containerd://")
    assert "kwok" not in node.status.node_info.kubelet_version

    # The pod IP answers where the pod network is (inside the namespace, on the repository's
    # cluster).
    url = f"http://{pod.status.pod_ip}:8080/"

    async def page() -> str:
        answer = await asyncio.to_thread(
            cluster.run_in_netns, ["curl", "-sf", "--max-time", "5", url]
        )
        return answer.stdout

    assert await eventually(page, 30, f"{url} did not answer") == WWW_INDEX

    # The API server reaches the kubelet: logs, and exec over a websocket.
    logs = await core.read_namespaced_pod_log("web", namespace)
    assert logs == "serving /www\n"
    async with await cluster.ws_api_client() as ws:
        uid = await client.CoreV1Api(ws).connect_get_namespaced_pod_exec(
            "web",
            namespace,
            command=["/bin/busybox", "id", "-u"],
            stdout=True,
            stderr=True,
            stdin=False,
            tty=False,
        )
    assert str(uid).strip() == "1000"  # the client parses the output as JSON when it can


async def test_the_garbage_collector_deletes_a_secret_whose_owner_pod_is_gone(api, namespace):
    core = client.CoreV1Api(api)
    # The owner never runs: no node matches it, so only the API server and the controller-manager
    # take part.
    owner = hardened_pod(
        "owner",
        "localhost/never-pulled:1",
        ["/bin/true"],
        nodeSelector={"casaspawner.test/nowhere": "1"},
    )
    pod = await core.create_namespaced_pod(namespace, owner)
    reference = {"apiVersion": "v1", "kind": "Pod", "name": "owner", "uid": pod.metadata.uid}
    secret = {
        "metadata": {"name": "token", "ownerReferences": [reference]},
        "stringData": {"token": "x"},
    }
    await core.create_namespaced_secret(namespace, secret)
    await core.delete_namespaced_pod("owner", namespace, grace_period_seconds=0)

    async def secret_gone() -> bool:
        try:
            await core.read_namespaced_secret("token", namespace)
        except ApiException as error:
            return error.status == 404
        return False

    await eventually(secret_gone, 60, "the garbage collector did not delete the owned secret")


async def test_the_controller_manager_gives_a_new_namespace_its_default_service_account(
    api, namespace
):
    core = client.CoreV1Api(api)

    async def default_account() -> Any:
        accounts = await core.list_namespaced_service_account(namespace)
        return [a for a in accounts.items if a.metadata.name == "default"]

    assert await eventually(default_account, 30, "no default ServiceAccount appeared")

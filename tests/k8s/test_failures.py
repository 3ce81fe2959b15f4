"""Sessions the real cluster cannot run reach the user as one sentence each.

A ResourceQuota that refuses a large session, an image that cannot be pulled, a pod no node can
take: the spawn ends with one sentence, the pod's events stream into the progress messages on
the way, and the hub's ``stop()`` afterwards leaves nothing behind.
"""

from __future__ import annotations

import re
import time

import pytest
from k8s_hub import (
    assert_no_failed_mount,
    dataset_of,
    eventually,
    namespace_events,
    nothing_left,
    one_sentence,
    spawn,
)
from kubernetes_asyncio import client

from casaspawner.spawners.errors import SpawnException

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(600)]


async def test_a_quota_refuses_a_large_session_in_one_sentence(hub, api):
    quota = {"metadata": {"name": "sessions"}, "spec": {"hard": {"limits.memory": "8Gi"}}}
    await client.CoreV1Api(api).create_namespaced_resource_quota(hub.namespace, quota)
    dataset = dataset_of(hub.cavern, "cycle10")

    async def quota_counted() -> bool:
        found = await client.CoreV1Api(api).read_namespaced_resource_quota(
            "sessions", hub.namespace
        )
        return bool(found.status and found.status.hard)

    await eventually(quota_counted, 30, "the quota controller did not count the namespace")
    spawner = hub.spawner()
    outcome, messages = await spawn(spawner, {"dataset": dataset, "size": "large"})
    assert isinstance(outcome, SpawnException), outcome
    message = outcome.jupyterhub_message
    assert one_sentence(message), message
    assert message == (
        "The session does not fit in the cluster's resource quota (exceeded quota: sessions, "
        "requested: limits.memory=64Gi, used: limits.memory=0, limited: limits.memory=8Gi); "
        "choose a smaller size, or stop another session first."
    )
    assert outcome.status_code == 400
    # The plan's lines came first; no pod, so no pod events.
    assert messages[0].startswith("Dataset data/cycle10/"), messages
    await spawner.stop(now=True)
    await nothing_left(api, hub.namespace, timeout=10)

    # A small session fits under the same quota.
    small = hub.spawner()
    url, _ = await spawn(small, {"dataset": dataset, "size": "small"})
    assert isinstance(url, str), url
    await small.stop(now=True)
    await nothing_left(api, hub.namespace)
    await assert_no_failed_mount(api, hub.namespace)


async def test_an_image_that_cannot_be_pulled_ends_the_spawn_in_one_sentence(hub, api):
    """The cluster never pulls: a pull from localhost's registry, where none listens, fails."""
    image = "localhost/casaspawner/never-built:6.5.4-9-pipeline-2023.1.0.124"
    spawner = hub.spawner(image_template="localhost/casaspawner/never-built:{tag}")
    began = time.monotonic()
    outcome, messages = await spawn(spawner, {"dataset": dataset_of(hub.cavern, "cycle10")})
    assert isinstance(outcome, SpawnException), outcome
    # Ended by the kubelet's back-off, not by start_timeout.
    assert time.monotonic() - began < 60
    message = outcome.jupyterhub_message
    assert one_sentence(message), message
    assert message.startswith(f"The session image {image} could not be pulled (")
    assert "failed to pull and unpack image" in message or "Failed to pull image" in message
    # The kubelet's own words reached the progress messages while it tried.
    assert "The session is scheduled on a node." in messages, messages
    assert any(m.startswith("Pulling the session image") for m in messages), messages
    assert any("Failed to pull image" in m for m in messages), messages
    assert any("Back-off pulling image" in m for m in messages), messages
    await spawner.stop(now=True)
    await nothing_left(api, hub.namespace)
    await assert_no_failed_mount(api, hub.namespace)


async def test_a_pod_no_node_can_take_ends_the_spawn_in_one_sentence(hub, api):
    spawner = hub.spawner(node_selector={"casaspawner.test/nowhere": "1"})
    outcome, messages = await spawn(spawner, {"dataset": dataset_of(hub.cavern, "cycle10")})
    assert isinstance(outcome, SpawnException), outcome
    message = outcome.jupyterhub_message
    assert one_sentence(message), message
    # kwok's fake nodes, when the cluster has them, are counted too.
    assert re.match(r"No node can run this session: 0/\d+ nodes are available: ", message)
    assert "didn't match Pod's node affinity/selector" in message
    # The scheduler's event streamed into the progress.
    (scheduling, *_) = await namespace_events(api, hub.namespace, "FailedScheduling")
    assert any(scheduling.message in m for m in messages), messages
    await spawner.stop(now=True)
    await nothing_left(api, hub.namespace)
    await assert_no_failed_mount(api, hub.namespace)

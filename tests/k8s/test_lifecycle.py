"""A session's whole life on the real cluster, as the hub's ServiceAccount.

A spawn writes one object, the pod: the user's access token stays with the hub, which hands it
out once, to the pod's own address as the hub's pod watch sees it; the token's directory in the
pod is memory. The kubelet mounts every volume at once (no ``FailedMount``), and stopping leaves
no pod, Secret or Service behind.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import time

import pytest
from k8s_hub import (
    Recorder,
    alice,
    assert_no_failed_mount,
    dataset_of,
    eventually,
    hardened_pod,
    namespace_events,
    nothing_left,
    run_in_pod,
    spawn,
)
from kubernetes_asyncio import client
from tornado import web

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(600)]


async def test_a_session_starts_as_the_hub_account_and_stopping_leaves_nothing(hub, api, cluster):
    spawner = hub.spawner()
    options = {"dataset": dataset_of(hub.cavern, "cycle10"), "interface": "desktop"}
    async with Recorder(api, hub.namespace) as recorder:
        url, messages = await spawn(spawner, options)
        assert isinstance(url, str), url
    assert await spawner.poll() is None
    core = client.CoreV1Api(api)
    pod = await core.read_namespaced_pod(spawner.pod_name, hub.namespace)
    assert url == f"http://{pod.status.pod_ip}:8888"
    assert pod.spec.security_context.run_as_user == 41001
    assert pod.spec.security_context.supplemental_groups == [52001]
    assert pod.metadata.labels["casaspawner.io/interface"] == "desktop"
    assert hub.token not in json.dumps(api.sanitize_for_serialization(pod))
    # The digest the kubelet ran, from the pod's status, is noted beside the session's summary
    # (the session's reproducibility record reads it from there).
    (status,) = [s for s in pod.status.container_statuses if s.name == "notebook"]
    assert "@sha256:" in status.image_id or status.image_id.startswith("sha256:"), status
    digest = status.image_id.rsplit("sha256:", 1)[1]
    assert spawner.user_options["casaspawner"]["image_digest"] == f"sha256:{digest}"

    # The spawn wrote the pod and nothing else: no Secret, ever.
    assert [(c.kind, c.type) for c in recorder.changes][:1] == [("Pod", "ADDED")]
    assert not [c for c in recorder.changes if c.kind == "Secret"]
    # The hub hands the token to the server's own API token from the pod's real address, once.
    with pytest.raises(web.HTTPError) as refused:
        spawner.hand_out_access_token(spawner.api_token, "10.244.255.254")
    assert refused.value.log_message == "Only the session's own pod may fetch its access token."
    assert spawner.hand_out_access_token(spawner.api_token, pod.status.pod_ip) == hub.token
    with pytest.raises(web.HTTPError) as refused:
        spawner.hand_out_access_token(spawner.api_token, pod.status.pod_ip)
    assert refused.value.status_code == 409
    # Where the session keeps it: memory (tmpfs), writable by the user alone, not the node's disk.
    directory = "/var/run/secrets/casaspawner"
    script = (
        f"/bin/busybox grep ' {directory} ' /proc/mounts | /bin/busybox cut -d' ' -f3; "
        f"umask 077; echo t > {directory}/token && /bin/busybox stat -c '%u %a' {directory}/token"
    )
    found = await run_in_pod(
        cluster, hub.namespace, spawner.pod_name, ["/bin/busybox", "sh", "-c", script]
    )
    assert found.split() == ["tmpfs", "41001", "600"], found

    # The progress page: the resolution first, then the pod's events in words.
    assert messages[0].startswith("Dataset data/cycle10/"), messages
    assert "The session is scheduled on a node." in messages, messages
    assert f"The session image {hub.busybox} is ready." in messages, messages

    # A hub restart: a fresh spawner from the saved state finds the pod, and stops it.
    state = json.loads(json.dumps(spawner.get_state()))
    from kubespawner import KubeSpawner

    await KubeSpawner._stop_all_reflectors()
    restored = hub.spawner()
    restored.load_state(state)
    assert await restored.poll() is None
    await restored.stop(now=True)
    assert await restored.poll() == 1
    await nothing_left(api, hub.namespace)
    await assert_no_failed_mount(api, hub.namespace)


async def test_a_pod_deleted_behind_the_hubs_back_is_noticed_and_leaves_nothing(hub, api):
    """An admin or an eviction deletes the pod: poll notices, and nothing is left behind."""
    spawner = hub.spawner()
    url, _ = await spawn(spawner, {"dataset": dataset_of(hub.cavern, "cycle7")})
    assert isinstance(url, str), url
    core = client.CoreV1Api(api)
    await core.delete_namespaced_pod(spawner.pod_name, hub.namespace, grace_period_seconds=0)
    await eventually(lambda: _stopped(spawner), 30, "poll() did not notice the pod was gone")
    await nothing_left(api, hub.namespace)
    await assert_no_failed_mount(api, hub.namespace)


async def _stopped(spawner) -> bool:
    return await spawner.poll() == 1


async def _seen_running(recorder: Recorder, name: str) -> bool:
    return any(c.running for c in recorder.changes if c.name == name)


async def test_spawn_after_spawn_the_kubelet_mounts_every_volume_at_once(hub, api):
    """Five sessions in a row, each with its token directory: no FailedMount.

    Each start ends as the hub's pod watch shows its pod running (KubeSpawner's back-off would
    look again up to 0.4, 0.8 … s later): within 0.5 s of an admin's watch seeing it, every time.
    """
    late = []
    for round_ in range(5):
        spawner = hub.spawner()
        era = ("cycle9", "cycle10", "cycle11", "cycle12", "cycle8")[round_]
        options = {"dataset": dataset_of(hub.cavern, era)}
        spawner.user_options = options
        async with Recorder(api, hub.namespace) as recorder:
            await spawner._run_apply_user_options(options)
            url = await asyncio.wait_for(spawner.start(), 240)
            ended = time.perf_counter()
            seen = functools.partial(_seen_running, recorder, spawner.pod_name)
            await eventually(seen, 10, "the admin's watch saw no Running pod")
        assert isinstance(url, str), url
        late.append(ended - recorder.first_running(spawner.pod_name))
        assert not spawner.pod_reflector._waiters
        await spawner.stop(now=True)
    assert all(-0.5 < seconds < 0.5 for seconds in late), late
    started = await namespace_events(api, hub.namespace, "Started")
    assert len(started) == 5
    await assert_no_failed_mount(api, hub.namespace)
    await nothing_left(api, hub.namespace)


async def test_a_user_without_a_token_gets_no_token_directory(hub, api):
    user = alice(hub.token)
    del user.auth_state["access_token"]
    spawner = hub.spawner(user=user)
    url, _ = await spawn(spawner, {"dataset": dataset_of(hub.cavern, "cycle10")})
    assert isinstance(url, str), url
    pod = await client.CoreV1Api(api).read_namespaced_pod(spawner.pod_name, hub.namespace)
    assert "casa-token" not in {v.name for v in pod.spec.volumes}
    with pytest.raises(web.HTTPError) as refused:
        spawner.hand_out_access_token(spawner.api_token, pod.status.pod_ip)
    assert refused.value.status_code == 404
    await spawner.stop(now=True)
    await nothing_left(api, hub.namespace)


async def test_a_secret_stored_after_its_pod_makes_the_kubelet_fail_the_mount(
    api, namespace, busybox
):
    """What the FailedMount check above catches: a Secret volume stored after its pod (the
    order of issue 17's token Secret, which sessions no longer have)."""
    core = client.CoreV1Api(api)
    pod = hardened_pod("late", busybox, ["/bin/busybox", "sleep", "3600"])
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "token", "mountPath": "/token"}]
    pod["spec"]["volumes"] = [{"name": "token", "secret": {"secretName": "late-token"}}]
    await core.create_namespaced_pod(namespace, pod)
    await asyncio.sleep(1)
    await core.create_namespaced_secret(namespace, {"metadata": {"name": "late-token"}})

    async def failed() -> list:
        return await namespace_events(api, namespace, "FailedMount")

    (event, *_) = await eventually(failed, 30, "the kubelet reported no FailedMount")
    # The Secret was not there yet when the kubelet mounted the volume: "secret "late-token" not
    # found", or, when its cache gave up waiting for it, "failed to sync secret cache".
    assert 'for volume "token"' in event.message, event.message
    with pytest.raises(AssertionError):
        await assert_no_failed_mount(api, namespace)


async def test_a_relaunch_runs_the_image_by_the_digest_that_ran(hub, api, pushed_busybox):
    """The digest the kubelet reported for a pulled image names it again: the relaunched pod's
    image is that digest, and the node pulls and runs it."""
    spawner = hub.spawner(image_template=pushed_busybox)
    dataset = dataset_of(hub.cavern, "cycle10")
    url, _ = await spawn(spawner, {"dataset": dataset, "interface": "desktop"})
    assert isinstance(url, str), url
    (past,) = spawner.session_history
    await spawner.stop(now=True)
    spawner.clear_state()

    url, messages = await spawn(spawner, {"relaunch": past.name, "dataset": "elsewhere"})
    assert isinstance(url, str), "\n".join([str(url), *messages])
    pod = await client.CoreV1Api(api).read_namespaced_pod(spawner.pod_name, hub.namespace)
    (container,) = [c for c in pod.spec.containers if c.name == "notebook"]
    assert container.image == f"{pushed_busybox.rsplit(':', 1)[0]}@sha256:{past.sha256}"
    (status,) = [s for s in pod.status.container_statuses if s.name == "notebook"]
    assert status.image_id.endswith(f"sha256:{past.sha256}")
    assert pod.metadata.labels["casaspawner.io/interface"] == "desktop"
    assert spawner.session_plan.options.dataset == dataset
    await spawner.stop(now=True)
    await nothing_left(api, hub.namespace)


async def test_measures_kept_by_version_are_mounted_by_the_kubelet(
    hub, api, cluster, no_measures, pushed_busybox
):
    """With the measures volume kept one directory per version, the real kubelet mounts the
    version the hub chose by sub-path: the newest for a new session, the past session's for a
    relaunch, and a relaunch of a version the operators removed is refused before any pod."""
    from casaspawner.spawners.errors import SpawnException

    def keep(version: str) -> None:
        (no_measures / version / "geodetic").mkdir(parents=True)
        (no_measures / version / "geodetic" / "readme.txt").write_text(f"version : {version}\n")

    async def reads(spawner) -> str:
        readme = ["/bin/busybox", "cat", "/opt/casa/measures/geodetic/readme.txt"]
        return await run_in_pod(cluster, hub.namespace, spawner.pod_name, readme)

    # From the registry: a relaunch names the image by digest.
    spawner = hub.spawner(
        image_template=pushed_busybox, measures_versions_hub_path=str(no_measures)
    )
    options = {"dataset": dataset_of(hub.cavern, "cycle10")}
    keep("2026-11-01")
    try:
        url, messages = await spawn(spawner, options)
        assert isinstance(url, str), "\n".join([str(url), *messages])
        assert await reads(spawner) == "version : 2026-11-01"
        (past,) = spawner.session_history
        assert past.measures == "2026-11-01"
        await spawner.stop(now=True)
        spawner.clear_state()

        keep("2026-12-01")
        url, messages = await spawn(spawner, {"relaunch": past.name})
        assert isinstance(url, str), "\n".join([str(url), *messages])
        assert await reads(spawner) == "version : 2026-11-01"
        await spawner.stop(now=True)
        spawner.clear_state()
        url, messages = await spawn(spawner, options)
        assert isinstance(url, str), "\n".join([str(url), *messages])
        assert await reads(spawner) == "version : 2026-12-01"
        await spawner.stop(now=True)
        spawner.clear_state()

        shutil.rmtree(no_measures / "2026-11-01")
        with pytest.raises(SpawnException) as info:
            await spawn(spawner, {"relaunch": past.name})
        assert info.value.jupyterhub_message == (
            "The measures data that session read (2026-11-01) is no longer kept on this hub, so "
            "it cannot be relaunched exactly; start a new session instead."
        )
        await nothing_left(api, hub.namespace)
    finally:
        for version in ("2026-11-01", "2026-12-01"):
            shutil.rmtree(no_measures / version, ignore_errors=True)

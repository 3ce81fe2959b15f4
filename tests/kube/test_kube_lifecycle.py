"""The real KubeSpawner start → poll → stop lifecycle against kmock on 127.0.0.1 (emulator +
fake kubelet)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("kubespawner", reason="the lifecycle is KubeSpawner's (the hub extra)")

import kmock
from kubernetes_asyncio.client.rest import ApiException
from support.datasets import dataset_in
from support.kube import CLAIM_NOT_FOUND, FakeKubelet, stored
from support.users import FakeUser
from tornado import web

from casaspawner.spawners.errors import SpawnException

TIMEOUTS = {"start_timeout": 15, "k8s_api_request_retry_timeout": 5}


async def start_collecting_progress(spawner) -> tuple[str, list[str]]:
    """Start as the hub does (apply_user_options, then start) while reading progress like the spawn
    page."""
    await spawner._run_apply_user_options(spawner.user_options)
    future = spawner.start()
    messages = [event["message"] async for event in spawner.progress()]
    url = await asyncio.wait_for(future, 20)
    return url, messages


async def test_start_poll_stop_and_the_token_handed_to_the_pod_once(
    cluster, make_spawner, storage
):
    emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS)
    spawner.api_token = "server-api-token"
    spawner.user_options = {
        "dataset": dataset_in(storage, "alice", "cycle10"),
        "interface": "desktop",
    }
    async with FakeKubelet(server).running() as kubelet:
        url, messages = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        assert await spawner.poll() is None

        (pod,) = kubelet.pods
        assert (
            pod["spec"]["containers"][0]["image"]
            == "ghcr.io/casaspawner/casa:6.5.4-9-pipeline-2023.1.0.124"
        )
        assert pod["metadata"]["labels"]["casaspawner.io/interface"] == "desktop"
        assert "tok-SECRET-42" not in str(pod)
        # No Secret: the token never went to Kubernetes.
        assert not [r for r in emulator if "/secrets" in r.url.path]
        # The token: to the server's own API token, from the pod's address (the fake kubelet's
        # 127.0.0.1), once.
        with pytest.raises(web.HTTPError) as refused:
            spawner.hand_out_access_token("another-token", "127.0.0.1")
        assert (refused.value.status_code, refused.value.log_message) == (
            403,
            "Only the session's own server may fetch its access token.",
        )
        with pytest.raises(web.HTTPError) as refused:
            spawner.hand_out_access_token("server-api-token", "10.0.0.9")
        assert (refused.value.status_code, refused.value.log_message) == (
            403,
            "Only the session's own pod may fetch its access token.",
        )
        token = spawner.hand_out_access_token("server-api-token", "::ffff:127.0.0.1")
        assert token == "tok-SECRET-42"
        with pytest.raises(web.HTTPError) as refused:
            spawner.hand_out_access_token("server-api-token", "127.0.0.1")
        assert (refused.value.status_code, refused.value.log_message) == (
            409,
            "This session fetched its access token already.",
        )

        # progress: resolution result and reason first, then image pull, then container start
        assert messages[0].startswith("Dataset data/cycle10/") and messages[0].endswith(
            "CASA 6.5.4-9 (pipeline 2023.1.0.124), the exact build."
        )
        assert messages[1].startswith("The pipeline manifest names pipeline 2023.1.0.124")
        pulling = next(
            i for i, m in enumerate(messages) if m.startswith("Pulling the session image")
        )
        started = next(
            i for i, m in enumerate(messages) if m.startswith("The session container started")
        )
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
        # Ended by the event, not by start_timeout.
        assert time.perf_counter() - began < 10
        assert info.value.jupyterhub_message == (
            f'The session image {image} could not be pulled (Failed to pull image "{image}": '
            f"{image} not found)."
        )
        # What the hub does after a failed start.
        await spawner.stop(now=True)
        assert await spawner.poll() == 1


@pytest.mark.parametrize(
    ("mode", "shown"),
    [
        (
            "pull-recovers",
            [
                lambda m: "Error: ErrImagePull" in m,
                lambda m: m.startswith("The session image") and m.endswith("is ready."),
            ],
        ),
        # The FailedScheduling was seen, and outlived.
        ("scheduled-late", [lambda m: "Insufficient memory" in m]),
    ],
    ids=["pull-recovers", "scheduled-late"],
)
async def test_a_failure_the_kubelet_gets_past_is_not_fatal(
    cluster, make_spawner, storage, mode, shown
):
    """The spawn goes on after ErrImagePull when the kubelet's next pull works, and after a
    FailedScheduling older than the Scheduled event (e.g. a claim being bound)."""
    _emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server, mode=mode).running():
        url, messages = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        for seen in shown:
            assert any(seen(m) for m in messages), messages
        await spawner.stop(now=True)


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


async def test_a_claim_the_scheduler_has_not_seen_yet_is_waited_for(
    cluster, make_spawner, storage
):
    """A claim "not found" by the scheduler may yet be seen (its view lags after an API server
    restart) or bound: the spawn waits for it, up to claim_wait_timeout."""
    _emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server, mode="claim-late").running():
        url, messages = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        assert any('"casa-home" not found' in m for m in messages), messages
        await spawner.stop(now=True)


async def test_a_claim_still_missing_after_the_wait_ends_the_spawn(cluster, make_spawner, storage):
    _emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS, claim_wait_timeout=1)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server, mode="claim-missing").running():
        began = time.monotonic()
        with pytest.raises(SpawnException) as info:
            await start_collecting_progress(spawner)
        assert time.monotonic() - began >= 1
        assert info.value.jupyterhub_message == f"No node can run this session: {CLAIM_NOT_FOUND}"
        await spawner.stop(now=True)


async def test_the_start_ends_when_the_watch_shows_the_pod_running(cluster, make_spawner, storage):
    """Not at KubeSpawner's next look: after a 3 s pull, its back-off looks up to 1.6 s apart."""
    _emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server, pull_seconds=3).running() as kubelet:
        await spawner._run_apply_user_options(spawner.user_options)
        start = spawner.start()
        while not kubelet.pods:
            await asyncio.sleep(0.05)
        # poll() asks the same question from its own task, and gets a bool.
        assert spawner.is_pod_running(kubelet.pods[0]) is False
        assert await spawner.poll() is None
        assert await asyncio.wait_for(start, 20) == "http://127.0.0.1:8888"
        late = time.perf_counter() - kubelet.running_at[spawner.pod_name]
        assert 0 <= late < 0.3
        assert spawner.is_pod_running(spawner.pod_reflector.pods[f"test/{spawner.pod_name}"])
        # Nobody is left waiting on the pod.
        assert not spawner.pod_reflector._waiters
        await spawner.stop(now=True)


async def test_a_reflector_kubespawner_started_serves_a_casa_start(cluster, make_spawner, storage):
    """A hub running both spawners shares KubeSpawner's reflector: the start looks as it did."""
    from kubespawner import KubeSpawner
    from kubespawner.spawner import PodReflector

    from casaspawner.kube.reflector import WatchedPodReflector

    _emulator, server = cluster
    plain = KubeSpawner(_mock=True, user=FakeUser(name="bob"), namespace="test")
    reflector = await plain._start_watching_pods()
    assert type(reflector) is PodReflector
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server).running():
        url, _ = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        assert spawner.pod_reflector is reflector
        assert not isinstance(reflector, WatchedPodReflector)
        await spawner.stop(now=True)


async def test_the_watched_reflector_wakes_its_waiters(cluster, make_spawner):
    """On a pod set or popped by the watch, on a full list, and after the timeout otherwise."""
    spawner = make_spawner()
    reflector = await spawner._start_watching_pods()
    key = "test/jupyter-alice"

    async def woken_by(change) -> float:
        waiting = asyncio.ensure_future(reflector.changed(key, 5))
        await asyncio.sleep(0.05)
        began = time.perf_counter()
        change()
        await waiting
        return time.perf_counter() - began

    assert await woken_by(lambda: reflector.resources.__setitem__(key, {"n": 1})) < 0.5
    assert await woken_by(lambda: reflector.resources.pop(key, None)) < 0.5
    assert await woken_by(lambda: setattr(reflector, "resources", {})) < 0.5
    # Another pod's change does not wake it; the timeout does.
    other = "test/jupyter-bob"
    began = time.perf_counter()
    waiting = asyncio.ensure_future(reflector.changed(key, 0.5))
    await asyncio.sleep(0.05)
    reflector.resources[other] = {"n": 2}
    await waiting
    assert time.perf_counter() - began >= 0.5
    assert not reflector._waiters


#: What a real API server sends with a 500 (a Status), and what a proxy in front of it may send
#: instead.
API_500 = {
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "message": "etcdserver: request timed out",
}
REFLECTOR_LISTS = {
    "pods": ("/api/v1/namespaces/test/pods", {"labelSelector": "component=singleuser-server"}),
    "events": ("/api/v1/namespaces/test/events", {"fieldSelector": "involvedObject.kind=Pod"}),
}


def reflector_requests(emulator, kind: str) -> list[dict[str, str]]:
    """The query of every request KubeSpawner's reflector of ``kind`` made (never the fake
    kubelet's)."""
    path, selector = REFLECTOR_LISTS[kind]
    key, value = next(iter(selector.items()))
    return [dict(r.params) for r in emulator if r.url.path == path and r.params.get(key) == value]


PROXY_503 = kmock.text("<html><body>503 Service Unavailable</body></html>")


@pytest.mark.parametrize(
    "failure", [(500, API_500), (503, PROXY_503)], ids=["api-500", "proxy-503"]
)
async def test_failed_first_reflector_list_is_retried(cluster, make_spawner, storage, failure):
    """KubeSpawner alone fails the spawn and keeps a broken reflector (see the next test);
    CASASpawner lists again, so the spawn goes on, and the next spawn finds a working reflector."""
    emulator, server = cluster
    status, body = failure
    for path, selector in REFLECTOR_LISTS.values():
        reaction = emulator[f"get {path}"][kmock.params(**selector)][:1] << status << body
        if status == 503:
            # An HTML page from a proxy in front of the API server.
            reaction << kmock.headers({"Content-Type": "text/html"})
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server).running():
        url, _ = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        for kind in REFLECTOR_LISTS:
            first, second, *_ = reflector_requests(emulator, kind)
            # The failed first list, listed again.
            assert "watch" not in first and "watch" not in second
        await spawner.stop(now=True)
        began = time.perf_counter()
        again = make_spawner(**TIMEOUTS)
        again.user_options = spawner.user_options
        url, _ = await start_collecting_progress(again)
        assert url == "http://127.0.0.1:8888" and time.perf_counter() - began < 5
        await again.stop(now=True)


async def test_kubespawner_alone_fails_on_first_list_500(cluster):
    """What the override above is for (KubeSpawner 7.1): the spawn fails, and the broken reflector
    is kept."""
    from kubespawner import KubeSpawner

    from casaspawner.kube.spawner import _reflector_broken

    emulator, _server = cluster
    path, selector = REFLECTOR_LISTS["pods"]
    emulator[f"get {path}"][kmock.params(**selector)][:1] << 500 << API_500
    plain = KubeSpawner(_mock=True, user=FakeUser(), namespace="test", **TIMEOUTS)
    with pytest.raises(ApiException) as info:
        await plain.start()
    assert info.value.status == 500
    assert _reflector_broken(KubeSpawner.reflectors[("pods", "test")])


async def test_500_on_the_reflectors_watch_reconnects(cluster, make_spawner, storage):
    """KubeSpawner's reflector takes a failed watch as a dropped one: it lists again and watches
    again."""
    emulator, server = cluster
    path, selector = REFLECTOR_LISTS["pods"]
    emulator[f"get {path}"][kmock.params(watch="True", **selector)][:1] << 500 << API_500
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server).running():
        url, _ = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        calls = ["watch" if "watch" in q else "list" for q in reflector_requests(emulator, "pods")]
        first_watch = calls.index("watch")
        assert calls[first_watch + 1 : first_watch + 3] == ["list", "watch"], calls
        await spawner.stop(now=True)


async def test_a_session_stopped_before_it_fetched_its_token_gets_none(
    cluster, make_spawner, storage
):
    """The hub forgets the token at the stop; a user without one never had any to hand."""
    _emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS)
    spawner.api_token = "server-api-token"
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    async with FakeKubelet(server).running():
        await start_collecting_progress(spawner)
        await spawner.stop(now=True)
    with pytest.raises(web.HTTPError) as refused:
        spawner.hand_out_access_token("server-api-token", "127.0.0.1")
    assert refused.value.status_code == 404
    assert refused.value.log_message.startswith("The hub holds no access token for this session")


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


async def test_a_leftover_pod_of_the_same_name_is_replaced_and_the_token_still_handed(
    cluster, make_spawner, storage
):
    """KubeSpawner deletes a pod of the same name it finds (409) and creates it again: that
    deletion is not the session's stop, so the hub still hands the new session its token."""
    emulator, server = cluster
    options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    leftover, spawner = make_spawner(**TIMEOUTS), make_spawner(**TIMEOUTS)
    spawner.api_token = "server-api-token"
    async with FakeKubelet(server).running():
        leftover.user_options = spawner.user_options = options
        await start_collecting_progress(leftover)
        old = stored(emulator, "pods")["jupyter-alice"]["metadata"]["uid"]
        await start_collecting_progress(spawner)
        assert stored(emulator, "pods")["jupyter-alice"]["metadata"]["uid"] != old
        assert spawner.hand_out_access_token("server-api-token", "127.0.0.1") == "tok-SECRET-42"
        await spawner.stop(now=True)


async def test_a_pod_a_timed_out_request_created_is_kept(cluster, make_spawner, storage):
    """A busy API server may create the pod after the hub's request timed out: the next
    attempt's 409 is then this start's own pod (it carries its API token), kept, not replaced."""
    emulator, server = cluster
    options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    earlier, spawner = make_spawner(**TIMEOUTS), make_spawner(**TIMEOUTS)
    # The same start's token: the pod its own first request made.
    earlier.api_token = spawner.api_token = "server-api-token"
    async with FakeKubelet(server).running():
        earlier.user_options = spawner.user_options = options
        await start_collecting_progress(earlier)
        made = stored(emulator, "pods")["jupyter-alice"]["metadata"]["uid"]
        url, _ = await start_collecting_progress(spawner)
        assert url == "http://127.0.0.1:8888"
        assert stored(emulator, "pods")["jupyter-alice"]["metadata"]["uid"] == made
        assert not [r for r in emulator if r.method.value == "DELETE"]
        await spawner.stop(now=True)


async def test_saved_state_restores_into_a_fresh_spawner(cluster, make_spawner, storage):
    """A new spawner with no reflectors left (a real hub restart: tests/kube/test_kube_hub.py)
    finds the pod."""
    from kubespawner import KubeSpawner

    emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS, pod_name_template="casa-{username}")
    dataset = dataset_in(storage, "alice", "cycle10")
    spawner.user_options = {"dataset": dataset}
    async with FakeKubelet(server).running():
        await start_collecting_progress(spawner)
        # As the hub's database keeps it.
        state = json.loads(json.dumps(spawner.get_state()))
        assert state["pod_name"] == "casa-alice" and state["casa_recent_datasets"] == [dataset]
        await KubeSpawner._stop_all_reflectors()
        lists_before = len(reflector_requests(emulator, "pods"))

        # the hub restarts with a changed template: the saved state still finds the running pod
        restored = make_spawner(**TIMEOUTS, pod_name_template="other-{username}")
        restored.load_state(state)
        assert restored.pod_name == "casa-alice" and restored.recent_datasets == [dataset]
        assert await restored.poll() is None
        # Asked Kubernetes, not a stale cache.
        assert len(reflector_requests(emulator, "pods")) > lists_before
        # kmock's watch ignores resourceVersion: a deletion between the new reflector's list and
        # its watch would be lost (a real API server replays it), so let the watch start before
        # stopping
        for _ in range(100):
            if any("watch" in q for q in reflector_requests(emulator, "pods")[lists_before:]):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await restored.stop(now=True)
        assert await restored.poll() == 1
        assert "casa-alice" not in stored(emulator, "pods")


async def test_older_hub_plans_inside_start(cluster, make_spawner, storage):
    """JupyterHub < 5.3 has no apply_user_options: the plan is made in start() and still leads the
    progress."""
    _emulator, server = cluster
    spawner = make_spawner(**TIMEOUTS)
    spawner.user_options = {
        "dataset": dataset_in(storage, "alice", "cycle7"),
        "interface": "desktop",
    }
    async with FakeKubelet(server).running() as kubelet:
        future = spawner.start()
        messages = [event["message"] async for event in spawner.progress()]
        assert await asyncio.wait_for(future, 20) == "http://127.0.0.1:8888"
        assert messages[0].endswith("CASA 6.1.1-15 (pipeline 2020.1.0.40), the exact build.")
        env = {e["name"]: e.get("value") for e in kubelet.pods[0]["spec"]["containers"][0]["env"]}
        assert env["JUPYTERHUB_DEFAULT_URL"] == "/desktop/"
        assert spawner.user_options["casaspawner"]["casa_version"] == "6.1.1-15"
        await spawner.stop(now=True)

"""Kubernetes without a cluster: a kmock emulator, a fake kubelet and a stand-in session server.

The emulator is kmock 0.8's ``KubernetesEmulator`` with the four gaps the real KubeSpawner trips
over filled in (see the JupyterHub stack reference, sections 7.3 and 7.4): ``watch=True``
spelling, namespace defaulting, uid and resourceVersion bookkeeping, and a Pending status on new
pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import kmock
from aiohttp import web
from kmock._internal import enums

from casaspawner.net import free_port

PLACEHOLDER_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: tests, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: tests, user: {token: not-a-real-token}}]
contexts: [{name: tests, context: {cluster: tests, user: tests, namespace: test}}]
current-context: tests
"""


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator, filled in where KubeSpawner needs a real API server's bookkeeping."""

    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        watch = str(request.params.get("watch", "")).lower() in ("true", "1")
        if request.action == enums.action.LIST and watch:
            # The request is frozen, and its action is matched by identity.
            object.__setattr__(request, "action", enums.action.WATCH)
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta["resourceVersion"] = str(next(self._versions))
                if request.resource.plural == "pods":
                    request.data.setdefault("status", {"phase": "Pending"})
            elif request.action == enums.action.UPDATE:
                meta["resourceVersion"] = str(next(self._versions))
        return await super()._handle(request)


def _now(age: float = 0) -> str:
    """An API timestamp, ``age`` seconds ago."""
    when = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(seconds=age)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def kubeconfig_for(path: Path, url: str) -> Path:
    """Write a kubeconfig for the API server at ``url`` to ``path``."""
    path.write_text(PLACEHOLDER_KUBECONFIG.replace("https://127.0.0.1:9", url))
    return path


def use_kubeconfig(path: Path) -> None:
    """Point KubeSpawner's config loader at ``path``.

    kubernetes_asyncio reads ``KUBECONFIG`` only when it is imported.
    """
    from kubernetes_asyncio.config import kube_config
    from kubespawner.clients import load_config

    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    load_config.cache_clear()


@contextlib.asynccontextmanager
async def emulated_cluster(kubeconfig: Path) -> AsyncIterator[tuple[Emulator, kmock.Server]]:
    """An emulator served on 127.0.0.1, with a kubeconfig for it written to ``kubeconfig``."""
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        # kmock 0.8 reads its bundled resources with a deprecated API.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            emulator.resources.load_bundled()
        kubeconfig_for(kubeconfig, str(server.url).rstrip("/"))
        yield emulator, server


@contextlib.asynccontextmanager
async def session_stand_in() -> AsyncIterator[int]:
    """Answer on a free port like a session's server would; yields the port.

    The hub only checks that the session's server answers.
    """

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"version": "stand-in"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


#: What kube-scheduler says of a pod whose claim it has not seen.
CLAIM_NOT_FOUND = '0/3 nodes are available: persistentvolumeclaim "casa-home" not found.'


class FakeKubelet:
    """Plays scheduler and kubelet for every new pod: events, then Running, or a failure.

    Modes: ``ok``; ``errimagepull`` (the pull fails, then the kubelet backs off:
    ``ImagePullBackOff``); ``pull-recovers`` (the first pull fails with ``ErrImagePull``, the
    next one works); ``unschedulable``; ``scheduled-late`` (a ``FailedScheduling`` from two
    seconds before the ``Scheduled`` event, then Running); ``claim-late`` (the scheduler says a
    claim is not found, and two seconds later schedules the pod); ``claim-missing`` (it says so,
    and nothing more).
    """

    def __init__(
        self,
        server: kmock.Server,
        namespace: str = "test",
        mode: str = "ok",
        pull_seconds: float = 0,
    ) -> None:
        self.server = server
        self.namespace = namespace
        self.mode = mode
        # How long the image pull takes.
        self.pull_seconds = pull_seconds
        self.seen: set[str] = set()
        self.pods: list[dict[str, Any]] = []
        # When each pod was reported Running (perf_counter seconds), by name.
        self.running_at: dict[str, float] = {}
        self.errors: list[Exception] = []

    async def _event(
        self,
        pod: Mapping[str, Any],
        reason: str,
        message: str,
        kind: str = "Normal",
        age: float = 0,
    ) -> None:
        name = pod["metadata"]["name"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:10]}", "namespace": self.namespace},
            "involvedObject": {
                "kind": "Pod",
                "name": name,
                "namespace": self.namespace,
                "uid": pod["metadata"]["uid"],
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "lastTimestamp": _now(age),
            "eventTime": None,
        }
        async with self.server.client.post(
            f"/api/v1/namespaces/{self.namespace}/events", json=event
        ) as response:
            assert response.status < 300, await response.text()

    async def _patch(self, pod: Mapping[str, Any], status: dict[str, Any]) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}"
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.server.client.patch(
            path, json={"status": status}, headers=headers
        ) as response:
            assert response.status < 300, await response.text()

    async def _waiting(self, pod: Mapping[str, Any], reason: str, message: str) -> None:
        image = pod["spec"]["containers"][0]["image"]
        waiting = {"reason": reason, "message": message}
        container = {
            "name": "notebook",
            "image": image,
            "imageID": "",
            "ready": False,
            "restartCount": 0,
        }
        status = {
            "phase": "Pending",
            "containerStatuses": [{**container, "state": {"waiting": waiting}}],
        }
        await self._patch(pod, status)

    async def _failed_pull(self, pod: Mapping[str, Any], image: str) -> None:
        failed = f'Failed to pull image "{image}": {image} not found'
        await self._event(pod, "Failed", failed, "Warning")
        await self._event(pod, "Failed", "Error: ErrImagePull", "Warning")
        await self._waiting(pod, "ErrImagePull", f"{image} not found")

    async def _run_pod(self, pod: Mapping[str, Any]) -> None:
        image = pod["spec"]["containers"][0]["image"]
        unschedulable = "0/3 nodes are available: 3 Insufficient memory."
        if self.mode in ("unschedulable", "claim-late", "claim-missing"):
            if self.mode != "unschedulable":
                unschedulable = CLAIM_NOT_FOUND
            # As kube-scheduler does: the pod's condition, then the event.
            condition = {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
            await self._patch(pod, {"phase": "Pending", "conditions": [condition]})
            await self._event(pod, "FailedScheduling", unschedulable, "Warning")
            if self.mode != "claim-late":
                return
            # The scheduler sees the claim.
            await asyncio.sleep(2)
            condition = {"type": "PodScheduled", "status": "True"}
            await self._patch(pod, {"phase": "Pending", "conditions": [condition]})
        assigned = f"Successfully assigned {self.namespace}/{pod['metadata']['name']} to node-1"
        await self._event(pod, "Scheduled", assigned)
        if self.mode == "scheduled-late":
            # Reported late: it happened before the pod was scheduled.
            await self._event(pod, "FailedScheduling", unschedulable, "Warning", age=2)
        await self._event(pod, "Pulling", f'Pulling image "{image}"')
        if self.mode in ("errimagepull", "pull-recovers"):
            await self._failed_pull(pod, image)
            # The kubelet's next pod sync.
            await asyncio.sleep(0.5)
            if self.mode == "errimagepull":
                back_off = f'Back-off pulling image "{image}"'
                await self._event(pod, "BackOff", back_off)
                await self._event(pod, "Failed", "Error: ImagePullBackOff", "Warning")
                await self._waiting(pod, "ImagePullBackOff", back_off)
                return
            await self._event(pod, "Pulling", f'Pulling image "{image}"')
        await asyncio.sleep(self.pull_seconds)
        await self._event(pod, "Pulled", f'Successfully pulled image "{image}"')
        await self._event(pod, "Started", "Started container notebook")
        self.running_at[pod["metadata"]["name"]] = time.perf_counter()
        await self._patch(
            pod,
            {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "containerStatuses": [
                    {
                        "name": "notebook",
                        "image": image,
                        "imageID": f"{image}@sha256:{'0' * 64}",
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": _now()}},
                    }
                ],
            },
        )

    async def run(self) -> None:
        pods = f"/api/v1/namespaces/{self.namespace}/pods"
        while True:
            try:
                async with self.server.client.get(pods) as response:
                    listing = await response.json() if response.status == 200 else {"items": []}
                for pod in listing.get("items", []):
                    uid = pod["metadata"]["uid"]
                    if uid not in self.seen:
                        self.seen.add(uid)
                        self.pods.append(pod)
                        await self._run_pod(pod)
            # Keep playing kubelet; the test reads the errors.
            except Exception as exc:
                self.errors.append(exc)
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeKubelet]:
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def stored(
    emulator: kmock.KubernetesEmulator, plural: str, namespace: str = "test"
) -> dict[str, dict[str, Any]]:
    """Live objects of one resource in the emulator, by name."""
    found = {}
    for (resource, ns, name), obj in emulator.objects.items():
        if resource.plural == plural and ns == namespace and not obj.deleted:
            found[name] = obj.raw
    return found

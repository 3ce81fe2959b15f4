"""Headless runs from the spawn form on Kubernetes: Jobs the hub creates for the user.

The hub's run pages (:mod:`casaspawner.services.runs`) ask :class:`KubeRuns`. A run is planned
as the user's :class:`~casaspawner.kube.spawner.CASASpawner` plans a session (the operator's
catalog, sizes, images, drains and the user's identity from the login), its script is found in
the user's storage through the hub's read-only mount (``storage_hub_path``, never following the
user's links), and the run's Job (:func:`casaspawner.kube.runs.job_for`: restricted profile, the
user's uid, the session's Cavern mounts, no token; the session pods' labels and scheduling) is
created in the spawner's namespace as the hub's ServiceAccount. Beyond Zero to JupyterHub's hub
Role, that account needs :data:`FORM_RUN_RULES` (``hub-config/z2jh/casa-runs-rbac.yaml``).

A user reaches only their own runs: a run's Job is named from the user's name and the run's id,
and carries the exact name in an annotation checked at every look. Status, output and files are
read from the run's directory through the same mount; a finished Job stays listed until its
``ttlSecondsAfterFinished`` (an hour), its files stay beside the dataset for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import os
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlparse

from jupyterhub.utils import url_path_join
from kubernetes_asyncio.client.exceptions import ApiException

from casaspawner.datasets.tree import listing, open_directory, open_file, subdirectory
from casaspawner.errors import CasaspawnerError, InvalidInput, shown
from casaspawner.kube import jobs
from casaspawner.kube.runs import (
    COMPONENT,
    HOPELESS,
    RUN_DIR,
    RUN_ID,
    RUN_SCRIPT,
    RUN_STORAGE,
    Cluster,
    annotation,
    api_reason,
    container_status,
    failed_condition,
    find_script,
    job_for,
    stored_run,
    unschedulable,
)
from casaspawner.plan import SessionPlan, label_value, make_plan, with_measures
from casaspawner.runtime import RUN_IMAGE_KEY_ENV, RUN_IMAGE_URL_ENV, RUNS_API
from casaspawner.session import runs as shared
from casaspawner.session.prepare import prepare
from casaspawner.session.readers import StorageMountReader, locate_in_storage
from casaspawner.session.record import image_digest

#: What the hub's Role needs beyond Zero to JupyterHub's for runs from the form.
FORM_RUN_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "delete"]},
]
#: The annotation (and, made a label value, the label) naming the run's user.
RUN_USER = "run-user"
#: The label Kubernetes gives a Job's pods: the Job's name.
JOB_NAME = "batch.kubernetes.io/job-name"
#: Seconds a page waits for an API server that does not answer.
PATIENCE = 20.0
#: Seconds Stop waits for the run to say it stopped.
STOP_WAIT = 20.0
#: What each hub user has in flight: one start at a time each, so a re-sent Start waits.
_STARTING: dict[str, asyncio.Lock] = {}


class KubeRuns:
    """Headless runs of one hub user as Kubernetes Jobs, created by the hub.

    ``spawner`` is the user's :class:`~casaspawner.kube.spawner.CASASpawner`: its namespace,
    API client, storage mount, catalog, sizes and images are the run's.
    """

    def __init__(self, spawner: Any) -> None:
        self.spawner = spawner
        if not spawner.storage_hub_path:
            raise InvalidInput(
                "This hub does not see your storage, where a run keeps its files; start a "
                "session and run casaspawner run there."
            )
        self.storage = Path(spawner.storage_hub_path)

    def cluster(self) -> Cluster:
        return Cluster(
            self.spawner.api.api_client,
            self.spawner.namespace,
            self.storage,
            patience=PATIENCE,
            say=self.spawner.log.warning,
            again="if it started: look at your runs again in a minute",
        )

    async def _planned(
        self, dataset: str, script: str, size: str, release: str
    ) -> tuple[SessionPlan, PurePosixPath, str]:
        """The run's plan (its dataset a path in the pod), its script there and its SHA-256."""
        spawner = self.spawner
        options = {"dataset": dataset, "size": size, "release": release, "interface": "lab"}
        settings = spawner.session_settings()
        prepared = await prepare({k: v for k, v in options.items() if v}, settings, spawner)
        identity, layout = prepared.identity, settings.plan.storage
        reader = StorageMountReader(self.storage, layout)
        async with reader.open(dataset, identity) as directory:
            root, relative = locate_in_storage(dataset, identity, layout)
            where = PurePosixPath(root.mount) / relative
            resolution = dataclasses.replace(prepared.resolution, dataset=str(where))
            found, digest = await find_script(
                script, directory, where, resolution, reader, identity, layout
            )
        # As a session's plan, with the dataset where the pod sees it (and the same measures).
        plan = make_plan(identity, prepared.options, settings.catalog, resolution, settings.plan)
        if prepared.measures_version:
            plan = with_measures(plan, prepared.measures_version)
        return plan, found, digest

    async def preview(self, dataset: str, script: str, size: str, release: str) -> dict[str, Any]:
        plan, found, _ = await self._planned(dataset, script, size, release)
        return {
            "dataset": plan.resolution.dataset,
            "release": plan.release.id,
            "label": plan.release.label,
            "exact": plan.exact,
            "approximate": plan.approximate,
            "reason": plan.reason,
            "script": str(found),
            "runs_dir": str(PurePosixPath(plan.resolution.dataset) / shared.RUNS_DIR),
            # The node pulls the image; nothing is prepared on the hub.
            "ready": True,
        }

    async def start(self, dataset: str, script: str, size: str, release: str) -> str:
        """Create the run's Job and return the run's id.

        One start of a user's at a time; the same script running on the same dataset is refused,
        as on one machine.
        """
        lock = _STARTING.setdefault(self.spawner.user.name, asyncio.Lock())
        async with lock:
            return await self._start(dataset, script, size, release)

    async def _start(self, dataset: str, script: str, size: str, release: str) -> str:
        plan, found, digest = await self._planned(dataset, script, size, release)
        runs_dir = PurePosixPath(plan.resolution.dataset) / shared.RUNS_DIR
        for run in await self.runs():
            if (
                run["status"] == "running"
                and PurePosixPath(run["script"]).name == found.name
                and PurePosixPath(run["directory"]).parent == runs_dir
            ):
                raise InvalidInput(
                    f"{found.name} is already running on this dataset (run {run['id']}); stop "
                    "it or wait for its end before starting it again."
                )
        layout = self.spawner.storage_layout()
        root, relative = locate_in_storage(str(runs_dir), plan.identity, layout)
        runs_here = self.storage / root.sub_path / relative
        started = datetime.now(timezone.utc)
        prefix = self.spawner.label_prefix
        user = plan.identity.username
        api = self.hub_api_url()
        secret = getattr(self.spawner.user, "settings", {}).get("cookie_secret")
        cluster = self.cluster()
        for number in range(1, 100):
            run_id = shared.run_name(found.name, started, number)
            if os.path.lexists(runs_here / run_id):
                continue
            # Where the run's pod asks for its image's digest, and the key it asks with.
            key = run_image_key(secret, self.spawner.user.name, run_id) if secret else ""
            asking = {
                RUN_IMAGE_URL_ENV: f"{api}/{self.image_path(run_id)}",
                RUN_IMAGE_KEY_ENV: key,
            }
            job = job_for(
                plan,
                self.spawner.casa_catalog(),
                script=found,
                digest=digest,
                arguments=[],
                started=started,
                run_id=run_id,
                run_dir=runs_dir / run_id,
                storage_path=PurePosixPath(root.sub_path) / relative / run_id,
                deadline=jobs.DEFAULT_DEADLINE,
                ttl=jobs.DEFAULT_TTL,
                settings=self.spawner.pod_settings(),
                labels={
                    **self.spawner.user_pod_labels(),
                    f"{prefix}/{RUN_USER}": label_value(user) or "user",
                },
                annotations={f"{prefix}/{RUN_USER}": user},
                environment=asking if api and key else None,
            )
            job["spec"]["template"]["spec"].update(self.spawner.user_pod_scheduling())
            if await cluster.create(job):
                self.spawner.log.info(
                    "Run %s of %s: Job %s", run_id, user, job["metadata"]["name"]
                )
                return run_id
        raise InvalidInput("Too many runs of this script this second; try again.")

    def hub_api_url(self) -> str | None:
        """The hub's API as the user's pods reach it, as a session's ``$JUPYTERHUB_API_URL``."""
        spawner = self.spawner
        if spawner.hub is None:
            return None
        api = str(spawner.hub.api_url)
        if spawner.hub_connect_url:
            api = str(url_path_join(spawner.hub_connect_url, urlparse(api).path))
        return api.rstrip("/")

    def image_path(self, run_id: str) -> str:
        """The path, under the hub's API, where run ``run_id``'s pod asks for its digest."""
        return f"{RUNS_API}/{quote(self.spawner.user.name, safe='')}/{run_id}/image"

    async def image_digest(self, run_id: str) -> str | None:
        """The digest of the image run ``run_id``'s pod runs: ``sha256:…``, or None before.

        None too while the kubelet has not said what it runs. A run that is not the user's is
        :class:`InvalidInput`.
        """
        identity = await self.spawner.session_identity()
        pod = await self.cluster().pod(jobs.job_name(identity.username, run_id))
        if pod is None:
            raise InvalidInput(f"There is no run {shown(run_id)} of yours here.")
        status = container_status(pod)
        digest = image_digest(status.image_id or "") if status is not None else None
        return f"sha256:{digest}" if digest else None

    async def runs(self) -> list[dict[str, Any]]:
        """The user's runs whose Jobs are there, newest first."""
        identity = await self.spawner.session_identity()
        user = identity.username
        prefix = self.spawner.label_prefix
        selector = ",".join(
            f"{k}={v}"
            for k, v in {
                **COMPONENT,
                f"{prefix}/{RUN_USER}": label_value(user) or "user",
            }.items()
        )
        cluster = self.cluster()
        try:
            found = await cluster.answer(
                cluster.batch.list_namespaced_job, cluster.namespace, label_selector=selector
            )
            # Their pods in one request, not one each.
            pods = await cluster.answer(
                cluster.core.list_namespaced_pod, cluster.namespace, label_selector=selector
            )
        except ApiException as exc:
            raise CasaspawnerError(
                f"Kubernetes refused to list your runs' Jobs in namespace {cluster.namespace}: "
                f"{api_reason(exc)}."
            ) from None
        by_job = {(p.metadata.labels or {}).get(JOB_NAME): p for p in pods.items}
        mine = [job for job in found.items if _user_of(job) == user]
        mine.sort(key=lambda job: annotation(_annotations(job), RUN_ID) or "", reverse=True)
        return [
            await self._summary(cluster, job, pods=by_job) for job in mine[: shared.LIST_LIMIT]
        ]

    async def show(self, run_id: str) -> dict[str, Any]:
        cluster = self.cluster()
        return await self._summary(cluster, await self._job(cluster, run_id), tail=True)

    async def stop(self, run_id: str) -> dict[str, Any]:
        """Stop the run: its pod is deleted and gets SIGTERM, and the run records it stopped.

        The Job stays, failed, so the run stays listed with its sentence. A run without a pod
        yet loses its Job instead.
        """
        cluster = self.cluster()
        job = await self._job(cluster, run_id)
        pod = await cluster.pod(job.metadata.name)
        if pod is None:
            await cluster.delete(job.metadata.name, wait=False)
            return await self._summary(cluster, job, tail=True, deleted=True)
        try:
            await cluster.answer(
                cluster.core.delete_namespaced_pod, pod.metadata.name, cluster.namespace
            )
        except ApiException as exc:
            if exc.status != 404:
                raise CasaspawnerError(
                    f"Kubernetes refused to stop run {run_id}: {api_reason(exc)}."
                ) from None
        deadline = time.monotonic() + STOP_WAIT
        while time.monotonic() < deadline:
            if isinstance(stored_run(self.storage, _annotations(job)).get("result"), dict):
                break
            await asyncio.sleep(1)
        return await self._summary(cluster, job, tail=True)

    async def _job(self, cluster: Cluster, run_id: str) -> Any:
        """The user's run ``run_id``'s Job: by the name only their runs get, checked."""
        identity = await self.spawner.session_identity()
        missing = InvalidInput(f"There is no run {shown(run_id)} of yours here.")
        name = jobs.job_name(identity.username, run_id)
        job = await cluster.job(name)
        if (
            job is None
            or _user_of(job) != identity.username
            or annotation(_annotations(job), RUN_ID) != run_id
        ):
            raise missing
        return job

    async def _summary(
        self,
        cluster: Cluster,
        job: Any,
        tail: bool = False,
        deleted: bool = False,
        pods: dict[str | None, Any] | None = None,
    ) -> dict[str, Any]:
        """A run's status and its sentence, from its file, else from its Job and pod.

        ``pods`` are the runs' pods by Job name, when they were listed already.
        """
        annotations = _annotations(job)
        run_id = annotation(annotations, RUN_ID) or job.metadata.name
        where = annotation(annotations, RUN_DIR) or ""
        run = stored_run(self.storage, annotations)
        result = run.get("result") if isinstance(run.get("result"), dict) else None
        pod = None
        if result is None and not deleted:
            name = job.metadata.name
            pod = pods.get(name) if pods is not None else await cluster.pod(name)
            result = _pod_result(job, pod)
        if result is not None:
            _, sentence = shared.ending_sentence(run_id, {**run, "result": result}, where)
            status = str(result.get("status") or "failed")
        elif deleted:
            status, sentence = "running", f"run {run_id} is stopping."
        else:
            status = "running"
            sentence = f"run {run_id} is running; its output and CASA log go to {where}."
            waiting = unschedulable(pod)
            if waiting:
                sentence = f"run {run_id} waits for a node: {waiting}"
        prefix = self.spawner.label_prefix
        found = {
            "id": run_id,
            "status": status,
            "sentence": sentence[:1].upper() + sentence[1:],
            "directory": where,
            "dataset": run.get("dataset") or annotations.get(f"{prefix}/dataset", ""),
            "label": run.get("label") or self._label(job),
            "reason": run.get("reason") or annotations.get(f"{prefix}/reason", ""),
            "script": run.get("script") or annotation(annotations, RUN_SCRIPT) or "",
            "started": run.get("started", ""),
            "ended": (result or {}).get("ended", ""),
        }
        if tail:
            found.update(self._files(annotations))
            found["casa_log"] = run.get("casa_log", "")
        return found

    def _label(self, job: Any) -> str:
        """The label of the run's CASA release, from its Job's labels."""
        release = (job.metadata.labels or {}).get(f"{self.spawner.label_prefix}/release")
        catalog = self.spawner.casa_catalog()
        return str(catalog.get(release).label) if release in catalog else ""

    def _files(self, annotations: dict[str, str]) -> dict[str, Any]:
        """The run directory's files and the end of its output, read without following links."""
        relative = annotation(annotations, RUN_STORAGE)
        path = PurePosixPath(relative or "")
        files: list[str] = []
        output = ""
        if relative and not path.is_absolute() and ".." not in path.parts:
            with contextlib.suppress(OSError, ValueError), open_directory(self.storage) as base:
                with subdirectory(base, path) as there:
                    for name, kind in listing(there) if there is not None else []:
                        if not name.startswith("."):
                            files.append(name + ("/" if kind == "dir" else ""))
                with open_file(base, path / shared.OUTPUT_LOG) as handle:
                    if handle is not None:
                        output = shared.log_tail(handle)
        return {"files": sorted(files), "output": output}


def run_image_key(secret: bytes | str, user: str, run_id: str) -> str:
    """The key hub user ``user``'s run ``run_id`` asks the hub for its digest with.

    An HMAC of the two under the hub's cookie secret: the hub checks it before looking anything
    up, and it opens nothing but that run's digest.
    """
    key = secret.encode() if isinstance(secret, str) else secret
    message = f"casaspawner run image\n{user}\n{run_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _pod_result(job: Any, pod: Any | None) -> dict[str, Any] | None:
    """How a run ended that wrote no result: its pod never started, or it was lost."""
    status = container_status(pod)
    state = status.state if status is not None else None
    waiting = state.waiting if state is not None else None
    if waiting is not None and waiting.reason in HOPELESS:
        why = f"{waiting.reason}: {waiting.message or ''}".strip(": ")
        return {"status": "failed", "error": f"its pod could not start ({why})"}
    failed = failed_condition(job)
    if failed is not None and (pod is None or pod.status.phase in ("Failed", "Succeeded")):
        return {"status": "lost", "why": f"its pod ended without a result ({failed})"}
    return None


def _annotations(job: Any) -> dict[str, str]:
    return dict(job.metadata.annotations or {})


def _user_of(job: Any) -> str | None:
    return annotation(_annotations(job), RUN_USER)

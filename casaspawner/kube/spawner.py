"""``CASASpawner``: a KubeSpawner running the CASA build that processed a dataset.

Thin by design: :class:`~casaspawner.spawners.mixin.CASASessionMixin` runs the session pipeline,
:mod:`casaspawner.kube.objects` turns the plan into KubeSpawner fields, and KubeSpawner does
all Kubernetes API work. The user's access token never goes to Kubernetes: the session fetches it
once from the hub (:meth:`CASASpawner.hand_out_access_token`). Registered as the ``casa`` spawner
(``c.JupyterHub.spawner_class = "casa"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from jupyterhub.utils import exponential_backoff, maybe_future
from kubernetes_asyncio.client.rest import ApiException
from kubespawner import KubeSpawner
from tornado import web
from traitlets import Bool, Dict, Float, Integer, List, Unicode, default, validate

from casaspawner.datasets.storage import STORAGE
from casaspawner.errors import CasaspawnerError, ConfigurationError, InvalidInput
from casaspawner.insession.record import entity
from casaspawner.kube import api, apps, events, objects, podsecurity
from casaspawner.kube.quantities import quantity_bytes
from casaspawner.kube.reflector import WatchedPodReflector
from casaspawner.plan import SessionPlan
from casaspawner.runtime import RECORD_ACTION_ID, RECORD_FILE
from casaspawner.session.measures import measures_for
from casaspawner.session.options import OUTPUT_KEY
from casaspawner.session.readers import StorageMountReader
from casaspawner.session.record import Runtime, image_digest
from casaspawner.spawners.errors import spawn_error
from casaspawner.spawners.mixin import CASASessionMixin
from casaspawner.spawners.records import SessionRecords

#: Answers of the Kubernetes API that a later attempt may not get.
#:
#: Too many requests, and a gateway or an API server that is starting or going away.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
#: What a request to the Kubernetes API raises when the connection itself fails.
CONNECTION_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)
#: The longest a starting spawn waits for its pod to change before it looks again.
#:
#: What changes without the pod does: the events a failure is read from, the claim wait's clock,
#: the reflector, replaced after its watch failed.
RECHECK_SECONDS = 2.0


def _reflector_broken(reflector: Any) -> bool:
    """Whether a shared reflector can never deliver.

    Its first list failed, or its watch task ended.
    """
    loaded = reflector.first_load_future
    if loaded.done() and (loaded.cancelled() or loaded.exception() is not None):
        return True
    task = reflector.watch_task
    return bool(loaded.done() and task is not None and task.done())


def _read_own_file(path: Path, limit: int = 1 << 20) -> Any:
    """The JSON in ``path``, a regular file that is not a link, of at most ``limit`` bytes."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        return json.loads(handle.read(limit + 1)[:limit])


def _status_message(exc: ApiException) -> str:
    """The message of the Kubernetes ``Status`` an ``ApiException`` carries, else its reason."""
    try:
        message = json.loads(exc.body or "")["message"]
    except (ValueError, TypeError, KeyError):
        message = None
    return str(message or exc.reason or exc.status)


class _AfterPodCreated:
    """``after_pod_created_hook`` reporting the operator's hook's failure in one sentence."""

    def __init__(self, user_hook: Any) -> None:
        self.user_hook = user_hook

    async def __call__(self, spawner: CASASpawner, pod: dict[str, Any]) -> None:
        await spawner.call_hook("after_pod_created_hook", self.user_hook, spawner, pod)


class _ModifyPod:
    """``modify_pod_hook``: the operator's hook, then the checks of the final pod.

    The pod is checked against ``pod_security_level`` and for the access token, so what
    KubeSpawner submits is exactly what was checked. The operator's hook gets KubeSpawner's
    ``V1Pod``; what follows gets the pod as plain JSON data, serialised once for the check and
    the request alike (a :class:`~casaspawner.kube.api.Manifest`, which the request sends as it
    is).
    """

    def __init__(self, user_hook: Any = None) -> None:
        self.user_hook = user_hook

    async def __call__(self, spawner: CASASpawner, pod: Any) -> Any:
        if self.user_hook is not None:
            pod = await spawner.call_hook("modify_pod_hook", self.user_hook, spawner, pod)
            if pod is None:
                raise spawn_error(
                    "The hub's configured modify_pod_hook returned nothing instead of the pod.",
                    "hook",
                    500,
                )
        manifest = api.Manifest(spawner.api.api_client.sanitize_for_serialization(pod))
        spawner.check_pod_security(manifest)
        return manifest


# KubeSpawner ships no type hints.
class CASASpawner(SessionRecords, CASASessionMixin, KubeSpawner):  # type: ignore[misc]
    """Start one CASA session pod per server, as the session plan says.

    Image, storage, identity and labels come from the plan.
    """

    storage_volume = Dict(
        {"persistentVolumeClaim": {"claimName": "cavern"}},
        help="""
        Kubernetes volume source of the shared storage (Cavern) holding ``home/<user>`` and
        ``projects/<group>``: exactly one of ``persistentVolumeClaim`` (default: the claim
        ``cavern``), ``csi``, ``cephfs``, ``nfs`` or ``hostPath``, written as in a pod spec.
        Inline ``cephfs`` and ``nfs`` need ``pod_security_level = "baseline"`` and ``hostPath``
        needs ``"privileged"`` (namespaces enforcing the restricted Pod Security Standard refuse
        them); bind such storage to a PersistentVolume and claim instead.
        """,
    ).tag(config=True)

    measures_volume = Dict(
        {"persistentVolumeClaim": {"claimName": "casa-measures", "readOnly": True}},
        help="""
        Kubernetes volume source of the CASA measures data (mounted read-only at
        ``measures_mount_path``): one of ``persistentVolumeClaim`` (default: the claim
        ``casa-measures``), ``csi``, ``cephfs``, ``nfs`` or ``hostPath``. As for
        ``storage_volume``, inline ``cephfs`` and ``nfs`` need ``pod_security_level =
        "baseline"`` and ``hostPath`` needs ``"privileged"``.
        """,
    ).tag(config=True)

    measures_versions_hub_path = Unicode(
        None,
        allow_none=True,
        help="""
        Hub-side path of a read-only mount of ``measures_volume``, when that volume keeps the
        measures data one directory per version (``<version>/geodetic``, ``<version>/ephemerides``
        …, names sorting oldest first, e.g. ``2026-12-01``). Each session then mounts one version
        by sub-path: a new session the newest, a "Relaunch exactly" the one its past session
        read, refused in one sentence once that directory is gone. Directories named ``.<…>``
        (a version being copied in) and links are never chosen. Unset (the default): the volume
        is one measures tree, mounted whole, and a relaunch reads it as it is now.
        """,
    ).tag(config=True)

    tmp_size_limit = Unicode(
        "1Gi",
        help="""
        Size limit of the session's writable ``/tmp`` (an emptyDir; the image's root file system
        is read-only), as a Kubernetes quantity such as ``1Gi``. The container's
        ``ephemeral-storage`` limit is this plus ``scratch_size_limit``.
        """,
    ).tag(config=True)

    token_mount_dir = Unicode(
        "/var/run/secrets/casaspawner",
        help="""
        Directory where the user's access token appears as the file ``token``
        (``CASASPAWNER_TOKEN_FILE`` names it): a memory-backed emptyDir the session writes the
        token into, once it fetched it from the hub. Users without a token in ``auth_state`` get
        no such directory.
        """,
    ).tag(config=True)

    access_token_from_pod_address = Bool(
        True,
        help="""
        Hand the user's access token only to a request from the session pod's own address (its
        ``podIP``, as the hub's pod watch sees it), besides the server's own API token and once
        per session. Turn it off only where sessions reach the hub through a translated address
        (a NAT, a proxy); the token is then handed to the first request with the server's API
        token, which Kubernetes users who may read pods can see in the pod's environment.
        """,
    ).tag(config=True)

    pod_security_level = Unicode(
        "restricted",
        help="""
        Pod Security Standard level session pods must meet: ``restricted`` (default; storage and
        measures volumes may only be ``persistentVolumeClaim`` or ``csi``), ``baseline`` (also
        inline ``cephfs`` and ``nfs``) or ``privileged`` (also ``hostPath``). The session's own
        container is always hardened to *restricted*; the whole final pod — with the operator's
        volumes, init and extra containers, ``extra_*_config`` and ``modify_pod_hook`` applied —
        is checked against this level before it is submitted, and a pod that breaks it is refused
        with a sentence naming the first problem.
        """,
    ).tag(config=True)

    unschedulable_is_fatal = Bool(
        True,
        help="""
        End a spawn as soon as Kubernetes reports that no node can run the pod
        (``FailedScheduling``). Turn off on clusters whose autoscaler adds nodes for pending
        pods.
        """,
    ).tag(config=True)

    claim_wait_timeout = Float(
        60,
        help="""
        Seconds a spawn waits, once the scheduler has said that a volume claim of the session
        pod (or the volume it is bound to) is missing or not yet bound, before it ends with that
        sentence. A provisioner may still be binding a new claim, and after an API server
        restart the scheduler may not have seen a claim or volume made moments before; both
        pass by themselves. Other scheduling
        failures end the spawn at once (``unschedulable_is_fatal``).
        """,
    ).tag(config=True)

    complete_killed_records = Bool(
        True,
        help="""
        Complete the reproducibility record of a session that was killed before it could (out
        of memory, a lost node, a forced delete): after the server stops, if the record in the
        user's storage (read through ``storage_hub_path``) has no end time, a short pod of the
        session's image adds it, as the user, with the user's storage mounted and nothing else,
        then is deleted. Without ``storage_hub_path`` the hub cannot see the record, and no such
        pod is started.
        """,
    ).tag(config=True)

    desktop_apps = Bool(
        False,
        help="""
        Let CASA desktops add apps of other catalog releases (plotms, the viewer, a CASA
        terminal) from their menu. Each app runs in a pod of its release's image, as the user,
        with the session's storage and no token, created by the hub's
        ``/hub/api/casa-apps`` on a request carrying the session's own token; it draws on the
        desktop's X server, which then also listens on TCP, guarded by an X cookie in the
        user's home and by two NetworkPolicies that admit the session's own app pods alone.
        The hub's ServiceAccount needs ``hub-config/z2jh/casa-apps-rbac.yaml``, and session pods
        need Zero to JupyterHub's NetworkPolicy for user pods (``singleuser.networkPolicy``, on
        by default): a pod selected by the desktop's policy alone would admit nothing but X.
        """,
    ).tag(config=True)

    desktop_apps_limit = Integer(
        8,
        min=1,
        help="""
        How many apps of other releases one desktop may have open at once (``desktop_apps``);
        each is a pod asking for 0.1 CPU and 256 MiB, limited to the session's size. Closed
        apps' pods are removed when the desktop asks for another.
        """,
    ).tag(config=True)

    #: The environment variables the last session's plan set (``apply_plan`` replaces them).
    _session_keys: frozenset[str] = frozenset()

    record_command = List(
        Unicode(),
        default_value=["python", "-m", "casaspawner.insession.record", "stop"],
        help="""
        The command that completes a record in the session's image, given the record's
        directory as its last argument. casaspawner's images have it on ``PATH``.
        """,
    ).tag(config=True)

    plan_traits = (
        "image",
        "cmd",
        "default_url",
        "working_dir",
        "environment",
        "volumes",
        "volume_mounts",
        "uid",
        "gid",
        "fs_gid",
        "supplemental_gids",
        "privileged",
        "allow_privilege_escalation",
        "pod_security_context",
        "container_security_context",
        "automount_service_account_token",
        "service_account",
        "extra_labels",
        "extra_annotations",
        "cpu_guarantee",
        "cpu_limit",
        "mem_guarantee",
        "mem_limit",
        "extra_resource_limits",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The authorizer's last refusal this spawn, while it may still pass.
        self._refusal: ApiException | None = None
        # What completes the stopped session's record, should it need it: pod, directory, plan.
        self._record_completion: tuple[dict[str, Any], str, SessionPlan] | None = None
        # The access token the running session has yet to fetch, and whether it fetched it.
        self._token_to_hand: str | None = None
        self._token_handed = False
        # When this spawn first saw its pod in trouble (monotonic seconds).
        self._trouble_since: float | None = None
        # Until when this start waits for its pod to run (the event loop's clock).
        self._start_wait_until: float | None = None
        super().__init__(*args, **kwargs)

    @default("cmd")
    def _cmd_default(self) -> list[str]:
        return ["jupyterhub-singleuser"]

    @validate("after_pod_created_hook")
    def _report_hook_failures(self, proposal: Any) -> _AfterPodCreated | None:
        value = proposal["value"]
        if value is None or isinstance(value, _AfterPodCreated):
            return value
        return _AfterPodCreated(value)

    @default("modify_pod_hook")
    def _modify_pod_default(self) -> _ModifyPod:
        return _ModifyPod()

    @validate("modify_pod_hook")
    def _keep_pod_security_check(self, proposal: Any) -> _ModifyPod:
        value = proposal["value"]
        return value if isinstance(value, _ModifyPod) else _ModifyPod(value)

    # Configuration
    def check_config(self) -> None:
        """The shared checks, plus this spawner's quantities, volumes and level."""
        super().check_config()
        for name in ("scratch_size_limit", "tmp_size_limit"):
            value = getattr(self, name)
            if not quantity_bytes(value):
                raise ConfigurationError(
                    f"{self.option(name)} is {value!r}, not a Kubernetes quantity of bytes such "
                    "as '20Gi'"
                )
        sources = (("storage", self.storage_volume), ("measures data", self.measures_volume))
        try:
            for what, source in sources:
                objects.volume_source(source, what, self.pod_security_level)
        except InvalidInput as exc:
            raise ConfigurationError(str(exc)) from None

    def check_pod_security(self, pod: dict[str, Any]) -> None:
        """Refuse, in one sentence, a final pod the hub may not submit.

        That is a pod that breaks ``pod_security_level``, or one that carries the user's access
        token itself (put there by an operator's hook or setting) instead of only the token file.
        """
        level = self.pod_security_level
        problem = podsecurity.pod_security_sentence(
            podsecurity.pod_security_violations(pod, level), level
        )
        token = self.access_token
        if not problem and token and token in json.dumps(pod, ensure_ascii=False):
            problem = (
                "The hub's configuration put the user's access token into the pod itself; it may "
                "reach the session only as the token file."
            )
        if problem:
            self.log.error("Refusing the pod of %s: %s", self.user.name, problem)
            raise spawn_error(problem, reason="pod-security", status_code=500)

    @property
    def lean_api(self) -> Any:
        """KubeSpawner's API client, without its per-request environment lookups.

        The spawn's own request (the pod) goes through it; see
        :func:`casaspawner.kube.api.lean_core_api`.
        """
        return api.lean_core_api(self.api)

    # The plan
    @property
    def token_url(self) -> str | None:
        """Where this session fetches the user's access token; None when the user has none."""
        if not self.access_token:
            return None
        names = f"{quote(self.user.name, safe='')}/{quote(self.name or '', safe='')}"
        return f"{self.hub.api_url.rstrip('/')}/{objects.TOKEN_PATH}/{names}"

    def pod_settings(self) -> objects.PodSettings:
        return objects.PodSettings(
            storage_volume=self.storage_volume,
            measures_volume=self.measures_volume,
            scratch_size_limit=self.scratch_size_limit,
            tmp_size_limit=self.tmp_size_limit,
            token_url=self.token_url,
            token_mount_dir=self.token_mount_dir,
            command=tuple(self.cmd or ["jupyterhub-singleuser"]),
            security_level=self.pod_security_level,
        )

    def user_pod_labels(self) -> dict[str, str]:
        """The labels the user's session pods get (KubeSpawner's and the operator's).

        Zero to JupyterHub's NetworkPolicy for user pods selects on them, so the runs and apps
        the hub starts for the user are held to what a session may reach (no cloud metadata
        server, say).
        """
        labels: dict[str, str] = self._build_pod_labels(self._expand_all(self.extra_labels))
        return labels

    def user_pod_scheduling(self) -> dict[str, Any]:
        """Where the user's session pods may run, as pod spec fields: the same nodes.

        The operator's node selector, tolerations, node affinity, scheduler and priority class
        (Zero to JupyterHub's ``scheduling.userPods``, say).
        """
        found: dict[str, Any] = {}
        if self.node_selector:
            found["nodeSelector"] = dict(self.node_selector)
        tolerations = self._sorted_dict_values(self.tolerations)
        if tolerations:
            found["tolerations"] = list(tolerations)
        required = self._sorted_dict_values(self.node_affinity_required)
        preferred = self._sorted_dict_values(self.node_affinity_preferred)
        if required or preferred:
            affinity: dict[str, Any] = {}
            if required:
                affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
                    "nodeSelectorTerms": list(required)
                }
            if preferred:
                affinity["preferredDuringSchedulingIgnoredDuringExecution"] = list(preferred)
            found["affinity"] = {"nodeAffinity": affinity}
        if self.scheduler_name:
            found["schedulerName"] = self.scheduler_name
        if self.priority_class_name:
            found["priorityClassName"] = self.priority_class_name
        return found

    async def measures_version(self, earlier: str | None) -> str | None:
        """The newest measures version kept, or ``earlier``'s; see measures_versions_hub_path."""
        if not self.measures_versions_hub_path:
            return None
        # A network mount may be slow: from the hub's storage threads.
        look = functools.partial(measures_for, Path(self.measures_versions_hub_path), earlier)
        what = "the measures data"
        return await STORAGE.call(look, deadline=self.resolve_timeout, what=what)

    def apply_plan(self, plan: SessionPlan) -> None:
        super().apply_plan(plan)
        # The image's digest is known only once the pod runs; see image_id.
        runtime = Runtime("image", plan.image, None, "the image the pod ran")
        session = {
            **plan.environment,
            **self.notices_environment(plan),
            **self.record_environment(
                plan, runtime, self.storage_layout(), self.measures_mount_path
            ),
        }
        if self.desktop_apps and plan.options.interface == "desktop":
            session |= apps.SESSION_ENVIRONMENT
        # KubeSpawner expands templates in the environment; the session's values are as written.
        # The last session's own variables go first: a lab after a desktop has no desktop's.
        kept = {k: v for k, v in self.environment.items() if k not in self._session_keys}
        self._session_keys = frozenset(session)
        self.environment = {**kept, **objects.literal(session)}
        fields = objects.session_fields(
            plan,
            self.pod_settings(),
            environment=self.environment,
            volumes=self.volumes,
            volume_mounts=self.volume_mounts,
            extra_labels=self.extra_labels,
            extra_annotations=self.extra_annotations,
            extra_resource_limits=self.extra_resource_limits,
        )
        for name, value in fields.items():
            setattr(self, name, value)

    async def load_user_options(self) -> None:
        """Profiles first (KubeSpawner), then the session plan, so the plan always wins.

        The form offers no profiles, so KubeSpawner applies its default profile (the one marked
        ``default``, else the first) of ``profile_list``.
        """
        plan = await self.prepare_session()
        await super().load_user_options()
        self.apply_plan(plan)

    def start(self) -> asyncio.Future[Any]:
        """Start the pod as KubeSpawner does; once it answers, record the session."""
        future: asyncio.Future[Any] = super().start()
        future.add_done_callback(self._record_started)
        return future

    def _record_started(self, future: asyncio.Future[Any]) -> None:
        if self.session_plan is not None and not future.cancelled() and not future.exception():
            self.record_session(self.session_plan)
            self.record_image_digest()

    def image_id(self) -> str | None:
        """The running session container's ``imageID``, from the pod's status."""
        pod = self.pod_reflector.pods.get(f"{self.namespace}/{self.pod_name}")
        statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
        for status in statuses:
            if status.get("name") == objects.CONTAINER and status.get("imageID"):
                return str(status["imageID"])
        return None

    def record_image_digest(self) -> None:
        """Put the image's digest beside the summary, in the log and in the past sessions."""
        digest = image_digest(self.image_id() or "")
        output = self.user_options.get(OUTPUT_KEY)
        if digest is None or not isinstance(output, dict):
            return
        output["image_digest"] = f"sha256:{digest}"
        orm_spawner = getattr(self, "orm_spawner", None)
        if orm_spawner is not None:
            orm_spawner.user_options = dict(self.user_options)
        if self.session_plan is not None:
            self.remember_session(self.session_plan, digest)
        self.log.info("CASA session of %s runs %s@sha256:%s", self.user.name, self.image, digest)

    async def _start(self) -> str:
        """KubeSpawner's start; the session may then fetch the user's access token once."""
        self._refusal, self._trouble_since, self._start_wait_until = None, None, None
        self._token_to_hand, self._token_handed = self.access_token, False
        try:
            url: str = await super()._start()
        except asyncio.TimeoutError:
            # The API kept refusing the hub until the retries ran out: say what it said.
            if self._refusal is not None:
                raise self.pod_refusal(self._refusal) from None
            raise
        return url

    def hand_out_access_token(self, api_token: str | None, address: str) -> str:
        """The user's access token, once per session, to the session's own pod.

        ``api_token`` is the token the request carried and ``address`` the request's peer (the
        socket's, never a forwarded header's). Refusals are :class:`tornado.web.HTTPError` with
        one sentence; 503 means the hub's pod watch has not seen the pod's address yet.
        """
        if self._token_handed:
            raise web.HTTPError(409, "This session fetched its access token already.")
        token = self._token_to_hand
        if token is None:
            raise web.HTTPError(
                404,
                "The hub holds no access token for this session: the user has none, or the hub "
                "restarted since the session started (stop and start it to get one).",
            )
        if not (api_token and self.api_token and hmac.compare_digest(api_token, self.api_token)):
            raise web.HTTPError(403, "Only the session's own server may fetch its access token.")
        if self.access_token_from_pod_address:
            pod = self.pod_reflector.pods.get(f"{self.namespace}/{self.pod_name}")
            addresses = objects.pod_addresses(pod) if pod else set()
            if not addresses:
                raise web.HTTPError(503, "The hub has not seen the session's pod yet.")
            if objects.plain_address(address) not in addresses:
                self.log.warning(
                    "Refused the access token of %s to %s, not its pod", self.pod_name, address
                )
                raise web.HTTPError(403, "Only the session's own pod may fetch its access token.")
        self._token_to_hand, self._token_handed = None, True
        self.log.info("Handed the access token to the session pod %s", self.pod_name)
        return token

    async def stop(self, now: bool = False) -> None:
        """Delete the pod as KubeSpawner does; a token not fetched is no longer handed out.

        The session's plan is still known here, not after: what could complete its record is
        kept for :meth:`complete_record`.
        """
        self._token_to_hand = None
        await super().stop(now)
        plan, directory = self.session_plan, self.session_record_dir
        if plan is None or directory is None or not self.complete_killed_records:
            return
        labels = {**self._build_common_labels({}), "component": "casa-record"}
        pod = objects.record_pod(
            plan,
            self.pod_settings(),
            name=f"{self.pod_name}-record",
            image=self.image,
            command=[*self.record_command, directory],
            labels=labels,
        )
        self._record_completion = (pod, directory, plan)

    async def complete_record(self) -> None:
        """Complete the record of a session killed before it could, in a pod, as the user."""
        pending, self._record_completion = self._record_completion, None
        await super().complete_record()
        if pending is None:
            return
        pod, directory, plan = pending
        if not await self._record_unfinished(directory, plan):
            return
        name = pod["metadata"]["name"]
        self.log.info("Completing the record %s of %s in pod %s", directory, self.user.name, name)
        try:
            await api.send(
                self.api.create_namespaced_pod,
                self.namespace,
                pod,
                timeout=self.k8s_api_request_timeout,
            )
            phase = await self._record_pod_end(name)
        except (ApiException, *CONNECTION_ERRORS) as exc:
            self.log.warning("The record %s could not be completed: %s", directory, exc)
            phase = None
        finally:
            with contextlib.suppress(ApiException, *CONNECTION_ERRORS):
                await self.api.delete_namespaced_pod(
                    name,
                    self.namespace,
                    grace_period_seconds=0,
                    _request_timeout=self.k8s_api_request_timeout,
                )
        if phase != "Succeeded":
            self.log.warning(
                "The record %s was not completed (pod %s: %s)", directory, name, phase
            )

    async def _record_unfinished(self, directory: str, plan: SessionPlan) -> bool:
        """Whether the record in ``directory`` exists without an end time, as the hub sees it."""
        if self.storage_hub_path is None:
            return False
        layout = self.storage_layout()
        reader = StorageMountReader(self.storage_hub_path, layout, deadline=self.resolve_timeout)
        try:
            async with reader.open(directory, plan.identity) as found:
                read = functools.partial(_read_own_file, found / RECORD_FILE)
                record = await STORAGE.call(read, deadline=reader.deadline, what="the record")
        except (CasaspawnerError, OSError, ValueError):
            return False
        action = entity(record, RECORD_ACTION_ID) if isinstance(record, dict) else None
        return action is not None and "endTime" not in action

    async def _record_pod_end(self, name: str, timeout: float = 150) -> str | None:
        """The phase the record pod ends in, or the last one seen when ``timeout`` ran out."""
        deadline = asyncio.get_running_loop().time() + timeout
        phase = None
        while asyncio.get_running_loop().time() < deadline:
            pod = await self.api.read_namespaced_pod(name, self.namespace)
            phase = pod.status.phase if pod.status else None
            if phase in ("Succeeded", "Failed"):
                break
            await asyncio.sleep(1)
        return phase

    async def dry_run_manifests(self) -> dict[str, Any]:
        """What a spawn of ``user_options`` would submit, with no cluster.

        The steps JupyterHub runs before ``start`` run in its order (``auth_state_hook``,
        ``group_overrides``, ``apply_user_options``, ``pre_spawn_hook``), then
        :meth:`session_manifests`. ``Authenticator.pre_spawn_start`` is not run (there is no
        authenticator), nor anything after the pod exists (``after_pod_created_hook``, internal
        SSL).
        """
        await self.run_auth_state_hook(await self.user.get_auth_state())
        await self.apply_group_overrides()
        await self._run_apply_user_options(self.user_options)
        await self.run_pre_spawn_hook()
        return await self.session_manifests()

    async def session_manifests(self) -> dict[str, Any]:
        """The pod ``start`` would submit from here; no API calls.

        Same path as KubeSpawner's ``_start``: ``load_user_options`` (profile, then plan),
        ``get_pod_manifest``, ``modify_pod_hook`` (the operator's hook, then the Pod Security
        check).
        """
        await self.load_user_options()
        pod = await self.get_pod_manifest()
        if self.modify_pod_hook:
            pod = await maybe_future(self.modify_pod_hook(self, pod))
        manifest = self.api.api_client.sanitize_for_serialization(pod)
        return {"apiVersion": "v1", "kind": "Pod", **manifest}

    async def _make_create_pod_request(self, pod: dict[str, Any], request_timeout: float) -> bool:
        """Create the pod (one attempt).

        A pod the cluster refuses (Pod Security admission, a quota) ends the spawn with one
        sentence; a lost connection or a busy API server is tried again.
        """
        try:
            created = await self._create_pod_once(pod, request_timeout)
        except ApiException as exc:
            if self.refused_for_now(exc):
                return False
            if exc.status in TRANSIENT_STATUSES:
                self.log.warning(
                    "Creating the pod failed (%s %s); trying again", exc.status, exc.reason
                )
                return False
            if exc.status >= 500:
                raise
            raise self.pod_refusal(exc) from None
        except CONNECTION_ERRORS as exc:
            self.log.warning("Creating the pod failed (%s); trying again", type(exc).__name__)
            return False
        self._refusal = None
        return created

    async def _create_pod_once(self, pod: dict[str, Any], request_timeout: float) -> bool:
        """KubeSpawner's pod request, its answer unread; whether the pod was created.

        As KubeSpawner does, a request that times out is tried again, and a pod of the same name
        left over is deleted and the request tried again; but not the pod of a request that timed
        out and yet created it (a busy API server), which is this start's.
        """
        name = pod["metadata"]["name"]
        self.log.info("Attempting to create pod %s, with timeout %s", name, request_timeout)
        try:
            await api.send(
                self.lean_api.create_namespaced_pod,
                self.namespace,
                pod,
                timeout=request_timeout,
            )
        except asyncio.TimeoutError:
            return False
        except ApiException as exc:
            if exc.status != 409:
                raise
            if await self._pod_is_this_starts(name, request_timeout):
                self.log.info("Pod %s was created by a request that timed out", name)
                return True
            self.log.info("Found existing pod %s, attempting to kill", name)
            # KubeSpawner's stop alone: this spawn goes on, its token and record with it.
            await KubeSpawner.stop(self, True)
            return False
        return True

    async def _pod_is_this_starts(self, name: str, request_timeout: float) -> bool:
        """Whether the pod ``name`` carries this start's API token, new for each start."""
        try:
            pod = await asyncio.wait_for(
                self.api.read_namespaced_pod(name, self.namespace), request_timeout
            )
        except (ApiException, *CONNECTION_ERRORS):
            return False
        if pod.metadata.deletion_timestamp is not None:
            return False
        for container in pod.spec.containers:
            for variable in container.env or ():
                if variable.name == "JUPYTERHUB_API_TOKEN" and variable.value:
                    mine = (self.api_token or "").encode()
                    return bool(mine) and hmac.compare_digest(variable.value.encode(), mine)
        return False

    def refused_for_now(self, exc: ApiException) -> bool:
        """Whether the API refused the hub for now; the request is then tried again.

        See :func:`casaspawner.kube.events.refused_for_now`. The refusal is kept for the
        sentence, should it last.
        """
        if not events.refused_for_now(exc.status, _status_message(exc)):
            return False
        self.log.warning("The Kubernetes API refused the hub (%s); trying again", exc.reason)
        self._refusal = exc
        return True

    def pod_refusal(self, exc: ApiException) -> web.HTTPError:
        """The one sentence for a pod the Kubernetes API refused."""
        message, status = events.refusal_sentence(exc.status, _status_message(exc))
        self.log.error("Kubernetes refused the pod of %s: %s", self.user.name, message)
        return spawn_error(message, reason="refused", status_code=status)

    def _expand_user_properties(self, template: str, slug_scheme: str | None = None) -> str:
        """KubeSpawner's template expansion, skipped for text without a template.

        KubeSpawner computes every slug of the user's name for each value it expands, about 60
        per session pod; the result for text without braces is the text itself.
        """
        if "{" not in template and "}" not in template:
            return template
        expanded: str = super()._expand_user_properties(template, slug_scheme)
        return expanded

    # Reflectors
    async def _start_reflector(
        self, kind: str, reflector_class: Any, replace: bool = False, **kwargs: Any
    ) -> Any:
        """KubeSpawner's shared pod or event reflector, surviving a failed first list.

        KubeSpawner 7.1 fails the spawn when the reflector's first list gets a server error
        (500, 503 from a proxy …), and keeps the broken reflector, so the next spawn waits until
        it times out. Here the list is tried again for up to ``k8s_api_request_retry_timeout``
        seconds, and a reflector whose first list failed (or whose watch gave up) is replaced.
        A refusal (403) is tried again too: an API server that has just started refuses until
        it has read the Roles. One that lasts is one sentence. The pod reflector is a
        :class:`WatchedPodReflector`, so a start ends as soon as the watch shows its pod running.
        """
        if kind == "pods":
            reflector_class = WatchedPodReflector
        previous = type(self).reflectors.get(self._get_reflector_key(kind))
        if previous is not None and not replace and _reflector_broken(previous):
            self.log.warning(
                "Replacing the %s reflector: its first list failed or its watch gave up", kind
            )
            replace = True
        retry, failed = replace, False
        refused: str | None = None

        async def attempt() -> Any:
            nonlocal retry, failed, refused
            current = type(self).reflectors.get(self._get_reflector_key(kind))
            if failed and current is not None and not _reflector_broken(current):
                # Another spawn replaced the failed reflector meanwhile. Replacing the new one
                # would stop its watch under that spawn (KubeSpawner's stop then raises there).
                retry = False
            try:
                return await super(CASASpawner, self)._start_reflector(
                    kind, reflector_class, replace=retry, **kwargs
                )
            except ApiException as exc:
                if exc.status < 500 and exc.status not in (403, 429):
                    raise
                if exc.status == 403:
                    refused = f"{exc.status} {exc.reason}"
                self.log.warning(
                    "Listing %s failed (%s %s); trying again", kind, exc.status, exc.reason
                )
            # A proxy's error page is a ValueError.
            except (*CONNECTION_ERRORS, ValueError) as exc:
                self.log.warning("Listing %s failed (%s); trying again", kind, type(exc).__name__)
            # The failed reflector stays registered: replace it. Its failure is told here, so
            # its first load's exception counts as retrieved.
            broken = type(self).reflectors.get(self._get_reflector_key(kind))
            loaded = broken.first_load_future if broken is not None else None
            if loaded is not None and loaded.done() and not loaded.cancelled():
                loaded.exception()
            retry = failed = True
            return None

        try:
            return await exponential_backoff(
                attempt,
                f"Could not list {kind} from the Kubernetes API",
                timeout=self.k8s_api_request_retry_timeout,
            )
        except asyncio.TimeoutError:
            if refused is None:
                raise
            message = (
                f"The Kubernetes API refused the hub's request to list {kind} in namespace "
                f"{self.namespace} ({refused}); the hub's Role must allow it."
            )
            raise spawn_error(message, "refused", 500) from None

    # Progress
    def is_pod_running(self, pod: dict[str, Any] | None) -> Any:
        """KubeSpawner's check; while starting, a wait for the pod watch to show it running.

        KubeSpawner's start asks with exponential back-off and awaits what it gets; here its
        first question waits until the pod runs (or cannot), woken by each change of the pod,
        up to ``start_timeout``. ``poll()`` also asks, from another task: a bool, as before.
        So does a hook, except one that runs in the start's task (``after_pod_created_hook``):
        it gets the wait, to await.
        """
        start = self._start_future
        starting = start is not None and not start.done() and asyncio.current_task() is start
        if starting and isinstance(self.pod_reflector, WatchedPodReflector):
            return self._running_when_watched()
        return self._pod_running_now(pod)

    async def _running_when_watched(self) -> bool:
        """Whether the pod runs, once the pod watch shows it or ``start_timeout`` passes."""
        loop = asyncio.get_running_loop()
        if self._start_wait_until is None:
            self._start_wait_until = loop.time() + self.start_timeout
        key = f"{self.namespace}/{self.pod_name}"
        while True:
            reflector = self.pod_reflector
            running = self._pod_running_now(reflector.pods.get(key))
            remaining = self._start_wait_until - loop.time()
            if running or remaining <= 0 or not isinstance(reflector, WatchedPodReflector):
                return running
            await reflector.changed(key, min(remaining, RECHECK_SECONDS))

    def _pod_running_now(self, pod: dict[str, Any] | None) -> bool:
        """KubeSpawner's check, but a pod that can never start ends the spawn.

        The end is one sentence, and only while starting: ``poll()`` also asks, and must never
        raise.
        """
        starting = self._start_future is not None and not self._start_future.done()
        running = bool(super().is_pod_running(pod))
        if running or not starting or not events.trouble_showing(pod):
            return running
        plan = self.session_plan
        now = time.monotonic()
        self._trouble_since = self._trouble_since or now
        failure = events.spawn_failure(
            pod,
            self.events if self.events_enabled else [],
            plan.image if plan else self.image,
            unschedulable_is_fatal=self.unschedulable_is_fatal,
            waiting_for_claims=now - self._trouble_since < self.claim_wait_timeout,
        )
        if failure:
            reason = "image-pull" if "image" in failure else "unschedulable"
            raise spawn_error(failure, reason=reason)
        return bool(super().is_pod_running(pod))

    @property
    def events(self) -> list[dict[str, Any]]:
        """This spawn's events, oldest first, as KubeSpawner's, for less CPU.

        KubeSpawner sorts every event of the namespace (they stay an hour) each time it looks,
        for each spawn, while the spawn waits and while its progress page is open; here only
        the pod's own are sorted.
        """
        reflector = self.event_reflector
        if not reflector:
            return []
        name = self.pod_name
        mine = [
            e for e in list(reflector.resources.values()) if e["involvedObject"]["name"] == name
        ]
        # By when each first happened: a repeated event (count 2, a later lastTimestamp) keeps
        # its place, or KubeSpawner's progress, which reads the list by index, would skip one.
        mine.sort(
            key=lambda e: e.get("firstTimestamp") or e.get("eventTime") or e["lastTimestamp"]
        )
        # Only the events after the marker start() set (an earlier pod's last), as KubeSpawner.
        uids = [event["metadata"]["uid"] for event in mine]
        if self._last_event in uids:
            return mine[uids.index(self._last_event) + 1 :]
        return mine

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """Resolution result and reason first, then the pod's events in words."""
        # Hubs older than 5.3 make the plan inside start().
        while (
            self.session_plan is None
            and self._start_future is not None
            and not self._start_future.done()
        ):
            await asyncio.sleep(0.1)
        for event in self.plan_progress_events():
            yield event
        image = self.session_plan.image if self.session_plan else self.image
        try:
            async for event in super().progress():
                raw = event.get("raw_event")
                text = events.describe_event(raw, image) if raw else None
                if text:
                    event = {**event, "message": text}
                event.pop("raw_event", None)
                yield event
        # The events could not be read (the API refused, say): the start fails with the same
        # cause in one sentence, which the progress page shows once this stream ends. Raising
        # here would answer the page with an error instead.
        except Exception as exc:
            self.log.warning("No more progress events for %s: %s", self.user.name, exc)

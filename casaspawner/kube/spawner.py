"""``CASASpawner``: a KubeSpawner running the CASA build that processed a dataset.

Thin by design: :class:`~casaspawner.spawners.mixin.CASASessionMixin` runs the session pipeline,
:mod:`casaspawner.kube.objects` turns the plan into KubeSpawner fields and the token Secret, and
KubeSpawner does all Kubernetes API work. Registered as the ``casa`` spawner
(``c.JupyterHub.spawner_class = "casa"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any

import aiohttp
from jupyterhub.utils import exponential_backoff, maybe_future
from kubernetes_asyncio.client.rest import ApiException
from kubespawner import KubeSpawner
from traitlets import Bool, Dict, Unicode, default, validate

from casaspawner.errors import ConfigurationError, InvalidInput
from casaspawner.kube import events, objects, podsecurity
from casaspawner.kube.quantities import quantity_bytes
from casaspawner.plan import SessionPlan
from casaspawner.spawners.errors import spawn_error
from casaspawner.spawners.mixin import CASASessionMixin

#: Placeholder owner uid in dry-run Secrets (the real one exists only once the pod does).
DRY_RUN_OWNER_UID = "00000000-0000-0000-0000-000000000000"


def _reflector_broken(reflector: Any) -> bool:
    """Whether a shared reflector can never deliver: its first list failed, or its watch task ended."""
    loaded = reflector.first_load_future
    if loaded.done() and (loaded.cancelled() or loaded.exception() is not None):
        return True
    task = reflector.watch_task
    return bool(loaded.done() and task is not None and task.done())


class _AfterPodCreated:
    """``after_pod_created_hook`` that first creates the token Secret, then runs the operator's own hook."""

    def __init__(self, user_hook: Any = None) -> None:
        self.user_hook = user_hook

    async def __call__(self, spawner: CASASpawner, pod: dict[str, Any]) -> None:
        await spawner.create_token_secret(pod)
        if self.user_hook is not None:
            await spawner.call_hook("after_pod_created_hook", self.user_hook, spawner, pod)


class _ModifyPod:
    """``modify_pod_hook`` that runs the operator's own hook, then checks the final pod against
    ``pod_security_level`` and for the access token — what KubeSpawner submits is exactly what was checked."""

    def __init__(self, user_hook: Any = None) -> None:
        self.user_hook = user_hook

    async def __call__(self, spawner: CASASpawner, pod: Any) -> Any:
        if self.user_hook is not None:
            pod = await spawner.call_hook("modify_pod_hook", self.user_hook, spawner, pod)
            if pod is None:
                raise spawn_error(
                    "The hub's configured modify_pod_hook returned nothing instead of the pod.", "hook", 500
                )
        spawner.check_pod_security(spawner.api.api_client.sanitize_for_serialization(pod))
        return pod


class CASASpawner(CASASessionMixin, KubeSpawner):  # type: ignore[misc]  # KubeSpawner ships no type hints
    """Start one CASA session pod per server: image, storage, identity and labels from the session plan."""

    storage_volume = Dict(
        {"persistentVolumeClaim": {"claimName": "cavern"}},
        help="""
        Kubernetes volume source of the shared storage (Cavern) holding ``home/<user>`` and
        ``projects/<group>``: exactly one of ``persistentVolumeClaim`` (default: the claim ``cavern``), ``csi``,
        ``cephfs``, ``nfs`` or ``hostPath``, written as in a pod spec. Inline ``cephfs`` and ``nfs`` need
        ``pod_security_level = "baseline"`` and ``hostPath`` needs ``"privileged"`` (namespaces enforcing the
        restricted Pod Security Standard refuse them); bind such storage to a PersistentVolume and claim instead.
        """,
    ).tag(config=True)

    measures_volume = Dict(
        {"persistentVolumeClaim": {"claimName": "casa-measures", "readOnly": True}},
        help="""
        Kubernetes volume source of the CASA measures data (mounted read-only at ``measures_mount_path``):
        one of ``persistentVolumeClaim`` (default: the claim ``casa-measures``), ``csi``, ``cephfs``, ``nfs`` or
        ``hostPath``. As for ``storage_volume``, inline ``cephfs`` and ``nfs`` need ``pod_security_level =
        "baseline"`` and ``hostPath`` needs ``"privileged"``.
        """,
    ).tag(config=True)

    tmp_size_limit = Unicode(
        "1Gi",
        help="""
        Size limit of the session's writable ``/tmp`` (an emptyDir; the image's root file system is read-only),
        as a Kubernetes quantity such as ``1Gi``. The container's ``ephemeral-storage`` limit is this plus
        ``scratch_size_limit``.
        """,
    ).tag(config=True)

    token_mount_dir = Unicode(
        "/var/run/secrets/casaspawner",
        help="""
        Directory where the user's access token appears as the file ``token`` (from a Secret owned by the pod;
        ``CASASPAWNER_TOKEN_FILE`` names it). Users without a token in ``auth_state`` get no Secret.
        """,
    ).tag(config=True)

    pod_security_level = Unicode(
        "restricted",
        help="""
        Pod Security Standard level session pods must meet: ``restricted`` (default; storage and measures
        volumes may only be ``persistentVolumeClaim`` or ``csi``), ``baseline`` (also inline ``cephfs`` and
        ``nfs``) or ``privileged`` (also ``hostPath``). The session's own container is always hardened to
        *restricted*; the whole final pod — with the operator's volumes, init and extra containers,
        ``extra_*_config`` and ``modify_pod_hook`` applied — is checked against this level before it is
        submitted, and a pod that breaks it is refused with a sentence naming the first problem.
        """,
    ).tag(config=True)

    unschedulable_is_fatal = Bool(
        True,
        help="""
        End a spawn as soon as Kubernetes reports that no node can run the pod (``FailedScheduling``). Turn
        off on clusters whose autoscaler adds nodes for pending pods.
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

    @default("cmd")
    def _cmd_default(self) -> list[str]:
        return ["jupyterhub-singleuser"]

    @default("after_pod_created_hook")
    def _after_pod_created_default(self) -> _AfterPodCreated:
        return _AfterPodCreated()

    @validate("after_pod_created_hook")
    def _keep_token_secret_hook(self, proposal: Any) -> _AfterPodCreated:
        value = proposal["value"]
        return value if isinstance(value, _AfterPodCreated) else _AfterPodCreated(value)

    @default("modify_pod_hook")
    def _modify_pod_default(self) -> _ModifyPod:
        return _ModifyPod()

    @validate("modify_pod_hook")
    def _keep_pod_security_check(self, proposal: Any) -> _ModifyPod:
        value = proposal["value"]
        return value if isinstance(value, _ModifyPod) else _ModifyPod(value)

    # ------------------------------------------------------------------------------------ configuration
    def check_config(self) -> None:
        """The shared checks, plus this spawner's quantities, volume sources and Pod Security level."""
        super().check_config()
        for name in ("scratch_size_limit", "tmp_size_limit"):
            value = getattr(self, name)
            if not quantity_bytes(value):
                raise ConfigurationError(
                    f"{self.option(name)} is {value!r}, not a Kubernetes quantity of bytes such as '20Gi'"
                )
        try:
            for what, source in (("storage", self.storage_volume), ("measures data", self.measures_volume)):
                objects.volume_source(source, what, self.pod_security_level)
        except InvalidInput as exc:
            raise ConfigurationError(str(exc)) from None

    def check_pod_security(self, pod: dict[str, Any]) -> None:
        """Refuse (one sentence) a final pod manifest that breaks ``pod_security_level``, or that carries the
        user's access token itself (put there by an operator's hook or setting) instead of only the token file."""
        level = self.pod_security_level
        problem = podsecurity.pod_security_sentence(
            podsecurity.pod_security_violations(pod, level), level
        )
        token = self.access_token
        if not problem and token and token in json.dumps(pod, ensure_ascii=False):
            problem = (
                "The hub's configuration put the user's access token into the pod itself; it may reach the "
                "session only as the token file."
            )
        if problem:
            self.log.error("Refusing the pod of %s: %s", self.user.name, problem)
            raise spawn_error(problem, reason="pod-security", status_code=500)

    # ------------------------------------------------------------------------------------------- the plan
    @property
    def token_secret_name(self) -> str | None:
        """Name of this session's token Secret, or None when the user has no token."""
        return f"{self.pod_name}-token" if self.access_token else None

    def pod_settings(self) -> objects.PodSettings:
        return objects.PodSettings(
            storage_volume=self.storage_volume,
            measures_volume=self.measures_volume,
            scratch_size_limit=self.scratch_size_limit,
            tmp_size_limit=self.tmp_size_limit,
            token_secret_name=self.token_secret_name,
            token_mount_dir=self.token_mount_dir,
            command=tuple(self.cmd or ["jupyterhub-singleuser"]),
            security_level=self.pod_security_level,
        )

    def apply_plan(self, plan: SessionPlan) -> None:
        super().apply_plan(plan)
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

    async def dry_run_manifests(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """What a spawn of ``user_options`` would submit, with no cluster: the steps JupyterHub runs before
        ``start`` in its order (``auth_state_hook``, ``group_overrides``, ``apply_user_options``,
        ``pre_spawn_hook``), then :meth:`session_manifests`. ``Authenticator.pre_spawn_start`` is not run (there
        is no authenticator), nor anything after the pod exists (``after_pod_created_hook`` beyond the token
        Secret, internal SSL)."""
        await self.run_auth_state_hook(await self.user.get_auth_state())
        await self.apply_group_overrides()
        await self._run_apply_user_options(self.user_options)
        await self.run_pre_spawn_hook()
        return await self.session_manifests()

    async def session_manifests(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The pod (and token Secret, without data) ``start`` would submit from here; no API calls.

        Same path as KubeSpawner's ``_start``: ``load_user_options`` (profile, then plan), ``get_pod_manifest``,
        ``modify_pod_hook`` (the operator's hook, then the Pod Security check).
        """
        await self.load_user_options()
        pod = await self.get_pod_manifest()
        if self.modify_pod_hook:
            pod = await maybe_future(self.modify_pod_hook(self, pod))
        manifest: dict[str, Any] = self.api.api_client.sanitize_for_serialization(pod)
        manifest = {"apiVersion": "v1", "kind": "Pod", **manifest}
        secret = None
        if self.token_secret_name:
            secret = self.token_secret_manifest(self.pod_name, DRY_RUN_OWNER_UID, None)
        return manifest, secret

    # ------------------------------------------------------------------------------------------- secrets
    def token_secret_manifest(self, pod_name: str, pod_uid: str, token: str | None) -> dict[str, Any]:
        assert self.token_secret_name is not None
        return objects.token_secret(
            self.token_secret_name,
            token,
            owner_name=pod_name,
            owner_uid=pod_uid,
            labels=self._build_common_labels(self._expand_all(self.extra_labels)),
        )

    async def create_token_secret(self, pod: Mapping[str, Any]) -> None:
        """Create the Secret holding the user's token, owned by ``pod`` (never logged)."""
        token = self.access_token
        if not token or not self.token_secret_name:
            return
        manifest = self.token_secret_manifest(pod["metadata"]["name"], pod["metadata"]["uid"], token)
        await exponential_backoff(
            partial(self._create_secret, manifest),
            f"Could not create the token Secret {self.token_secret_name}",
            timeout=self.k8s_api_request_retry_timeout,
        )

    async def _create_secret(self, manifest: dict[str, Any]) -> bool:
        name = manifest["metadata"]["name"]
        try:
            await asyncio.wait_for(
                self.api.create_namespaced_secret(self.namespace, manifest), self.k8s_api_request_timeout
            )
            return True
        except asyncio.TimeoutError:
            return False
        except ApiException as exc:
            if exc.status == 409:  # left over from an earlier pod of the same name: delete it, create again
                self.log.info("Deleting the earlier token Secret %s", name)
                with contextlib.suppress(ApiException, asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self.api.delete_namespaced_secret(name, self.namespace), self.k8s_api_request_timeout
                    )
                return False
            self.log.error("Creating the token Secret %s failed: %s %s", name, exc.status, exc.reason)
            if exc.status >= 500:
                return False
            raise spawn_error(
                "The session's access token could not be stored; try again.", "secret"
            ) from None

    # ----------------------------------------------------------------------------------------- reflectors
    async def _start_reflector(
        self, kind: str, reflector_class: Any, replace: bool = False, **kwargs: Any
    ) -> Any:
        """KubeSpawner's shared pod/event reflector, surviving a failed first list.

        KubeSpawner 7.1 fails the spawn when the reflector's first list gets a server error (500, 503 from a
        proxy …), and keeps the broken reflector, so the next spawn waits until it times out. Here the list is
        retried for up to ``k8s_api_request_retry_timeout`` seconds, and a reflector whose first list failed (or
        whose watch gave up) is replaced.
        """
        previous = type(self).reflectors.get(self._get_reflector_key(kind))
        if previous is not None and not replace and _reflector_broken(previous):
            self.log.warning("Replacing the %s reflector: its first list failed or its watch gave up", kind)
            replace = True
        retry = replace

        async def attempt() -> Any:
            nonlocal retry
            try:
                return await super(CASASpawner, self)._start_reflector(
                    kind, reflector_class, replace=retry, **kwargs
                )
            except ApiException as exc:
                if exc.status < 500 and exc.status != 429:
                    raise
                self.log.warning("Listing %s failed (%s %s); trying again", kind, exc.status, exc.reason)
            except (
                aiohttp.ClientError,
                asyncio.TimeoutError,
                ValueError,
            ) as exc:  # e.g. a proxy's error page
                self.log.warning("Listing %s failed (%s); trying again", kind, type(exc).__name__)
            retry = True  # the failed reflector stays registered: replace it
            return None

        return await exponential_backoff(
            attempt,
            f"Could not list {kind} from the Kubernetes API",
            timeout=self.k8s_api_request_retry_timeout,
        )

    # ------------------------------------------------------------------------------------------- progress
    def is_pod_running(self, pod: dict[str, Any] | None) -> bool:
        """KubeSpawner's check, but a pod that can never start ends the spawn with one sentence.

        Only while starting: ``poll()`` also asks, and must never raise.
        """
        starting = self._start_future is not None and not self._start_future.done()
        if not starting:
            return bool(super().is_pod_running(pod))
        plan = self.session_plan
        failure = events.spawn_failure(
            pod,
            list(self.events) if self.events_enabled else [],
            plan.image if plan else self.image,
            unschedulable_is_fatal=self.unschedulable_is_fatal,
        )
        if failure:
            raise spawn_error(failure, reason="image-pull" if "image" in failure else "unschedulable")
        return bool(super().is_pod_running(pod))

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """Resolution result and reason first, then the pod's events in words (image pull, container start)."""
        while self.session_plan is None and self._start_future is not None and not self._start_future.done():
            await asyncio.sleep(0.1)  # hubs < 5.3 make the plan inside start()
        for event in self.plan_progress_events():
            yield event
        image = self.session_plan.image if self.session_plan else self.image
        async for event in super().progress():
            raw = event.get("raw_event")
            text = events.describe_event(raw, image) if raw else None
            if text:
                event = {**event, "message": text}
            event.pop("raw_event", None)
            yield event

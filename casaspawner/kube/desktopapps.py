"""Apps of other CASA releases on a Kubernetes desktop: pods the hub creates for the user.

The desktop's menu asks the hub (:mod:`casaspawner.services.apps`) with the session's own token.
:class:`KubeApps` lists the releases the user's :class:`~casaspawner.kube.spawner.CASASpawner`
can run, with the operators' drains, and starts an app of one of them: it plans the session's
dataset with that release as the spawner plans a session (the operator's catalog, sizes, images,
storage, the user's identity from the login), and creates, as the hub's ServiceAccount, the two
NetworkPolicies of :func:`casaspawner.kube.apps.desktop_policies` and the app's pod
(:func:`casaspawner.kube.apps.app_pod`), both owned by the session pod. The session pod itself
has no Kubernetes rights. Beyond Zero to JupyterHub's hub Role, the account needs
:data:`casaspawner.kube.apps.APP_RULES` (``hub-config/z2jh/casa-apps-rbac.yaml``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from pathlib import Path, PurePosixPath
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from casaspawner.datasets.storage import STORAGE
from casaspawner.errors import CasaspawnerError, ConfigurationError, InvalidInput
from casaspawner.insession.desktop.casa_releases import APPS
from casaspawner.kube import apps, objects
from casaspawner.kube.podsecurity import pod_security_sentence, pod_security_violations
from casaspawner.kube.runs import HOPELESS, Cluster, api_reason, unschedulable
from casaspawner.plan import with_measures
from casaspawner.session.measures import kept_versions
from casaspawner.session.options import OUTPUT_KEY
from casaspawner.session.prepare import prepare

#: Seconds a request waits for an API server that does not answer.
PATIENCE = 15.0
#: Seconds a request waits for the app's pod to run: a pod still pulling its image goes on.
START_WAIT = 40.0
#: Seconds between two looks at a starting pod.
POLL = 0.5
#: Why an app's pod will not start soon. A user who asked waits for an answer, so a failed pull
#: is one at once (clicking again tries again), not after the kubelet's back-off.
NOT_STARTING = HOPELESS | {"ErrImagePull"}
NOT_OFFERED = (
    "This hub runs each dataset in the CASA release chosen for it; apps of other releases are "
    "not offered."
)
RBAC_SENTENCE = (
    "This hub may not create the NetworkPolicies that guard your desktop's X server; the "
    "operators allow it with hub-config/z2jh/casa-apps-rbac.yaml."
)


class KubeApps:
    """Apps of other releases on one user's running CASA desktop, as pods the hub creates.

    ``spawner`` is the :class:`~casaspawner.kube.spawner.CASASpawner` of the desktop's server.
    """

    def __init__(self, spawner: Any) -> None:
        self.spawner = spawner
        self.cluster = Cluster(
            spawner.api.api_client,
            spawner.namespace,
            patience=PATIENCE,
            say=spawner.log.warning,
            again="if it was asked to: look for its window in a minute",
        )

    async def releases(self) -> dict[str, Any]:
        """The releases whose apps the desktop may add, newest CASA first, drains marked."""
        session = await self.session_pod()
        own = session.labels.get(f"{self.spawner.label_prefix}/release", "")
        catalog = self.spawner.casa_catalog()
        drained = await self.spawner.blocked_release_messages()
        listed = sorted(catalog.available(), key=lambda r: r.casa_version, reverse=True)
        if not self.spawner.allow_release_override:
            # Users may not choose a release on this hub: the session's own alone.
            listed = [r for r in listed if r.id == own]
        return {
            "own": own,
            "releases": [
                {
                    "id": release.id,
                    "label": release.label,
                    "casa": release.casa,
                    "kernel_name": release.kernel_name,
                    "apps": apps.image_apps(release),
                    "drained": release.id in drained and release.id != own,
                    "refusal": drained.get(release.id) or None,
                }
                for release in listed
            ],
        }

    async def session_pod(self) -> apps.SessionPod:
        """The server's pod, running a CASA desktop; one sentence otherwise."""
        spawner = self.spawner
        try:
            pod = await self.cluster.answer(
                self.cluster.core.read_namespaced_pod, spawner.pod_name, spawner.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                raise InvalidInput(
                    "Your session's pod is gone; start the session again."
                ) from None
            raise CasaspawnerError(
                f"Kubernetes refused to show your session's pod: {api_reason(exc)}."
            ) from None
        labels = dict(pod.metadata.labels or {})
        if labels.get(f"{spawner.label_prefix}/interface") != "desktop":
            raise InvalidInput("Apps of other CASA releases open on a CASA desktop session only.")
        if pod.status.phase != "Running" or not pod.status.pod_ip:
            raise InvalidInput("Your session's pod is not running; wait for it, or start again.")
        notebook = next((c for c in pod.spec.containers if c.name == objects.CONTAINER), None)
        if notebook is None:
            raise InvalidInput("Your session's pod runs no CASA session; start the session again.")
        # The measures its apps read: the version the kubelet mounted for the session.
        measures = next(
            (
                m.sub_path or ""
                for m in notebook.volume_mounts or []
                if m.name == objects.MEASURES_VOLUME
            ),
            "",
        )
        return apps.SessionPod(
            pod.metadata.name,
            pod.metadata.uid,
            pod.status.pod_ip,
            labels,
            hostname=pod.spec.hostname or "",
            measures=measures,
            # As the session's pod names it (a relaunch's by digest): the node has it, and a
            # cluster whose images were loaded, not pulled, knows them by that name alone.
            image=notebook.image,
        )

    async def launch(self, release_id: str, app: str, display: int) -> str:
        """Start ``app`` of ``release_id`` on the desktop's ``display``; the app pod's name.

        Refused with one sentence: not a desktop, an unknown or drained release, an app its
        image does not have, a display number out of range, a hub without the RBAC.
        """
        spawner = self.spawner
        if display not in apps.DISPLAYS:
            raise InvalidInput(f"The X display must be a number from 0 to {apps.DISPLAYS[-1]}.")
        session = await self.session_pod()
        catalog = spawner.casa_catalog()
        if release_id not in catalog or not catalog.get(release_id).available:
            raise InvalidInput(
                f"CASA release {release_id[:60]} is not one this hub runs; the desktop menu "
                "lists those that are."
            )
        release = catalog.get(release_id)
        own = session.labels.get(f"{spawner.label_prefix}/release", "")
        if release_id != own and not spawner.allow_release_override:
            raise InvalidInput(NOT_OFFERED)
        if app not in apps.image_apps(release):
            raise InvalidInput(f"{app[:20]} is not part of the {release.label} image.")
        # The running session's dataset and size, as the spawner noted them (a relaunch's
        # options name only the record).
        options = dict(spawner.user_options or {})
        noted = options.get(OUTPUT_KEY)
        running: dict[str, Any] = noted if isinstance(noted, dict) else {}
        wanted = {k: running.get(k) or options.get(k) for k in ("dataset", "size")}
        wanted |= {"release": release_id, "interface": "lab"}
        if session.measures and spawner.measures_versions_hub_path:
            look = functools.partial(kept_versions, Path(spawner.measures_versions_hub_path))
            kept = await STORAGE.call(
                look, deadline=spawner.resolve_timeout, what="the measures data"
            )
            if session.measures not in kept:
                raise InvalidInput(
                    f"The measures data your desktop reads ({session.measures}) is no longer "
                    "kept on this hub, so apps of other releases cannot read it; start a new "
                    "session for them."
                )
        settings = spawner.session_settings()
        plan = await prepare({k: v for k, v in wanted.items() if v}, settings, spawner)
        # The apps read the measures version the session reads, not the newest.
        if session.measures:
            plan = with_measures(plan, session.measures)
        own_label = catalog.get(own).label if own in catalog else "CASA"
        pod = apps.app_pod(
            plan,
            spawner.pod_settings(),
            name=apps.app_pod_name(session.name, release_id, app, secrets.token_hex(4)),
            app=app,
            session=session,
            display=display,
            own_label=own_label,
            desktop_dir=str(PurePosixPath(settings.plan.desktop_xstartup).parent),
            labels=spawner.user_pod_labels(),
        )
        pod["spec"].update(spawner.user_pod_scheduling())
        level = spawner.pod_security_level
        sentence = pod_security_sentence(pod_security_violations(pod, level), level)
        if sentence:
            raise InvalidInput(sentence)
        await self.make_room(session)
        await self.guard(session)
        try:
            await self.cluster.answer(
                self.cluster.core.create_namespaced_pod, spawner.namespace, pod
            )
        except ApiException as exc:
            raise InvalidInput(
                f"Kubernetes refused the {app} pod of {release.label}: {api_reason(exc)}."
            ) from None
        name = str(pod["metadata"]["name"])
        await self.started(name, f"{APPS[app]} of {release.label}")
        spawner.log.info(
            "%s of %s on %s's desktop: pod %s", app, release.id, spawner.user.name, name
        )
        return name

    async def started(self, name: str, what: str) -> None:
        """Wait up to ``START_WAIT`` s for app pod ``name`` to run; one sentence if it cannot.

        A pod whose image could not be pulled (or whose container cannot be made) is deleted
        and said so at once; one no node has taken by then (an autoscaler may add one) too.
        One that ended at once says so. Still pulling its image, it goes on.
        """
        namespace = self.spawner.namespace
        deadline = time.monotonic() + START_WAIT
        waits_for_node = None
        while time.monotonic() < deadline:
            try:
                pod = await self.cluster.answer(
                    self.cluster.core.read_namespaced_pod, name, namespace
                )
            except ApiException as exc:
                raise InvalidInput(f"The {what} is gone: {api_reason(exc)}.") from None
            phase = pod.status.phase if pod.status else None
            # The copy of casa-app (the init container) first, then the app's own.
            statuses = [
                *(pod.status.init_container_statuses or []),
                *(pod.status.container_statuses or []),
            ]
            waiting = next(
                (
                    s.state.waiting
                    for s in statuses
                    if s.state and s.state.waiting and s.state.waiting.reason in NOT_STARTING
                ),
                None,
            )
            self.spawner.log.debug(
                "App pod %s: %s, %s", name, phase, waiting.reason if waiting else "not stuck"
            )
            if phase == "Running":
                return
            if phase in ("Succeeded", "Failed"):
                # casa-app's last words (its log's last line), e.g. an image without xterm.
                said = next(
                    (
                        last_line(s.state.terminated.message)
                        for s in reversed(statuses)
                        if s.state and s.state.terminated and s.state.terminated.message
                    ),
                    "",
                )
                raise InvalidInput(
                    f"The {what} ended as soon as it started: {said.rstrip('.')}."
                    if said
                    else f"The {what} ended as soon as it started; its pod {name} says why."
                )
            waits_for_node = unschedulable(pod)
            if waiting is not None:
                await self._remove(name)
                detail = " ".join(str(waiting.message or "").split())[:200]
                raise InvalidInput(
                    f"The {what} could not start ({waiting.reason}{': ' if detail else ''}"
                    f"{detail})."
                )
            await asyncio.sleep(POLL)
        if waits_for_node is not None:
            await self._remove(name)
            detail = waits_for_node[:200]
            raise InvalidInput(f"No node took the {what} in {START_WAIT:.0f} s ({detail}).")

    async def make_room(self, session: apps.SessionPod) -> None:
        """Remove the desktop's closed apps' pods; refuse one more than ``desktop_apps_limit``."""
        spawner = self.spawner
        selector = ",".join(
            f"{k}={v}" for k, v in apps.app_selector(session, spawner.label_prefix).items()
        )
        try:
            found = await self.cluster.answer(
                self.cluster.core.list_namespaced_pod, spawner.namespace, label_selector=selector
            )
        except ApiException as exc:
            raise CasaspawnerError(
                f"Kubernetes refused to list your desktop's apps: {api_reason(exc)}."
            ) from None
        open_now = 0
        for pod in found.items:
            if pod.status is not None and pod.status.phase in ("Succeeded", "Failed"):
                await self._remove(pod.metadata.name)
            else:
                open_now += 1
        if open_now >= spawner.desktop_apps_limit:
            raise InvalidInput(
                f"Your desktop has {open_now} apps of other CASA releases open, the most it may "
                "have; close one of them first."
            )

    async def _remove(self, name: str) -> None:
        """Delete app pod ``name``, which will not start; gone already is fine."""
        with contextlib.suppress(ApiException):
            await self.cluster.core.delete_namespaced_pod(name, self.spawner.namespace)

    async def guard(self, session: apps.SessionPod) -> None:
        """Create the desktop's two NetworkPolicies, unless they are there already."""
        from kubernetes_asyncio import client

        networking = client.NetworkingV1Api(self.cluster.api)
        namespace = self.spawner.namespace
        for policy in apps.desktop_policies(session, self.spawner.label_prefix):
            name = policy["metadata"]["name"]
            try:
                await self.cluster.answer(
                    networking.create_namespaced_network_policy, namespace, policy
                )
                continue
            except ApiException as exc:
                if exc.status != 409:
                    raise self.refused(exc) from None
            try:
                # There already: this session's, or a pod's of the same name before it, which
                # the garbage collector is about to delete.
                found = await self.cluster.answer(
                    networking.read_namespaced_network_policy, name, namespace
                )
                owners = found.metadata.owner_references or []
                if any(owner.uid == session.uid for owner in owners):
                    continue
                await self.cluster.answer(
                    networking.delete_namespaced_network_policy, name, namespace
                )
                await self.cluster.answer(
                    networking.create_namespaced_network_policy, namespace, policy
                )
            except ApiException as exc:
                raise self.refused(exc) from None

    @staticmethod
    def refused(exc: Any) -> CasaspawnerError:
        """The sentence for a refused NetworkPolicy request: the RBAC's, or the API's."""
        if exc.status == 403:
            return ConfigurationError(RBAC_SENTENCE)
        return CasaspawnerError(
            f"Kubernetes refused the NetworkPolicy of your desktop: {api_reason(exc)}."
        )


def last_line(text: str | None) -> str:
    """The last line of a container's log tail that says something, at most 300 characters."""
    lines = [" ".join(line.split()) for line in str(text or "").splitlines()]
    said = next((line for line in reversed(lines) if line), "")
    return said if len(said) <= 300 else said[:299] + "…"

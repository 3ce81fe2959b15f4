"""What Kubernetes says about a session pod, in words.

Kubelet and scheduler events become progress lines, pods that can never start and pods the API
refuses become one sentence each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from casaspawner.kube.quantities import format_bytes

#: Image pull failures the kubelet keeps retrying.
#:
#: Fatal once it backs off without a successful pull.
_PULL_RETRIED = ("ErrImagePull", "ImagePullBackOff")
#: Image pull failures no retry can cure: fatal at once.
_PULL_FINAL = ("InvalidImageName", "ErrImageNeverPull")
#: Events saying the image is on the node after all.
#:
#: A later one cancels earlier pull failures.
_IMAGE_PRESENT = ("Pulled", "Created", "Started")
#: The scheduler's words for a claim that may yet appear or be bound.
#:
#: A provisioner may still be binding a new claim, and a scheduler whose view lags the API (it
#: is reconnecting after an API server restart) has not seen a claim just made, or the volume a
#: claim is bound to.
_CLAIM_PENDING = re.compile(
    r'persistentvolume(claim)? "[^"]*" not found|unbound immediate PersistentVolumeClaims'
)


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split()).rstrip(".")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _PullState:
    """What the events say about pulling the image since it last worked."""

    #: Messages of this streak of failed pulls.
    failures: list[str] = field(default_factory=list)
    #: Whether the kubelet has given up for now (ImagePullBackOff).
    backed_off: bool = False
    #: A failure no retry can cure.
    final: str | None = None

    def failed(self, message: str) -> None:
        self.failures.append(message)
        if any(code in message for code in _PULL_FINAL):
            self.final = message
        if "ImagePullBackOff" in message or message.lower().startswith("back-off pulling image"):
            self.backed_off = True

    def fatal_detail(self) -> str | None:
        if self.final is not None:
            return self.final
        if not (self.failures and self.backed_off):
            return None
        # The most telling message: the registry's answer rather than "Error: ErrImagePull" or
        # "Back-off …".
        telling = [
            m
            for m in self.failures
            if "pull" in m.lower() and not m.lower().startswith(("error:", "back-off"))
        ]
        return (telling or self.failures)[0]


def _is_pull_failure(reason: str, message: str) -> bool:
    if reason == "BackOff":
        return message.lower().startswith("back-off pulling image")
    return any(code == reason or code in message for code in (*_PULL_RETRIED, *_PULL_FINAL)) or (
        reason == "Failed" and "pull" in message.lower()
    )


def trouble_showing(pod: Mapping[str, Any] | None) -> bool:
    """Whether the pod's status shows a failed image pull or an unscheduled pod.

    Only then can :func:`spawn_failure` find the spawn failed, its events telling the details:
    the kubelet marks a container waiting on a failed pull as it reports the failure, and the
    scheduler sets ``PodScheduled`` false as it reports ``FailedScheduling``. Checking first
    spares reading the namespace's events on every look at a pod that is doing well.
    """
    status = (pod or {}).get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in (*_PULL_RETRIED, *_PULL_FINAL):
            return True
    return any(
        condition.get("type") == "PodScheduled" and str(condition.get("status")) != "True"
        for condition in status.get("conditions") or []
    )


def spawn_failure(
    pod: Mapping[str, Any] | None,
    events: Sequence[Mapping[str, Any]],
    image: str,
    *,
    unschedulable_is_fatal: bool = True,
    waiting_for_claims: bool = False,
) -> str | None:
    """One sentence if the pod can never start, else None.

    The causes are an image pull and scheduling. Reads the Kubernetes events of this spawn
    (oldest first) and the pod's status, and decides each cause on its latest state: a
    ``Pulled`` (or ``Started``) event cancels earlier pull failures, and ``Scheduled`` (or a
    cluster autoscaler's ``TriggeredScaleUp``) cancels an earlier ``FailedScheduling``. An
    image pull is fatal when it failed and the kubelet then backed off (``ErrImagePull`` then
    ``ImagePullBackOff``, no ``Pulled`` since), or at once for
    ``InvalidImageName``/``ErrImageNeverPull``; scheduling is fatal while the latest word on it
    is ``FailedScheduling`` (only with ``unschedulable_is_fatal``), unless it is about a claim
    that may yet appear or be bound and the spawner is still ``waiting_for_claims``.
    """
    pull = _PullState()
    unschedulable: str | None = None
    scheduling_seen = False
    for event in events:
        reason, message = str(event.get("reason") or ""), str(event.get("message") or "")
        if reason in _IMAGE_PRESENT:
            pull = _PullState()
        elif _is_pull_failure(reason, message):
            pull.failed(message or reason)
        if reason == "FailedScheduling":
            unschedulable, scheduling_seen = message or "unschedulable", True
        elif reason in ("Scheduled", "TriggeredScaleUp"):
            unschedulable, scheduling_seen = None, True
    status = (pod or {}).get("status") or {}
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        if state.get("running") or state.get("terminated"):
            pull = _PullState()
        elif waiting.get("reason") in (*_PULL_RETRIED, *_PULL_FINAL):
            code = waiting["reason"]
            detail = waiting.get("message") or code
            if code in _PULL_FINAL:
                pull.final = pull.final or detail
            elif code == "ImagePullBackOff":
                pull.backed_off = True
                pull.failures = pull.failures or [detail]
            else:
                pull.failures = pull.failures or [detail]
    detail = pull.fatal_detail()
    if detail is not None:
        return f"The session image {image} could not be pulled ({_clip(detail)})."
    for condition in status.get("conditions") or []:
        if condition.get("type") != "PodScheduled":
            continue
        if str(condition.get("status")) == "True":
            unschedulable = None
        elif condition.get("reason") == "Unschedulable" and not scheduling_seen:
            unschedulable = str(condition.get("message") or "unschedulable")
    if unschedulable is None or not unschedulable_is_fatal:
        return None
    if waiting_for_claims and _CLAIM_PENDING.search(unschedulable):
        return None
    return f"No node can run this session: {_clip(unschedulable)}."


def refusal_sentence(status: int, message: str) -> tuple[str, int]:
    """One sentence, and its HTTP status, for a pod the Kubernetes API refused.

    ``message`` is the API's own (its ``Status`` message), with byte counts written as
    quantities. A quota the session does not fit is the user's to fix (400: a smaller size); Pod
    Security admission, other refusals and an invalid pod are the hub's configuration (500).
    """
    detail = message.split(" is forbidden: ", 1)[-1] if status == 403 else message
    detail = _clip(detail, 300)
    if status == 403 and "violates PodSecurity" in message:
        return (
            f"The cluster refused the session pod: it {detail}; change the hub's configuration "
            "(init containers, extra containers, volumes, extra_*_config, modify_pod_hook) or "
            "CASASpawner.pod_security_level.",
            500,
        )
    if status == 403 and "exceeded quota" in message:
        # KubeSpawner sends memory in bytes; the quota's own figures are quantities.
        detail = re.sub(
            r"((?:memory|storage)=)([0-9]+)\b", lambda m: m[1] + format_bytes(int(m[2])), detail
        )
        return (
            f"The session does not fit in the cluster's resource quota ({detail}); choose a "
            "smaller size, or stop another session first.",
            400,
        )
    if refused_for_now(status, message):
        return (
            f"The Kubernetes API refused the hub's request ({detail}); the hub's Role and its "
            "namespace must allow it.",
            500,
        )
    if status in (400, 422):
        return f"The cluster refused the session pod as invalid ({detail}).", 500
    return f"The cluster refused the session pod ({detail}).", 500


def refused_for_now(status: int, message: str) -> bool:
    """Whether the API refused for a reason that passes by itself.

    Right after an API server starts, its authorizer (RBAC) refuses requests until it has read
    the Roles; in a namespace just made, admission refuses pods until the controller-manager has
    given it its ``default`` ServiceAccount. Both pass within seconds.
    """
    if status != 403:
        return False
    by_role = " cannot " in message and " resource " in message
    return by_role or "error looking up service account" in message


def describe_event(event: Mapping[str, Any], image: str) -> str | None:
    """A readable progress line for the usual kubelet events.

    None means: show the event as it is.
    """
    reason = event.get("reason")
    if reason == "Scheduled":
        return "The session is scheduled on a node."
    if reason == "Pulling":
        return (
            f"Pulling the session image {image} (this can take minutes the first time on a node)."
        )
    if reason == "Pulled":
        return f"The session image {image} is ready."
    if reason == "Started":
        return "The session container started; waiting for Jupyter to answer."
    return None

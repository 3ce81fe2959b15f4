"""Kubernetes events in words: progress lines, and pods that can never start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Image pull failures the kubelet keeps retrying (fatal once it backs off without a successful pull) …
_PULL_RETRIED = ("ErrImagePull", "ImagePullBackOff")
#: … and those no retry can cure (fatal at once).
_PULL_FINAL = ("InvalidImageName", "ErrImageNeverPull")
#: Events saying the image is on the node after all (a later one cancels earlier pull failures).
_IMAGE_PRESENT = ("Pulled", "Created", "Started")


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split()).rstrip(".")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _PullState:
    """What the events so far say about pulling the image, since the last successful pull."""

    failures: list[str] = field(default_factory=list)  # messages of this streak of failed pulls
    backed_off: bool = False  # the kubelet has given up for now (ImagePullBackOff)
    final: str | None = None  # a failure no retry can cure

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
        # the most telling message: the registry's answer rather than "Error: ErrImagePull" or "Back-off …"
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


def spawn_failure(
    pod: Mapping[str, Any] | None,
    events: list[Mapping[str, Any]],
    image: str,
    *,
    unschedulable_is_fatal: bool = True,
) -> str | None:
    """One sentence if the pod can never start (image pull or scheduling failure), else None.

    Reads the Kubernetes events of this spawn (oldest first) and the pod's status, and decides each cause on
    its latest state: a ``Pulled`` (or ``Started``) event cancels earlier pull failures, and ``Scheduled`` (or a
    cluster autoscaler's ``TriggeredScaleUp``) cancels an earlier ``FailedScheduling``. An image pull is fatal
    when it failed and the kubelet then backed off (``ErrImagePull`` then ``ImagePullBackOff``, no ``Pulled``
    since), or at once for ``InvalidImageName``/``ErrImageNeverPull``; scheduling is fatal while the latest word
    on it is ``FailedScheduling`` (only with ``unschedulable_is_fatal``).
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
    if unschedulable_is_fatal and unschedulable is not None:
        return f"No node can run this session: {_clip(unschedulable)}."
    return None


def describe_event(event: Mapping[str, Any], image: str) -> str | None:
    """A readable progress line for the usual kubelet events (None: show the event as it is)."""
    reason = event.get("reason")
    if reason == "Scheduled":
        return "The session is scheduled on a node."
    if reason == "Pulling":
        return f"Pulling the session image {image} (this can take minutes the first time on a node)."
    if reason == "Pulled":
        return f"The session image {image} is ready."
    if reason == "Started":
        return "The session container started; waiting for Jupyter to answer."
    return None

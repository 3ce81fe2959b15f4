"""Kubelet events into the spawn's failure (kube/events.py): each cause decided on its latest
state."""

from __future__ import annotations

import pytest

from casaspawner.kube.events import spawn_failure, trouble_showing

IMAGE = "registry/casa:6.6.5-31"
PULL_FAILED = {"reason": "Failed", "message": f'Failed to pull image "{IMAGE}": manifest unknown'}
ERR_IMAGE_PULL = {"reason": "Failed", "message": "Error: ErrImagePull"}
BACK_OFF = {"reason": "BackOff", "message": f'Back-off pulling image "{IMAGE}"'}
IMAGE_PULL_BACK_OFF = {"reason": "Failed", "message": "Error: ImagePullBackOff"}
PULLING = {"reason": "Pulling", "message": f'Pulling image "{IMAGE}"'}
PULLED = {"reason": "Pulled", "message": f'Successfully pulled image "{IMAGE}"'}
FAILED_SCHEDULING = {
    "reason": "FailedScheduling",
    "message": "0/3 nodes are available: 3 Insufficient memory.",
}
SCHEDULED = {"reason": "Scheduled", "message": "Successfully assigned test/pod to node-1"}
SCALE_UP = {
    "reason": "TriggeredScaleUp",
    "message": "pod triggered scale-up: [{pool 1->2 (max: 5)}]",
}
NOT_PULLED = (
    f'The session image {IMAGE} could not be pulled (Failed to pull image "{IMAGE}": manifest '
    "unknown)."
)
UNSCHEDULABLE = "No node can run this session: 0/3 nodes are available: 3 Insufficient memory."


def waiting(reason: str, message: str = "") -> dict:
    state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    return {
        "status": {"phase": "Pending", "containerStatuses": [{"name": "notebook", "state": state}]}
    }


@pytest.mark.parametrize(
    ("pod", "events", "expected"),
    [
        (None, [], None),
        ({"status": {"phase": "Pending"}}, [SCHEDULED, PULLING], None),
        # a pull that failed once may still work on the kubelet's next try …
        (None, [SCHEDULED, PULLING, PULL_FAILED, ERR_IMAGE_PULL], None),
        (waiting("ErrImagePull", "manifest unknown"), [PULLING, PULL_FAILED], None),
        (None, [PULLING, PULL_FAILED, ERR_IMAGE_PULL, PULLING, PULLED], None),
        # … but one that failed and then backed off, with no Pulled since, has failed
        (None, [PULLING, PULL_FAILED, ERR_IMAGE_PULL, BACK_OFF, IMAGE_PULL_BACK_OFF], NOT_PULLED),
        (waiting("ImagePullBackOff"), [PULLING, PULL_FAILED, ERR_IMAGE_PULL], NOT_PULLED),
        (
            waiting("ImagePullBackOff"),
            [],
            f"The session image {IMAGE} could not be pulled (ImagePullBackOff).",
        ),
        (
            None,
            [PULL_FAILED, BACK_OFF, PULLING, PULLED, {"reason": "Started", "message": "x"}],
            None,
        ),
        # no retry cures these
        (
            waiting("InvalidImageName", f'Failed to apply default image tag "{IMAGE}"'),
            [],
            f"The session image {IMAGE} could not be pulled (Failed to apply default image tag "
            f'"{IMAGE}").',
        ),
        # scheduling: the latest word wins
        (None, [FAILED_SCHEDULING], UNSCHEDULABLE),
        (None, [FAILED_SCHEDULING, SCHEDULED, PULLING], None),
        (None, [FAILED_SCHEDULING, SCALE_UP], None),
        (None, [FAILED_SCHEDULING, SCALE_UP, FAILED_SCHEDULING], UNSCHEDULABLE),
        (
            {
                "status": {
                    "conditions": [
                        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                    ]
                }
            },
            [],
            "No node can run this session: unschedulable.",
        ),
        (
            {"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}},
            [FAILED_SCHEDULING],
            None,
        ),
    ],
)
def test_spawn_failure_decides_each_cause_on_its_latest_state(pod, events, expected):
    assert spawn_failure(pod, events, IMAGE) == expected


def test_unschedulable_not_fatal_when_turned_off():
    assert spawn_failure(None, [FAILED_SCHEDULING], IMAGE, unschedulable_is_fatal=False) is None
    backed_off = [PULL_FAILED, BACK_OFF]
    assert spawn_failure(None, backed_off, IMAGE, unschedulable_is_fatal=False) == NOT_PULLED


@pytest.mark.parametrize(
    "message",
    [
        '0/1 nodes are available: persistentvolumeclaim "casa-measures" not found.',
        # Seen on the real cluster: the scheduler, after an API server restart, had yet to see
        # the volume the measures claim is bound to.
        '0/1 nodes are available: persistentvolume "k8s-casa-measures" not found. not found.',
        "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: "
        "0/2 nodes are available: 2 Preemption is not helpful for scheduling.",
    ],
)
def test_a_claim_that_may_yet_come_is_fatal_only_once_the_wait_is_over(message):
    pending = [{"reason": "FailedScheduling", "message": message}]
    assert spawn_failure(None, pending, IMAGE, waiting_for_claims=True) is None
    assert spawn_failure(None, pending, IMAGE).startswith("No node can run this session: 0/")
    # Other reasons do not wait.
    assert spawn_failure(None, [FAILED_SCHEDULING], IMAGE, waiting_for_claims=True) == (
        UNSCHEDULABLE
    )
    deleted = '0/1 nodes are available: persistentvolumeclaim "home" is being deleted.'
    failure = spawn_failure(
        None, [{"reason": "FailedScheduling", "message": deleted}], IMAGE, waiting_for_claims=True
    )
    assert failure == f"No node can run this session: {deleted}"


@pytest.mark.parametrize(
    ("pod", "shows"),
    [
        (None, False),
        ({"status": {"phase": "Pending"}}, False),
        (waiting("ContainerCreating"), False),
        (waiting("ErrImagePull", "manifest unknown"), True),
        (waiting("ImagePullBackOff"), True),
        (waiting("InvalidImageName"), True),
        ({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}, False),
        (
            {
                "status": {
                    "conditions": [
                        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                    ]
                }
            },
            True,
        ),
    ],
)
def test_only_a_pod_showing_trouble_needs_its_events_read(pod, shows):
    assert trouble_showing(pod) is shows

"""Pure builders: a headless run (``casaspawner run --kubernetes``) as a batch/v1 Job.

Nothing here talks to Kubernetes. :func:`run_spec` says what the run's container does (the
script, its directory, its variables), :func:`run_job` wraps it in a Job whose pod is a session's
pod without a server: the restricted Pod Security profile, the user's uid and gid, the session's
Cavern mounts and read-only measures, no service-account token, one try. In the pod,
:mod:`casaspawner.local.run_job` makes the run's directory in the user's storage and runs
the script as ``casaspawner run`` does on one machine.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

from casaspawner.kube.objects import (
    EPHEMERAL_STORAGE,
    PodSettings,
    ephemeral_storage,
    security_contexts,
    session_volumes,
)
from casaspawner.plan import SessionPlan
from casaspawner.runtime import RUN_IMAGE_KEY_ENV, RUN_IMAGE_URL_ENV
from casaspawner.session.runs import ERROR_FILE, RUN_ENV

#: The run's container.
CONTAINER = "casa-run"
#: What the container runs, after the image's entrypoint (tini and the passwd entry).
RUN_ARGS = ("python", "-m", "casaspawner.local.run_job")
#: Seconds between SIGTERM and SIGKILL: the script's own ten, and time to write the result.
GRACE_SECONDS = 30
#: Default limit on a run's time, in seconds (``--deadline``): a day.
DEFAULT_DEADLINE = 86400
#: Default time a finished Job stays to be looked at, in seconds (``--ttl``): an hour.
DEFAULT_TTL = 3600

_DNS = re.compile(r"[^a-z0-9-]+")


def job_name(username: str, run_id: str) -> str:
    """A Job name for user ``username``'s run ``run_id``: a DNS label, unique per run."""
    digest = hashlib.sha256(f"{username}\n{run_id}".encode()).hexdigest()[:8]
    stem = _DNS.sub("-", f"casa-run-{username}-{run_id}".lower()).strip("-")
    return f"{stem[:54].rstrip('-')}-{digest}"


def record_job_name(job: str, verb: str) -> str:
    """The name of the Job that completes Job ``job``'s record (:func:`record_job`)."""
    digest = hashlib.sha256(f"{job}\n{verb}".encode()).hexdigest()[:8]
    return f"{job[: 63 - len(verb) - 10].rstrip('-')}-{verb}-{digest}"


def mpi_processes(plan: SessionPlan) -> int:
    """How many ``mpicasa`` processes the chosen size gives: its CPU limit, in whole cores."""
    return max(1, int(plan.resources.cpu_limit or 1))


def run_spec(
    plan: SessionPlan,
    *,
    run_id: str,
    run_dir: str,
    script: str,
    arguments: Sequence[str],
    started: datetime,
) -> dict[str, Any]:
    """What the run's container does, in the paths the pod sees.

    ``script`` and ``run_dir`` are paths in the user's storage as the session mounts it. The
    script runs in the run's directory, or in its own directory for ``*scriptForPI.py``. The
    variables are the session's (less Jupyter's), the CASA log's and the run's error file,
    and ``OMP_NUM_THREADS`` from the size's CPU limit.
    """
    stamp = started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    casa_log = f"{run_dir}/casa-{stamp}.log"
    variables = {
        k: v
        for k, v in plan.environment.items()
        if k not in ("SCRATCH", "HOME") and not k.startswith("JUPYTER")
    }
    variables["CASASPAWNER_CASA_LOGFILE"] = casa_log
    variables["CASASPAWNER_RUN_ERROR"] = f"{run_dir}/{ERROR_FILE}"
    if plan.resources.cpu_limit:
        variables["OMP_NUM_THREADS"] = str(int(plan.resources.cpu_limit))
    path = PurePosixPath(script)
    cwd = str(path.parent) if path.name.endswith("scriptForPI.py") else run_dir
    return {
        "id": run_id,
        "run_dir": run_dir,
        "dataset": plan.options.dataset,
        "release": plan.release.id,
        "label": plan.release.label,
        "reason": plan.reason,
        "script": script,
        "arguments": list(arguments),
        "cwd": cwd,
        "environment": variables,
        "casa_log": PurePosixPath(casa_log).name,
        "pipeline": bool(plan.release.pipeline),
        "processes": mpi_processes(plan),
        "started": started.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def encode(value: Any) -> str:
    """``value`` as base64-encoded JSON, as the pod's variables carry the run and its record."""
    return base64.b64encode(json.dumps(value).encode()).decode("ascii")


def run_job(
    plan: SessionPlan,
    settings: PodSettings,
    *,
    name: str,
    image: str,
    spec: Mapping[str, Any],
    record: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
    deadline: int = DEFAULT_DEADLINE,
    ttl: int = DEFAULT_TTL,
    args: Sequence[str] = RUN_ARGS,
    environment: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job running ``spec`` (:func:`run_spec`) once, as the plan's user.

    ``record`` is the run's record (:func:`casaspawner.runtime.record_text`), which the
    pod writes beside the run. The pod mounts what a session of ``plan`` mounts but the token;
    its resources are the chosen size's; it runs at most ``deadline`` seconds and the Job is
    deleted ``ttl`` seconds after it ends. ``args`` follow the image's entrypoint;
    ``environment`` is added to the pod's variables.
    """
    pod_sc, container_sc = security_contexts(plan.identity)
    bare = dataclasses.replace(settings, token_url=None)
    volumes, mounts = session_volumes(plan, bare)
    environment = {
        **{k: v for k, v in plan.environment.items() if not k.startswith("JUPYTER")},
        "HOME": plan.home,
        RUN_ENV: encode(dict(spec)),
        "CASASPAWNER_RECORD": record,
        "CASASPAWNER_RECORD_DIR": str(spec["run_dir"]),
        **(environment or {}),
    }
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": list(args),
        "env": [{"name": k, "value": v} for k, v in environment.items()],
        "securityContext": container_sc,
        "volumeMounts": list(mounts.values()),
        "resources": container_resources(plan, settings),
        "terminationMessagePolicy": "File",
    }
    meta_labels = {**plan.labels, **labels}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": meta_labels,
            "annotations": {**plan.annotations, **(annotations or {})},
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline,
            "ttlSecondsAfterFinished": ttl,
            "template": {
                "metadata": {"labels": meta_labels},
                "spec": one_shot_spec(pod_sc, volumes, container, GRACE_SECONDS),
            },
        },
    }


def one_shot_spec(
    pod_sc: dict[str, Any],
    volumes: Mapping[str, dict[str, Any]],
    container: dict[str, Any],
    grace: int,
) -> dict[str, Any]:
    """The spec of a pod that runs ``container`` once as the user: no token, no retries."""
    return {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace,
        "securityContext": pod_sc,
        "volumes": list(volumes.values()),
        "containers": [container],
    }


def container_resources(plan: SessionPlan, settings: PodSettings) -> dict[str, Any]:
    """The chosen size's requests and limits, with the pod's local disk, for a container."""
    resources = plan.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if resources.cpu_guarantee:
        requests["cpu"] = _cores(resources.cpu_guarantee)
    if resources.mem_guarantee:
        requests["memory"] = resources.mem_guarantee
    if resources.cpu_limit:
        limits["cpu"] = _cores(resources.cpu_limit)
    if resources.mem_limit:
        limits["memory"] = resources.mem_limit
    local_disk = ephemeral_storage(settings)
    if local_disk:
        limits[EPHEMERAL_STORAGE] = local_disk
    return {"requests": requests, "limits": limits}


def _cores(value: float) -> str:
    """A CPU quantity: whole cores as ``2``, fractions in millicores (``500m``)."""
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


#: Labels Kubernetes gives a Job's pods; a new Job from an old one's template may not carry them.
_JOB_LABELS = (
    "controller-uid",
    "job-name",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
)


def record_job(job: Mapping[str, Any], *, name: str, command: Sequence[str]) -> dict[str, Any]:
    """A Job that completes a run's record after its end, as the run's user.

    ``command`` is ``("lost", WHY)``, for a run whose pod ended without a result, or
    ``("digest", SHA256)``, the digest of the image the run ran: ``run_job COMMAND DIR ARG``.
    ``job`` is the run's Job as the API gives it (camelCase). The pod is the run's, with its
    mounts, but without the run's description and record, small, for at most two minutes.
    """
    template = copy.deepcopy(dict(job["spec"]["template"]))
    labels = {
        k: v
        for k, v in (template.get("metadata") or {}).get("labels", {}).items()
        if k not in _JOB_LABELS
    }
    spec = template["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    run_dir = env["CASASPAWNER_RECORD_DIR"]
    verb, *rest = command
    container["args"] = [*RUN_ARGS, verb, run_dir, *rest]
    dropped = (RUN_ENV, "CASASPAWNER_RECORD", RUN_IMAGE_URL_ENV, RUN_IMAGE_KEY_ENV)
    container["env"] = [e for e in container["env"] if e["name"] not in dropped]
    limits = {"cpu": "1", "memory": "512Mi"}
    if EPHEMERAL_STORAGE in container.get("resources", {}).get("limits", {}):
        limits[EPHEMERAL_STORAGE] = "64Mi"
    container["resources"] = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": limits}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 120,
            "ttlSecondsAfterFinished": 60,
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }

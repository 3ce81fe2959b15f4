"""Pure builders: a ``SessionPlan`` → the KubeSpawner fields of one hardened pod, and the token Secret.

Nothing here talks to Kubernetes or reads traits: ``session_fields(plan, settings)`` returns the values
``CASASpawner`` assigns to KubeSpawner traits, ``token_secret(...)`` the Secret manifest. Tests exercise these
functions directly (schema + restricted Pod Security Standard) and through the real KubeSpawner.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from casaspawner.errors import InvalidInput
from casaspawner.plan import Identity, Mount, SessionPlan

#: Volume sources the Cavern storage may use. Inline ``cephfs``, ``nfs`` and ``hostPath`` are not allowed by
#: the *restricted* Pod Security Standard (``hostPath`` not even by *baseline*): expose such storage through a
#: PersistentVolume and claim (``persistentVolumeClaim``) or a CSI driver (``csi``), or lower the level.
STORAGE_KINDS = ("persistentVolumeClaim", "csi", "cephfs", "nfs", "hostPath")
#: Pod Security Standard level → the storage volume kinds a pod of that level may use.
LEVEL_KINDS: dict[str, frozenset[str]] = {
    "restricted": frozenset({"persistentVolumeClaim", "csi"}),
    "baseline": frozenset({"persistentVolumeClaim", "csi", "cephfs", "nfs"}),
    "privileged": frozenset(STORAGE_KINDS),
}
#: Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
#: KubeSpawner's main container (``poll`` and the server URL depend on it).
CONTAINER = "notebook"
#: ``extra_resource_limits`` key of the container's ephemeral storage (scratch + ``/tmp``).
EPHEMERAL_STORAGE = "ephemeral-storage"
TOKEN_FILE = "token"  # noqa: S105 - a file name, not a secret
STORAGE_VOLUME = "casa-storage"

_QUANTITY = re.compile(
    r"\+?(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[mkMGTPE]|[eE][+-]?[0-9]+)?"
)
_BINARY = {f"{p}i": 1024 ** (n + 1) for n, p in enumerate("KMGTPE")}
_DECIMAL = {
    "m": Decimal("0.001"),
    "": Decimal(1),
    **{p: Decimal(1000) ** (n + 1) for n, p in enumerate("kMGTPE")},
}


def quantity_bytes(text: str) -> int | None:
    """The number of bytes a Kubernetes quantity (``20Gi``, ``500M``, ``1e9``) stands for, rounded up; None
    when ``text`` is not a quantity (``"20 gigs"``)."""
    match = _QUANTITY.fullmatch(str(text).strip()) if isinstance(text, str | int) else None
    if match is None:
        return None
    suffix = match["suffix"] or ""
    try:
        number = Decimal(match["number"])
        if suffix[:1] in ("e", "E"):
            value = number * Decimal(10) ** int(suffix[1:])
        else:
            value = number * (_BINARY.get(suffix) or _DECIMAL[suffix])
    except (InvalidOperation, OverflowError):
        return None
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def format_bytes(count: int) -> str:
    """A byte count as the shortest exact quantity: ``21Gi``, ``1536Mi`` or plain bytes."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if count and count % unit == 0:
            return f"{count // unit}{suffix}"
    return str(count)


@dataclass(frozen=True)
class PodSettings:
    """Operator choices the pod depends on (CASASpawner traits fill this in)."""

    storage_volume: Mapping[str, Any] = field(
        default_factory=lambda: {"persistentVolumeClaim": {"claimName": "cavern"}}
    )
    measures_volume: Mapping[str, Any] = field(
        default_factory=lambda: {"persistentVolumeClaim": {"claimName": "casa-measures", "readOnly": True}}
    )
    scratch_size_limit: str = "20Gi"
    tmp_size_limit: str = "1Gi"
    token_secret_name: str | None = None  # None: no token, no Secret, no volume
    token_mount_dir: str = "/var/run/secrets/casaspawner"  # noqa: S105 - a directory
    command: tuple[str, ...] = ("jupyterhub-singleuser",)
    security_level: str = "restricted"


#: What each storage kind needs to be a valid volume source (the Kubernetes API refuses it otherwise).
_REQUIRED_SETTINGS: dict[str, tuple[str, ...]] = {
    "persistentVolumeClaim": ("claimName",),
    "csi": ("driver",),
    "cephfs": ("monitors",),
    "nfs": ("server", "path"),
    "hostPath": ("path",),
}


def _check_level(level: str) -> None:
    if level not in LEVEL_KINDS:
        raise InvalidInput(
            f"CASASpawner.pod_security_level is {level!r}, not a Pod Security Standard level (restricted, baseline "
            "or privileged)."
        )


def volume_source(raw: Mapping[str, Any], what: str, level: str = "restricted") -> dict[str, Any]:
    """A copy of a Kubernetes volume source of one allowed kind at Pod Security ``level``; else ``InvalidInput``."""
    _check_level(level)
    if not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in STORAGE_KINDS:
        raise InvalidInput(
            f"The {what} volume must be exactly one of {', '.join(STORAGE_KINDS)} (a Kubernetes volume source)."
        )
    kind, spec = next(iter(raw.items()))
    if kind not in LEVEL_KINDS[level]:
        raise InvalidInput(
            f"The {what} volume is an inline {kind} volume, which the {level} Pod Security Standard forbids; "
            "use a PersistentVolumeClaim or a CSI driver, or lower CASASpawner.pod_security_level."
        )
    if not isinstance(spec, Mapping):
        raise InvalidInput(f"The {what} volume's {kind} settings must be a mapping.")
    missing = [key for key in _REQUIRED_SETTINGS[kind] if not spec.get(key)]
    if missing:
        raise InvalidInput(f"The {what} volume's {kind} settings need {' and '.join(missing)}.")
    return {kind: copy.deepcopy(dict(spec))}


def security_contexts(identity: Identity) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts: non-root, read-only root, no capabilities, RuntimeDefault seccomp."""
    if identity.uid <= 0:
        raise InvalidInput(
            f"User {identity.username} would run as uid {identity.uid}; sessions never run as root."
        )
    seccomp = {"type": "RuntimeDefault"}
    pod: dict[str, Any] = {
        "runAsUser": identity.uid,
        "runAsGroup": identity.gid,
        "runAsNonRoot": True,
        "seccompProfile": dict(seccomp),
    }
    if identity.supplemental_gids:
        pod["supplementalGroups"] = list(identity.supplemental_gids)
    container = {
        "runAsUser": identity.uid,
        "runAsGroup": identity.gid,
        "runAsNonRoot": True,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": dict(seccomp),
    }
    return pod, container


def session_volumes(
    plan: SessionPlan, settings: PodSettings
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(volumes, volume mounts) as KubeSpawner's dict form (keys order the entries)."""
    volumes: dict[str, dict[str, Any]] = {}
    mounts: dict[str, dict[str, Any]] = {}
    for mount in plan.mounts:
        _add_mount(mount, settings, volumes, mounts)
    volumes["casa-tmp"] = {"name": "casa-tmp", "emptyDir": {"sizeLimit": settings.tmp_size_limit}}
    mounts["casa-tmp"] = {"name": "casa-tmp", "mountPath": "/tmp"}  # noqa: S108 - the pod's own writable /tmp
    if settings.token_secret_name:
        volumes["casa-token"] = {
            "name": "casa-token",
            "secret": {
                "secretName": settings.token_secret_name,
                "items": [{"key": TOKEN_FILE, "path": TOKEN_FILE}],
                "defaultMode": 0o444,  # no fsGroup (it would chown all of Cavern): the single user reads it
            },
        }
        mounts["casa-token"] = {"name": "casa-token", "mountPath": settings.token_mount_dir, "readOnly": True}
    return volumes, mounts


def _add_mount(
    mount: Mount, settings: PodSettings, volumes: dict[str, dict[str, Any]], mounts: dict[str, dict[str, Any]]
) -> None:
    key = f"casa-{mount.name}"
    if mount.kind == "storage":
        volumes[STORAGE_VOLUME] = {
            "name": STORAGE_VOLUME,
            **volume_source(settings.storage_volume, "storage", settings.security_level),
        }
        entry: dict[str, Any] = {"name": STORAGE_VOLUME, "mountPath": mount.path}
        if mount.sub_path:
            entry["subPath"] = mount.sub_path
    elif mount.kind == "scratch":
        volumes[key] = {"name": key, "emptyDir": {"sizeLimit": settings.scratch_size_limit}}
        entry = {"name": key, "mountPath": mount.path}
    else:
        volumes[key] = {
            "name": key,
            **volume_source(settings.measures_volume, "measures data", settings.security_level),
        }
        entry = {"name": key, "mountPath": mount.path}
    if mount.read_only:
        entry["readOnly"] = True
    mounts[key] = entry


def merge_keeping(existing: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """``ours`` added to ``existing`` without replacing any key already there (z2jh's labels stay)."""
    return {**ours, **existing}


def _keyed(entries: Mapping[str, Any] | list[Any] | None) -> dict[str, Any]:
    """KubeSpawner takes volumes as a list or a dict sorted by key; lists keep their order, before ours."""
    if isinstance(entries, list):
        return {f"{index:04d}": entry for index, entry in enumerate(entries)}
    return dict(entries or {})


def session_fields(
    plan: SessionPlan,
    settings: PodSettings,
    *,
    environment: Mapping[str, Any] | None = None,
    volumes: Mapping[str, Any] | list[Any] | None = None,
    volume_mounts: Mapping[str, Any] | list[Any] | None = None,
    extra_labels: Mapping[str, str] | None = None,
    extra_annotations: Mapping[str, str] | None = None,
    extra_resource_limits: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The KubeSpawner trait values for ``plan``; dict traits are merged into the given current values.

    ``environment`` is the spawner's, with the session's variables already in it (the spawner merges
    ``plan.environment`` in one place); only the token file's variable is added here.

    The container's ``ephemeral-storage`` limit is scratch + ``/tmp`` (Kubernetes then requests as much, so the
    scheduler only picks a node with that much local disk free), unless the operator set one already.
    """
    pod_sc, container_sc = security_contexts(plan.identity)
    vols, mnts = session_volumes(plan, settings)
    env = dict(environment or {})
    if settings.token_secret_name:
        env["CASASPAWNER_TOKEN_FILE"] = f"{settings.token_mount_dir.rstrip('/')}/{TOKEN_FILE}"
    resources = plan.resources
    local_disk = ephemeral_storage(settings)
    return {
        "image": plan.image,
        "cmd": list(settings.command),
        "default_url": plan.default_url,
        "working_dir": plan.home,
        "environment": env,
        "volumes": {**_keyed(volumes), **vols},
        "volume_mounts": {**_keyed(volume_mounts), **mnts},
        "uid": plan.identity.uid,
        "gid": plan.identity.gid,
        "fs_gid": None,
        "supplemental_gids": list(plan.identity.supplemental_gids),
        "privileged": False,
        "allow_privilege_escalation": False,
        "pod_security_context": pod_sc,
        "container_security_context": container_sc,
        "automount_service_account_token": False,
        "service_account": None,
        "extra_labels": merge_keeping(extra_labels or {}, plan.labels),
        "extra_annotations": merge_keeping(extra_annotations or {}, plan.annotations),
        "cpu_guarantee": resources.cpu_guarantee or None,
        "cpu_limit": resources.cpu_limit or None,
        "mem_guarantee": resources.mem_guarantee or None,
        "mem_limit": resources.mem_limit or None,
        "extra_resource_limits": merge_keeping(
            extra_resource_limits or {}, {EPHEMERAL_STORAGE: local_disk} if local_disk else {}
        ),
    }


def ephemeral_storage(settings: PodSettings) -> str | None:
    """Scratch + ``/tmp`` as one quantity (None if either is not a quantity; the spawner checks them first)."""
    sizes = [quantity_bytes(settings.scratch_size_limit), quantity_bytes(settings.tmp_size_limit)]
    if any(size is None for size in sizes):
        return None
    return format_bytes(sum(size for size in sizes if size is not None))


def token_secret(
    name: str,
    token: str | None,
    *,
    owner_name: str,
    owner_uid: str,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Secret holding the user's access token, owned by (and deleted with) the session pod.

    ``token=None`` gives the manifest without ``data`` (what the dry run prints).
    """
    manifest: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": owner_name,
                    "uid": owner_uid,
                    "blockOwnerDeletion": True,
                    "controller": False,
                }
            ],
        },
    }
    if token is not None:
        manifest["data"] = {TOKEN_FILE: base64.b64encode(token.encode()).decode("ascii")}
    return manifest


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


# --------------------------------------------------------------------------------- Pod Security Standards
#: Pod Security Standard levels, strictest first; each level includes the checks of the weaker ones.
PSS_LEVELS = tuple(LEVEL_KINDS)
_BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
        "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
_SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)  # fmt: skip
_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
_CONTAINER_FIELDS = {
    "containers": "container",
    "initContainers": "init container",
    "ephemeralContainers": "ephemeral container",
}


def _pod_containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key, word in _CONTAINER_FIELDS.items():
        for container in spec.get(key) or []:
            yield f"{word} {container.get('name')}", container


def pod_security_violations(pod: Mapping[str, Any], level: str = "restricted") -> list[str]:
    """What in a pod manifest (camelCase, as submitted) breaks the Pod Security Standard ``level``.

    Implements the *baseline* and *restricted* policies (policy version "latest") for every container, init
    container and ephemeral container; *privileged* allows everything. Each finding is a short phrase such as
    "init container block-cloud-metadata is privileged".
    """
    _check_level(level)
    if level == "privileged":
        return []
    found: list[str] = []
    spec: Mapping[str, Any] = pod.get("spec") or {}
    psc: Mapping[str, Any] = spec.get("securityContext") or {}
    containers = list(_pod_containers(spec))
    contexts = [("the pod", psc)] + [(where, c.get("securityContext") or {}) for where, c in containers]

    # baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"the pod sets {key}")
    for where, sc in contexts:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where} is a Windows host process")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in _SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"{where} sets SELinux options")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            found.append(f"{where} runs without seccomp")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"{where} runs without AppArmor")
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or str(value).startswith("localhost/")
        ):
            found.append(f"the annotation {key} turns AppArmor off")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            found.append(f"the pod sets the sysctl {sysctl.get('name')}")
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            found.append(f"the volume {volume.get('name')} is a hostPath volume")
    for where, container in containers:
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{where} is privileged")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - _BASELINE_CAPABILITIES:
            found.append(f"{where} adds the capabilities {', '.join(sorted(added - _BASELINE_CAPABILITIES))}")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"{where} uses a host port")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{where} sets procMount")
    if level == "baseline":
        return found

    # restricted
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if kinds - RESTRICTED_VOLUME_TYPES and "hostPath" not in kinds:
            found.append(f"the volume {volume.get('name')} is a {', '.join(sorted(kinds))} volume")
    pod_non_root = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsUser") == 0:
        found.append("the pod runs as uid 0")
    for where, container in containers:
        sc = container.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where} allows privilege escalation")
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot") is True):
            found.append(f"{where} may run as root")
        if sc.get("runAsUser") == 0:
            found.append(f"{where} runs as uid 0")
        if (sc.get("seccompProfile") or {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where} has no seccomp profile")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{where} does not drop all capabilities")
        # (capabilities outside the baseline set are reported above)
        added = set(capabilities.get("add") or []) & _BASELINE_CAPABILITIES - {"NET_BIND_SERVICE"}
        if added:
            found.append(f"{where} adds the capabilities {', '.join(sorted(added))}")
    return found


def pod_security_sentence(violations: list[str], level: str) -> str | None:
    """One sentence about a pod that breaks its Pod Security Standard level (None when it does not)."""
    if not violations:
        return None
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return (
        f"The session pod breaks the {level} Pod Security Standard: {violations[0]}{more}; change the hub's "
        "configuration (init containers, extra containers, volumes, extra_*_config, modify_pod_hook) or "
        "CASASpawner.pod_security_level."
    )


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

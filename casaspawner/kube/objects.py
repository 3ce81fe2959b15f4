"""Pure builders: a session plan into pod fields.

Nothing here talks to Kubernetes or reads traits: ``session_fields(plan, settings)`` returns the
values ``CASASpawner`` assigns to KubeSpawner traits. Tests exercise these functions directly
(schema and the restricted Pod Security Standard) and through the real KubeSpawner.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from casaspawner.errors import InvalidInput
from casaspawner.insession.access_token import FILE_ENV as TOKEN_FILE_ENV
from casaspawner.insession.access_token import URL_ENV as TOKEN_URL_ENV
from casaspawner.kube.podsecurity import LEVEL_KINDS, STORAGE_KINDS, check_level
from casaspawner.kube.quantities import format_bytes, quantity_bytes
from casaspawner.plan import Identity, Mount, SessionPlan, root_refusal

#: KubeSpawner's main container.
#:
#: ``poll`` and the server URL depend on its name.
CONTAINER = "notebook"
#: ``extra_resource_limits`` key of the container's ephemeral storage (scratch and ``/tmp``).
EPHEMERAL_STORAGE = "ephemeral-storage"
#: The token's file name in its directory.
TOKEN_FILE = "token"  # noqa: S105
#: The session's token directory: an emptyDir in memory, for one small file.
TOKEN_VOLUME = "casa-token"  # noqa: S105
#: The hub API's path, under its API URL, that sessions fetch the access token from.
#:
#: ``services/access_token.py`` serves it.
TOKEN_PATH = "casa-token"  # noqa: S105
STORAGE_VOLUME = "casa-storage"
#: The session's measures volume (the desktop's apps read its version from its mount).
MEASURES_VOLUME = "casa-measures"


def _measures_claim() -> dict[str, Any]:
    return {"persistentVolumeClaim": {"claimName": "casa-measures", "readOnly": True}}


@dataclass(frozen=True)
class PodSettings:
    """Operator choices the pod depends on; CASASpawner traits fill it in."""

    storage_volume: Mapping[str, Any] = field(
        default_factory=lambda: {"persistentVolumeClaim": {"claimName": "cavern"}}
    )
    measures_volume: Mapping[str, Any] = field(default_factory=_measures_claim)
    scratch_size_limit: str = "20Gi"
    tmp_size_limit: str = "1Gi"
    #: Where the session fetches the user's access token from the hub; None: the user has none,
    #: so no token directory either.
    token_url: str | None = None
    token_mount_dir: str = "/var/run/secrets/casaspawner"  # noqa: S105
    command: tuple[str, ...] = ("jupyterhub-singleuser",)
    security_level: str = "restricted"


#: What each storage kind needs to be a valid volume source.
#:
#: The Kubernetes API refuses it otherwise.
_REQUIRED_SETTINGS: dict[str, tuple[str, ...]] = {
    "persistentVolumeClaim": ("claimName",),
    "csi": ("driver",),
    "cephfs": ("monitors",),
    "nfs": ("server", "path"),
    "hostPath": ("path",),
}


def volume_source(raw: Mapping[str, Any], what: str, level: str = "restricted") -> dict[str, Any]:
    """A copy of a volume source of one kind allowed at Pod Security ``level``.

    Anything else raises ``InvalidInput``.
    """
    check_level(level)
    if not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in STORAGE_KINDS:
        raise InvalidInput(
            f"The {what} volume must be exactly one of {', '.join(STORAGE_KINDS)} (a Kubernetes "
            "volume source)."
        )
    kind, spec = next(iter(raw.items()))
    if kind not in LEVEL_KINDS[level]:
        raise InvalidInput(
            f"The {what} volume is an inline {kind} volume, which the {level} Pod Security "
            "Standard forbids; use a PersistentVolumeClaim or a CSI driver, or lower "
            "CASASpawner.pod_security_level."
        )
    if not isinstance(spec, Mapping):
        raise InvalidInput(f"The {what} volume's {kind} settings must be a mapping.")
    missing = [key for key in _REQUIRED_SETTINGS[kind] if not spec.get(key)]
    if missing:
        raise InvalidInput(f"The {what} volume's {kind} settings need {' and '.join(missing)}.")
    return {kind: copy.deepcopy(dict(spec))}


def security_contexts(identity: Identity) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod's and the container's security contexts for ``identity``.

    Non-root, a read-only root, no capabilities, the RuntimeDefault seccomp profile.
    """
    if identity.uid <= 0:
        raise root_refusal(identity.username, identity.uid)
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
    """The volumes and volume mounts, in KubeSpawner's dict form.

    The keys order the entries.
    """
    volumes: dict[str, dict[str, Any]] = {}
    mounts: dict[str, dict[str, Any]] = {}
    for mount in plan.mounts:
        _add_mount(mount, settings, volumes, mounts)
    # The pod's own writable /tmp.
    volumes["casa-tmp"] = {"name": "casa-tmp", "emptyDir": {"sizeLimit": settings.tmp_size_limit}}
    mounts["casa-tmp"] = {"name": "casa-tmp", "mountPath": "/tmp"}  # noqa: S108
    if settings.token_url:
        # The session writes the token it fetched here, 0600; the directory lives and dies with
        # the pod, and survives its container's restarts.
        volumes[TOKEN_VOLUME] = {
            "name": TOKEN_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
        }
        mounts[TOKEN_VOLUME] = {"name": TOKEN_VOLUME, "mountPath": settings.token_mount_dir}
    return volumes, mounts


def _add_mount(
    mount: Mount,
    settings: PodSettings,
    volumes: dict[str, dict[str, Any]],
    mounts: dict[str, dict[str, Any]],
) -> None:
    key = f"casa-{mount.name}"
    if mount.kind == "storage":
        volumes[STORAGE_VOLUME] = {
            "name": STORAGE_VOLUME,
            **volume_source(settings.storage_volume, "storage", settings.security_level),
        }
        entry: dict[str, Any] = {"name": STORAGE_VOLUME, "mountPath": mount.path}
    elif mount.kind == "scratch":
        volumes[key] = {"name": key, "emptyDir": {"sizeLimit": settings.scratch_size_limit}}
        entry = {"name": key, "mountPath": mount.path}
    else:
        key = MEASURES_VOLUME
        volumes[key] = {
            "name": key,
            **volume_source(settings.measures_volume, "measures data", settings.security_level),
        }
        entry = {"name": key, "mountPath": mount.path}
    # A Cavern directory, or one version of measures kept by version.
    if mount.sub_path:
        entry["subPath"] = mount.sub_path
    if mount.read_only:
        entry["readOnly"] = True
    mounts[key] = entry


def literal(values: Mapping[str, str]) -> dict[str, str]:
    """``values`` with their braces doubled, so KubeSpawner's expansion gives them back as written.

    KubeSpawner expands ``{username}``-style templates in the environment, labels, annotations and
    volumes. The session's own values are not templates: a dataset directory may be ``a{b}``.
    """
    return {key: value.replace("{", "{{").replace("}", "}}") for key, value in values.items()}


def merge_keeping(existing: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """``ours`` added to ``existing`` without replacing any key already there.

    So z2jh's labels stay.
    """
    return {**ours, **existing}


def _keyed(entries: Mapping[str, Any] | list[Any] | None) -> dict[str, Any]:
    """Volumes as a dict sorted by key.

    KubeSpawner takes a list or a dict; lists keep their order, before ours.
    """
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
    """The KubeSpawner trait values for ``plan``.

    Dict traits are merged into the given current values. ``environment`` is the spawner's,
    with the session's variables already in it (the spawner merges ``plan.environment`` in one
    place); only the token's variables (its file, and where to fetch it) are added here.

    The container's ``ephemeral-storage`` limit is scratch plus ``/tmp`` (Kubernetes then
    requests as much, so the scheduler only picks a node with that much local disk free),
    unless the operator set one already.
    """
    pod_sc, container_sc = security_contexts(plan.identity)
    vols, mnts = session_volumes(plan, settings)
    env = dict(environment or {})
    if settings.token_url:
        env[TOKEN_FILE_ENV] = f"{settings.token_mount_dir.rstrip('/')}/{TOKEN_FILE}"
        env[TOKEN_URL_ENV] = settings.token_url
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
        "extra_annotations": merge_keeping(extra_annotations or {}, literal(plan.annotations)),
        "cpu_guarantee": resources.cpu_guarantee or None,
        "cpu_limit": resources.cpu_limit or None,
        "mem_guarantee": resources.mem_guarantee or None,
        "mem_limit": resources.mem_limit or None,
        "extra_resource_limits": merge_keeping(
            extra_resource_limits or {}, {EPHEMERAL_STORAGE: local_disk} if local_disk else {}
        ),
    }


def record_pod(
    plan: SessionPlan,
    settings: PodSettings,
    *,
    name: str,
    image: str,
    command: list[str],
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """A pod that completes a killed session's record, as the user, in the session's image.

    It mounts the user's storage as the session did, and nothing else of it: no token, no
    measures, no network use. It runs ``command`` once, for at most two minutes.
    """
    pod_sc, container_sc = security_contexts(plan.identity)
    bare = PodSettings(**{**settings.__dict__, "token_url": None})
    volumes, mounts = session_volumes(plan, bare)
    kept = [key for key, mount in mounts.items() if mount["name"] in (STORAGE_VOLUME, "casa-tmp")]
    names = {mounts[key]["name"] for key in kept}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": 120,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": pod_sc,
            "volumes": [v for v in volumes.values() if v["name"] in names],
            "containers": [
                {
                    "name": "record",
                    "image": image,
                    "command": list(command),
                    "env": [{"name": "HOME", "value": plan.home}],
                    "securityContext": container_sc,
                    "volumeMounts": [mounts[key] for key in kept],
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "128Mi"},
                        "limits": {"cpu": "1", "memory": "512Mi", EPHEMERAL_STORAGE: "64Mi"},
                    },
                }
            ],
        },
    }


def ephemeral_storage(settings: PodSettings) -> str | None:
    """Scratch plus ``/tmp`` as one quantity.

    None if either is not a quantity; the spawner checks them first.
    """
    sizes = [quantity_bytes(settings.scratch_size_limit), quantity_bytes(settings.tmp_size_limit)]
    if any(size is None for size in sizes):
        return None
    return format_bytes(sum(size for size in sizes if size is not None))


def pod_addresses(pod: Mapping[str, Any]) -> set[str]:
    """The addresses of ``pod`` (a pod as KubeSpawner's reflector holds it), normalised."""
    status = pod.get("status") or {}
    found = [status.get("podIP")] + [entry.get("ip") for entry in status.get("podIPs") or []]
    return {plain_address(address) for address in found if address}


def plain_address(address: str) -> str:
    """``address`` in one spelling: an IPv4 address mapped into IPv6 as IPv4."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)

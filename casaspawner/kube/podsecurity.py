"""Pod Security Standards: which volumes a level allows, and what a pod breaks.

``CASASpawner`` checks the final pod, after every operator setting and hook, against its
``pod_security_level`` before submitting it; the real admission controller of a namespace that
enforces a level checks it again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from casaspawner.errors import InvalidInput

#: Volume sources the Cavern storage may use.
#:
#: Inline ``cephfs``, ``nfs`` and ``hostPath`` are not allowed by the *restricted* Pod Security
#: Standard (``hostPath`` not even by *baseline*): expose such storage through a PersistentVolume
#: and claim (``persistentVolumeClaim``) or a CSI driver (``csi``), or lower the level.
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


def check_level(level: str) -> None:
    """Refuse, in one sentence, a level that is not a Pod Security Standard level."""
    if level not in LEVEL_KINDS:
        raise InvalidInput(
            f"CASASpawner.pod_security_level is {level!r}, not a Pod Security Standard level "
            "(restricted, baseline or privileged)."
        )


#: Pod Security Standard levels, strictest first.
#:
#: Each level includes the checks of the weaker ones.
PSS_LEVELS = tuple(LEVEL_KINDS)
#: Capabilities the baseline level lets a container add.
_BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
#: Sysctls every level allows.
_SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
_SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
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
    """What in a pod manifest breaks the Pod Security Standard ``level``.

    The manifest is as submitted (camelCase). Implements the *baseline* and *restricted*
    policies (policy version "latest") for every container, init container and ephemeral
    container; *privileged* allows everything. Each finding is a short phrase such as "init
    container block-cloud-metadata is privileged".
    """
    check_level(level)
    if level == "privileged":
        return []
    found: list[str] = []
    spec: Mapping[str, Any] = pod.get("spec") or {}
    psc: Mapping[str, Any] = spec.get("securityContext") or {}
    containers = list(_pod_containers(spec))
    contexts = [("the pod", psc)] + [
        (where, c.get("securityContext") or {}) for where, c in containers
    ]

    # baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"the pod sets {key}")
    for where, sc in contexts:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where} is a Windows host process")
        selinux = sc.get("seLinuxOptions") or {}
        if (
            selinux.get("type", "") not in _SELINUX_TYPES
            or selinux.get("user")
            or selinux.get("role")
        ):
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
        beyond = sorted(added - _BASELINE_CAPABILITIES)
        if beyond:
            found.append(f"{where} adds the capabilities {', '.join(beyond)}")
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
        if (sc.get("seccompProfile") or {}).get("type", pod_seccomp) not in (
            "RuntimeDefault",
            "Localhost",
        ):
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
    """One sentence about a pod that breaks its Pod Security Standard level.

    None when it does not.
    """
    if not violations:
        return None
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return (
        f"The session pod breaks the {level} Pod Security Standard: {violations[0]}{more}; "
        "change the hub's configuration (init containers, extra containers, volumes, "
        "extra_*_config, modify_pod_hook) or CASASpawner.pod_security_level."
    )

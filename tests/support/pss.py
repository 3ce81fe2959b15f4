"""A checker for the Kubernetes Pod Security Standards, *restricted* profile (which includes
*baseline*).

Written from the policy text (kubernetes.io/docs/concepts/security/pod-security-standards, policy
version "latest"): each rule is one function returning the violations it finds in a pod manifest
(camelCase JSON). Independent of casaspawner's own code on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Pod = Mapping[str, Any]

BASELINE_CAPABILITIES = {
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
SAFE_SYSCTLS = {
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
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _spec(pod: Pod) -> Mapping[str, Any]:
    return pod.get("spec") or {}


def _containers(pod: Pod) -> Iterator[tuple[str, Mapping[str, Any]]]:
    spec = _spec(pod)
    for field in ("containers", "initContainers", "ephemeralContainers"):
        for container in spec.get(field) or []:
            yield f"{field}[{container.get('name')}]", container


def _psc(pod: Pod) -> Mapping[str, Any]:
    return _spec(pod).get("securityContext") or {}


def _csc(container: Mapping[str, Any]) -> Mapping[str, Any]:
    return container.get("securityContext") or {}


# ------------------------------------------------------------------------------------------------
# baseline
def host_process(pod: Pod) -> list[str]:
    found = []
    if (_psc(pod).get("windowsOptions") or {}).get("hostProcess"):
        found.append("pod windowsOptions.hostProcess is true")
    for where, c in _containers(pod):
        if (_csc(c).get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where} windowsOptions.hostProcess is true")
    return found


def host_namespaces(pod: Pod) -> list[str]:
    return [
        f"{key} is true" for key in ("hostNetwork", "hostPID", "hostIPC") if _spec(pod).get(key)
    ]


def privileged(pod: Pod) -> list[str]:
    return [f"{where} is privileged" for where, c in _containers(pod) if _csc(c).get("privileged")]


def capabilities_baseline(pod: Pod) -> list[str]:
    found = []
    for where, c in _containers(pod):
        for cap in (_csc(c).get("capabilities") or {}).get("add") or []:
            if cap not in BASELINE_CAPABILITIES:
                found.append(f"{where} adds capability {cap}")
    return found


def host_path_volumes(pod: Pod) -> list[str]:
    return [
        f"volume {v.get('name')} is a hostPath"
        for v in _spec(pod).get("volumes") or []
        if "hostPath" in v
    ]


def host_ports(pod: Pod) -> list[str]:
    found = []
    for where, c in _containers(pod):
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{where} uses hostPort {port['hostPort']}")
    return found


def apparmor(pod: Pod) -> list[str]:
    found = []
    contexts = [("pod", _psc(pod))] + [(w, _csc(c)) for w, c in _containers(pod)]
    for where, ctx in contexts:
        profile = (ctx.get("appArmorProfile") or {}).get("type")
        if profile not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"{where} AppArmor profile is {profile}")
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        prefixed = key.startswith("container.apparmor.security.beta.kubernetes.io/")
        if prefixed and value != "runtime/default" and not value.startswith("localhost/"):
            found.append(f"annotation {key} is {value}")
    return found


def selinux(pod: Pod) -> list[str]:
    found = []
    contexts = [("pod", _psc(pod))] + [(w, _csc(c)) for w, c in _containers(pod)]
    for where, ctx in contexts:
        options = ctx.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            found.append(f"{where} SELinux type {options['type']}")
        for key in ("user", "role"):
            if options.get(key):
                found.append(f"{where} sets SELinux {key}")
    return found


def proc_mount(pod: Pod) -> list[str]:
    return [
        f"{where} procMount is {_csc(c)['procMount']}"
        for where, c in _containers(pod)
        if _csc(c).get("procMount") not in (None, "Default")
    ]


def seccomp_baseline(pod: Pod) -> list[str]:
    found = []
    contexts = [("pod", _psc(pod))] + [(w, _csc(c)) for w, c in _containers(pod)]
    for where, ctx in contexts:
        if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where} seccomp profile is Unconfined")
    return found


def sysctls(pod: Pod) -> list[str]:
    return [
        f"sysctl {s.get('name')} is not safe"
        for s in _psc(pod).get("sysctls") or []
        if s.get("name") not in SAFE_SYSCTLS
    ]


# ------------------------------------------------------------------------------------------------
# restricted
def volume_types(pod: Pod) -> list[str]:
    found = []
    for volume in _spec(pod).get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(
                f"volume {volume.get('name')} has type "
                f"{', '.join(sorted(kinds - RESTRICTED_VOLUMES))}"
            )
    return found


def privilege_escalation(pod: Pod) -> list[str]:
    return [
        f"{where} does not set allowPrivilegeEscalation: false"
        for where, c in _containers(pod)
        if _csc(c).get("allowPrivilegeEscalation") is not False
    ]


def run_as_non_root(pod: Pod) -> list[str]:
    pod_level = _psc(pod).get("runAsNonRoot")
    found = []
    for where, c in _containers(pod):
        value = _csc(c).get("runAsNonRoot")
        if value is False or (value is None and pod_level is not True):
            found.append(f"{where} may run as root (runAsNonRoot not true)")
    if pod_level is False:
        found.append("pod sets runAsNonRoot: false")
    return found


def run_as_user(pod: Pod) -> list[str]:
    found = ["pod runAsUser is 0"] if _psc(pod).get("runAsUser") == 0 else []
    found += [
        f"{where} runAsUser is 0" for where, c in _containers(pod) if _csc(c).get("runAsUser") == 0
    ]
    return found


def seccomp_restricted(pod: Pod) -> list[str]:
    pod_type = (_psc(pod).get("seccompProfile") or {}).get("type")
    found = []
    for where, c in _containers(pod):
        kind = (_csc(c).get("seccompProfile") or {}).get("type") or pod_type
        if kind not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where} has no RuntimeDefault or Localhost seccomp profile")
    return found


def capabilities_restricted(pod: Pod) -> list[str]:
    found = []
    for where, c in _containers(pod):
        caps = _csc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{where} does not drop ALL capabilities")
        for cap in caps.get("add") or []:
            if cap != "NET_BIND_SERVICE":
                found.append(f"{where} adds capability {cap}")
    return found


BASELINE_RULES: dict[str, Callable[[Pod], list[str]]] = {
    "host-process": host_process,
    "host-namespaces": host_namespaces,
    "privileged": privileged,
    "capabilities-baseline": capabilities_baseline,
    "host-path-volumes": host_path_volumes,
    "host-ports": host_ports,
    "apparmor": apparmor,
    "selinux": selinux,
    "proc-mount": proc_mount,
    "seccomp-baseline": seccomp_baseline,
    "sysctls": sysctls,
}
RESTRICTED_RULES: dict[str, Callable[[Pod], list[str]]] = {
    **BASELINE_RULES,
    "volume-types": volume_types,
    "privilege-escalation": privilege_escalation,
    "run-as-non-root": run_as_non_root,
    "run-as-user": run_as_user,
    "seccomp-restricted": seccomp_restricted,
    "capabilities-restricted": capabilities_restricted,
}


def restricted_violations(pod: Pod) -> dict[str, list[str]]:
    """Rule name → violations, for every rule of the restricted profile that the pod breaks."""
    if pod.get("kind") not in (None, "Pod"):
        raise ValueError(f"not a pod: {pod.get('kind')}")
    return {name: found for name, rule in RESTRICTED_RULES.items() if (found := rule(pod))}

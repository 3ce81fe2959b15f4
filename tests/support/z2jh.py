"""The Zero to JupyterHub chart's hub configuration, replayed offline for the values tests.

Pinned to one chart source: ``jupyterhub/zero-to-jupyterhub-k8s`` at commit :data:`CHART_COMMIT`
(48ea50e, on main just after chart 4.4.0, appVersion :data:`CHART_APP_VERSION` 5.5.0, the
JupyterHub its hub image runs). The chart's values schema and defaults the tests validate against
come from that commit too; they are not part of the repository: they are read from
``$CASASPAWNER_SHARED_DATA`` when set, else from ``../shared/data/`` beside the clone (``.ci/run``
exports the variable when it finds them on the machine); tests that need them skip with that reason
otherwise, and one checks that the data's README names the same commit and appVersion.

:func:`chart_config` is a hand-written replay of what that commit's
``jupyterhub/files/hub/jupyterhub_config.py`` does with the merged values, for the parts a
casaspawner hub depends on: ``singleuser.*`` into ``KubeSpawner`` traits (``extraEnv`` →
``environment``, ``startTimeout`` → ``start_timeout``, …), the culler from ``cull.*``,
``hub.services`` and ``hub.loadRoles`` into lists, ``hub.config`` sections, then
``hub.extraConfig`` in key order with a ``z2jh`` module whose ``get_config`` reads the merged
values. It does not run the chart's file (which needs the hub pod's environment and the Kubernetes
client): moving to another chart version means re-reading that file, updating the replay and these
constants, and the shared data with them.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyterhub.utils import url_path_join
from traitlets.config import Config

from support import REPO

VALUES = REPO / "hub-config" / "z2jh" / "values.yaml"
SHARED_ENV = "CASASPAWNER_SHARED_DATA"
SHARED = Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared" / "data")
SCHEMA = SHARED / "z2jh-values.schema.yaml"
DEFAULTS = SHARED / "z2jh-values.defaults.yaml"
#: The z2jh commit the replay, the schema and the defaults follow, and the chart's appVersion
#: there.
CHART_COMMIT = "48ea50e"
CHART_APP_VERSION = "5.5.0"

#: ``singleuser.<key>`` → ``KubeSpawner.<trait>``, as the chart maps them (set only when not
#: null).
SINGLEUSER_TRAITS = {
    "podNameTemplate": "pod_name_template",
    "startTimeout": "start_timeout",
    "image.pullPolicy": "image_pull_policy",
    "events": "events_enabled",
    "extraLabels": "extra_labels",
    "extraAnnotations": "extra_annotations",
    "uid": "uid",
    "fsGid": "fs_gid",
    "serviceAccountName": "service_account",
    "storage.extraLabels": "storage_extra_labels",
    "nodeSelector": "node_selector",
    "lifecycleHooks": "lifecycle_hooks",
    "initContainers": "init_containers",
    "extraContainers": "extra_containers",
    "memory.limit": "mem_limit",
    "memory.guarantee": "mem_guarantee",
    "cpu.limit": "cpu_limit",
    "cpu.guarantee": "cpu_guarantee",
    "extraEnv": "environment",
    "profileList": "profile_list",
    "extraPodConfig": "extra_pod_config",
}
HUB_TRAITS = {"baseUrl": "base_url", "concurrentSpawnLimit": "concurrent_spawn_limit"}


def chart_data() -> tuple[dict[str, Any], dict[str, Any]]:
    """The chart's values schema and defaults, or a skip saying where they were looked for."""
    if not SCHEMA.is_file() or not DEFAULTS.is_file():
        pytest.skip(
            f"the chart's values schema and defaults are not in {SHARED} (not shipped in the "
            f"repo; set {SHARED_ENV} to the directory holding z2jh-values.schema.yaml and "
            "z2jh-values.defaults.yaml)"
        )
    return yaml.safe_load(SCHEMA.read_text()), yaml.safe_load(DEFAULTS.read_text())


def load_values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def merge(base: Any, override: Any) -> Any:
    """Helm's rule: maps merge recursively, everything else (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def getter(values: dict[str, Any]) -> Any:
    """z2jh's ``get_config(key, default)`` over ``values``."""

    def get_config(key: str, default: Any = None) -> Any:
        value: Any = values
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return copy.deepcopy(value)

    return get_config


def chart_culler(get: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The culler service and role the chart builds from ``cull.*`` (None when culling is off)."""
    if not get("cull.enabled", False):
        return None
    base_url = get("hub.baseUrl", "/") or "/"
    command = [
        "python3",
        "-m",
        "jupyterhub_idle_culler",
        "--url=http://localhost:8081" + url_path_join(base_url, "hub/api"),
    ]
    scopes = ["list:users", "read:users:activity", "read:servers", "delete:servers"]
    for key, flag in (
        ("timeout", "--timeout"),
        ("every", "--cull-every"),
        ("concurrency", "--concurrency"),
    ):
        if get(f"cull.{key}"):
            command.append(f"{flag}={get(f'cull.{key}')}")
    if get("cull.users"):
        command.append("--cull-users")
        scopes.append("admin:users")
    if not get("cull.adminUsers"):
        command.append("--cull-admin-users=false")
    if get("cull.removeNamedServers"):
        command.append("--remove-named-servers")
    if get("cull.maxAge"):
        command.append(f"--max-age={get('cull.maxAge')}")
    name = "jupyterhub-idle-culler"
    return {"name": name, "command": command}, {"name": name, "scopes": scopes, "services": [name]}


def chart_config(values: dict[str, Any], defaults: dict[str, Any]) -> Config:
    """The hub's traitlets config once the chart's ``jupyterhub_config.py`` ran on ``values``."""
    merged = merge(defaults, values)
    get = getter(merged)
    c = Config()
    c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
    c.JupyterHub.cleanup_servers = False
    c.JupyterHub.last_activity_interval = 60
    for key, trait in HUB_TRAITS.items():
        if get(f"hub.{key}") is not None:
            c.JupyterHub[trait] = get(f"hub.{key}")
    c.JupyterHub.hub_bind_url = "http://:8081"
    c.JupyterHub.hub_connect_url = "http://hub:8081"
    for key, trait in SINGLEUSER_TRAITS.items():
        if get(f"singleuser.{key}") is not None:
            c.KubeSpawner[trait] = get(f"singleuser.{key}")
    if get("singleuser.image.name"):
        c.KubeSpawner.image = f"{get('singleuser.image.name')}:{get('singleuser.image.tag')}"
    c.KubeSpawner.allow_privilege_escalation = get("singleuser.allowPrivilegeEscalation")
    if get("singleuser.storage.type") != "none":
        raise NotImplementedError("only singleuser.storage.type none is replayed")
    for key, trait in (("extraVolumes", "volumes"), ("extraVolumeMounts", "volume_mounts")):
        # A list, or a dict ordered by key.
        extra = get(f"singleuser.storage.{key}") or []
        c.KubeSpawner[trait] = (
            [extra[k] for k in sorted(extra)] if isinstance(extra, dict) else list(extra)
        )

    c.JupyterHub.services = []
    c.JupyterHub.load_roles = []
    culler = chart_culler(get)
    if culler is not None:
        c.JupyterHub.services.append(culler[0])
        c.JupyterHub.load_roles.append(culler[1])
    for name, service in (get("hub.services", {}) or {}).items():
        c.JupyterHub.services.append({"name": name, **service})
    for name, role in (get("hub.loadRoles", {}) or {}).items():
        c.JupyterHub.load_roles.append({"name": name, **role})
    if "cmd" in merged.get("singleuser", {}):
        c.Spawner.cmd = get("singleuser.cmd")
    if get("singleuser.defaultUrl") is not None:
        c.Spawner.default_url = get("singleuser.defaultUrl")
    for section, traits in (get("hub.config", {}) or {}).items():
        c[section].update(traits)

    z2jh = types.ModuleType("z2jh")
    z2jh.get_config = get  # type: ignore[attr-defined]
    previous = sys.modules.get("z2jh")
    sys.modules["z2jh"] = z2jh
    try:
        for key, code in sorted((get("hub.extraConfig", {}) or {}).items()):
            exec(compile(code, f"hub.extraConfig.{key}", "exec"), {"c": c, "get_config": get})
    finally:
        if previous is None:
            del sys.modules["z2jh"]
        else:
            sys.modules["z2jh"] = previous
    return c


def prepuller_command(values_text: str) -> list[str]:
    """The ``casaspawner images prepuller …`` command line written in the values' comment."""
    found = re.findall(r"^#\s+casaspawner (images prepuller .*)$", values_text, flags=re.MULTILINE)
    assert len(found) == 1, "values.yaml names the prepuller command exactly once"
    return found[0].split()

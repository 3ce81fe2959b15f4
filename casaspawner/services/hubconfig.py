"""Building blocks of a casaspawner hub's configuration, shared by ``hub-config/jupyterhub_config.py`` (a hub
outside Kubernetes) and the Zero to JupyterHub values' ``hub.extraConfig`` (``hub-config/z2jh/values.yaml``).

Each function returns plain data (service and role dicts) or applies a few traits to a traitlets
config object ``c``, so the same rules hold in both deployments and tests can check what they produce.
"""

from __future__ import annotations

import sys
from typing import Any

from casaspawner.services.state import STATE_FILE_ENV, drain_blocker

SERVICE_NAME = "casa-sessions"
OPERATORS_ROLE = "casa-operators"
#: What the casa-sessions service itself may do through the hub API: read who runs what, nothing more.
SERVICE_SCOPES = ["list:users", "read:users:activity", "read:servers"]
#: What operators get: the casa-sessions pages, and JupyterHub's admin page read-only.
OPERATOR_SCOPES = [
    f"access:services!service={SERVICE_NAME}",
    "admin-ui",
    "list:users",
    "read:users",
    "read:servers",
]
#: jupyterhub-idle-culler's least-privilege scopes (it stops servers; it never deletes users here).
CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]
NOTICES_EXTENSION = "casaspawner.services.session_notices"


def casa_sessions_service(
    *,
    url: str,
    state_file: str,
    cull_timeout: int = 0,
    warn_before: int = 600,
    listen_ip: str | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """The hub-managed casa-sessions service entry (``c.JupyterHub.services`` item)."""
    command = [python, "-m", "casaspawner.services", "--state-file", state_file]
    command += ["--cull-timeout", str(cull_timeout), "--warn-before", str(warn_before)]
    if listen_ip is not None:
        command += ["--ip", listen_ip]
    return {
        "name": SERVICE_NAME,
        "url": url,
        "command": command,
        "environment": {STATE_FILE_ENV: state_file},
        "oauth_no_confirm": True,
        "display": True,
        "info": {"description": "CASA sessions by release and dataset; drain or retire releases"},
    }


def casa_roles(operators_group: str | None = "casa-operators") -> list[dict[str, Any]]:
    """The service's own role and the operators' role (given to ``operators_group``)."""
    roles: list[dict[str, Any]] = [
        {
            "name": f"{SERVICE_NAME}-service",
            "description": "casa-sessions reads running servers and their activity",
            "scopes": list(SERVICE_SCOPES),
            "services": [SERVICE_NAME],
        }
    ]
    operators: dict[str, Any] = {
        "name": OPERATORS_ROLE,
        "description": "CASA operators: the casa-sessions page (drain, retire) and a read-only admin page",
        "scopes": list(OPERATOR_SCOPES),
    }
    if operators_group:
        operators["groups"] = [operators_group]
    roles.append(operators)
    return roles


def idle_culler_service(
    *,
    timeout: int = 3600,
    every: int = 600,
    concurrency: int = 10,
    max_age: int = 0,
    python: str = sys.executable,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """jupyterhub-idle-culler as a hub-managed service, with its least-privilege role (outside z2jh, whose
    ``cull:`` values do the same)."""
    service = {
        "name": "jupyterhub-idle-culler",
        "command": [
            python,
            "-m",
            "jupyterhub_idle_culler",
            f"--timeout={timeout}",
            f"--cull-every={every}",
            f"--concurrency={concurrency}",
            f"--max-age={max_age}",
        ],
    }
    role = {
        "name": "jupyterhub-idle-culler",
        "description": "Stop idle servers",
        "scopes": list(CULLER_SCOPES),
        "services": ["jupyterhub-idle-culler"],
    }
    return service, role


def configure_sessions(
    c: Any,
    *,
    state_file: str,
    notices_url: str,
    notices_interval: int = 60,
    spawner_class: str = "casa",
) -> None:
    """Select the CASA spawner, make it honour drains, and turn on in-session notices."""
    c.JupyterHub.spawner_class = spawner_class
    # The mixin is a Configurable: this reaches CASASpawner and LocalCASASpawner alike.
    c.CASASessionMixin.blocked_releases = drain_blocker(state_file)
    args = list(c.Spawner.args) if "args" in c.Spawner else []
    flag = f"--ServerApp.jpserver_extensions={NOTICES_EXTENSION}=True"
    if flag not in args:
        args.append(flag)
    c.Spawner.args = args
    environment = dict(c.Spawner.environment) if "environment" in c.Spawner else {}
    environment.update(
        {"CASASPAWNER_NOTICES_URL": notices_url, "CASASPAWNER_NOTICES_INTERVAL": str(notices_interval)}
    )
    c.Spawner.environment = environment

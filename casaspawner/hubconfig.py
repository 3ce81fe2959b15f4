"""Building blocks of a casaspawner hub's configuration, shared by both deployments.

One deployment is ``hub-config/jupyterhub_config.py``, a hub outside Kubernetes. The other is the
Zero to JupyterHub values' ``hub.extraConfig``, in ``hub-config/z2jh/values.yaml``.

Both deployments describe themselves with a :class:`HubSettings`. It comes from environment
variables (:func:`settings_from_environment`) or from Helm values (:func:`settings_from_z2jh`).
They hand it to :func:`configure_hub`, which sets everything that is the same in both: login
rules, the spawner's settings, the casa-sessions service, the roles and jupyterhub-idle-culler.

What differs is only what the settings say: where the service listens, which Python runs it and
the hub API address. ``tests/hub`` loads both files and compares what they produce.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jupyterhub.utils import url_path_join

from casaspawner.errors import shown
from casaspawner.services.state import DEFAULT_STATE_FILE, drain_blocker

SERVICE_NAME = "casa-sessions"
CULLER_NAME = "jupyterhub-idle-culler"
OPERATORS_ROLE = "casa-operators"
ADMINS_ROLE = "casa-admins"
#: What the casa-sessions service itself may do through the hub API.
#:
#: It reads who runs what, nothing more.
SERVICE_SCOPES = ["list:users", "read:users:activity", "read:servers"]
#: What operators get: the casa-sessions pages, and JupyterHub's admin page read-only.
OPERATOR_SCOPES = [
    f"access:services!service={SERVICE_NAME}",
    "admin-ui",
    "list:users",
    "read:users",
    "read:servers",
]
#: The hub's administrators' scopes: JupyterHub's ``admin`` role, minus some.
#:
#: They include what every button of JupyterHub's admin page needs, ``shutdown`` (Shutdown Hub)
#: too: on Kubernetes the hub's Deployment starts it again, and sessions keep running either way.
#:
#: Left out is what would let them into users' sessions or their credentials:
#: ``access:servers`` (enter a session), ``admin:auth_state`` (the OIDC tokens, part of
#: ``admin:users``), ``tokens`` (act as a user) and ``shares`` (share a user's server with
#: themselves).
#:
#: Also left out is ``proxy``, which the admin page never uses. It reads the routing table, with
#: every session's pod address. It also repoints the hub's proxy API URL and token
#: (``PATCH /hub/api/proxy``), breaking every session's route.
ADMIN_SCOPES = [
    "admin-ui",
    "users",
    "delete:users",
    "read:roles",
    "admin:servers",
    "admin:groups",
    "list:services",
    "read:services",
    "read:hub",
    "access:services",
    "read:metrics",
    "shutdown",
]
#: jupyterhub-idle-culler's least-privilege scopes.
#:
#: ``admin:users`` is added only when it culls users.
CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]
#: Where auth_state keeps what the spawner reads of the OIDC user info.
#:
#: The user info is OAuthenticator's ``oauth_user``.
CLAIMS = {
    "uid_claim": "oauth_user.uid",
    "gid_claim": "oauth_user.gid",
    "groups_claim": "oauth_user.groups",
    "supplemental_gids_claim": "oauth_user.gids",
    "access_token_claim": "access_token",
}


@dataclass(frozen=True)
class CullSettings:
    """jupyterhub-idle-culler's options.

    They are z2jh's ``cull:`` values, with the same defaults.
    """

    timeout: int = 3600
    every: int = 600
    concurrency: int = 10
    max_age: int = 0
    users: bool = False
    admin_users: bool = True
    remove_named_servers: bool = False


@dataclass(frozen=True)
class HubSettings:
    """Everything a casaspawner hub's configuration depends on."""

    #: The drain/retire state file the service writes and the spawners read.
    state_file: str
    #: Where the proxy and the sessions reach casa-sessions: scheme, host and port.
    sessions_url: str
    #: Address casa-sessions listens on. None means the host of ``sessions_url``.
    sessions_listen_ip: str | None = None
    #: The hub API as the hub's own services reach it.
    #: None means ``$JUPYTERHUB_API_URL`` from the hub.
    hub_api_url: str | None = None
    #: ``JupyterHub.base_url``.
    base_url: str = "/"
    #: Python that runs the hub's services: casa-sessions and the culler.
    python: str = sys.executable
    spawner_class: str = "casa"
    #: Group given the casa-operators role. None means nobody.
    operators_group: str | None = "casa-operators"
    #: Group given the casa-admins role, admins who cannot enter sessions. None means nobody.
    admins_group: str | None = "hub-admins"
    #: Groups whose project directories are mounted.
    #: A regular expression matching whole names.
    project_group_pattern: str = "proj-.*"
    #: The hub's read-only mount of Cavern, ``CASASpawner.storage_hub_path``.
    #: None means datasets by identifier only.
    storage_hub_path: str | None = "/cavern"
    #: The hub's read-only mount of the measures kept one directory per version,
    #: ``CASASpawner.measures_versions_hub_path``. None means one tree, mounted whole.
    measures_versions_hub_path: str | None = None
    #: ``CASASpawner.start_timeout``, in seconds.
    #: First pulls of multi-GB CASA images on a node take minutes.
    start_timeout: int = 600
    #: Seconds between a session's requests for its notices.
    notices_interval: int = 60
    #: How long before an idle cull users are warned in their session, in seconds.
    warn_before: int = 600
    #: The idle culler. None means no culling and no cull warnings.
    cull: CullSettings | None = field(default_factory=CullSettings)
    #: Log in through OIDC (GenericOAuthenticator, auth_state, the provider's groups).
    #: False leaves the login to the deployment, as the one-machine demo does.
    oidc_login: bool = True
    #: The form's *Run headless* button and the hub's run pages. On Kubernetes the hub's Role
    #: needs the rules of ``hub-config/z2jh/casa-runs-rbac.yaml`` too.
    headless_runs: bool = False
    #: Apps of other CASA releases on Kubernetes desktops, as pods the hub creates. The hub's
    #: Role needs the rules of ``hub-config/z2jh/casa-apps-rbac.yaml`` too.
    desktop_apps: bool = False

    @property
    def notices_url(self) -> str:
        """Where sessions ask casa-sessions for their notices.

        They ask directly, not through the proxy.
        """
        return str(
            url_path_join(
                self.sessions_url, self.base_url, "services", SERVICE_NAME, "api", "notices"
            )
        )

    @property
    def releases_url(self) -> str:
        """Where desktop sessions ask casa-sessions which releases are drained.

        They ask directly, as for their notices, before starting an app of another release.
        """
        return str(
            url_path_join(
                self.sessions_url, self.base_url, "services", SERVICE_NAME, "api", "releases"
            )
        )


def casa_sessions_service(settings: HubSettings) -> dict[str, Any]:
    """The hub-managed casa-sessions service entry.

    It is an item of ``c.JupyterHub.services``.
    """
    cull_timeout = settings.cull.timeout if settings.cull is not None else 0
    command = [settings.python, "-m", "casaspawner.services", "--state-file", settings.state_file]
    command += ["--cull-timeout", str(cull_timeout), "--warn-before", str(settings.warn_before)]
    command += ["--notices-interval", str(settings.notices_interval)]
    if settings.sessions_listen_ip is not None:
        command += ["--ip", settings.sessions_listen_ip]
    if settings.hub_api_url is not None:
        command += ["--hub-api-url", settings.hub_api_url]
    return {
        "name": SERVICE_NAME,
        "url": settings.sessions_url,
        "command": command,
        "oauth_no_confirm": True,
        "display": True,
        "info": {"description": "CASA sessions by release and dataset; drain or retire releases"},
    }


def casa_roles(settings: HubSettings) -> list[dict[str, Any]]:
    """The service's own role, the operators' role and the administrators' role."""
    roles: list[dict[str, Any]] = [
        {
            "name": f"{SERVICE_NAME}-service",
            "description": "casa-sessions reads running servers and their activity",
            "scopes": list(SERVICE_SCOPES),
            "services": [SERVICE_NAME],
        }
    ]
    for name, description, scopes, group in (
        (
            OPERATORS_ROLE,
            "CASA operators: the casa-sessions page (drain, retire) and a read-only admin page",
            OPERATOR_SCOPES,
            settings.operators_group,
        ),
        (
            ADMINS_ROLE,
            (
                "Hub administrators: users, groups, servers and services, "
                "but not users' sessions or tokens"
            ),
            ADMIN_SCOPES,
            settings.admins_group,
        ),
    ):
        role: dict[str, Any] = {"name": name, "description": description, "scopes": list(scopes)}
        if group:
            role["groups"] = [group]
        roles.append(role)
    return roles


def idle_culler_service(settings: HubSettings) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """jupyterhub-idle-culler as a hub-managed service with its least-privilege role.

    None means no culling. The command and role are the same z2jh builds from its ``cull:`` values.
    """
    cull = settings.cull
    if cull is None:
        return None
    command = [settings.python, "-m", "jupyterhub_idle_culler"]
    if settings.hub_api_url is not None:
        command.append(f"--url={settings.hub_api_url}")
    command += [
        f"--timeout={cull.timeout}",
        f"--cull-every={cull.every}",
        f"--concurrency={cull.concurrency}",
    ]
    scopes = list(CULLER_SCOPES)
    if cull.users:
        command.append("--cull-users")
        scopes.append("admin:users")
    if not cull.admin_users:
        command.append("--cull-admin-users=false")
    if cull.remove_named_servers:
        command.append("--remove-named-servers")
    if cull.max_age:
        command.append(f"--max-age={cull.max_age}")
    service = {"name": CULLER_NAME, "command": command}
    role = {
        "name": CULLER_NAME,
        "description": "Stop idle servers",
        "scopes": scopes,
        "services": [CULLER_NAME],
    }
    return service, role


def _replace(entries: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return ``entries`` without those named like one in ``new``, then ``new``."""
    names = {entry["name"] for entry in new}
    return [entry for entry in entries if entry.get("name") not in names] + new


def _listed(c: Any, section: str, trait: str) -> list[dict[str, Any]]:
    return list(c[section][trait]) if trait in c[section] else []


def configure_login(c: Any) -> None:
    """OIDC login through GenericOAuthenticator with auth_state and the provider's groups.

    The site's part (endpoints, client, ``allowed_groups``, ``login_service``) is set before this.
    """
    c.JupyterHub.authenticator_class = "generic-oauth"
    # auth_state keeps the tokens and the user info (uid, gid, groups) for the spawner. It is
    # encrypted with JUPYTERHUB_CRYPT_KEY. In z2jh that is hub.config.CryptKeeper.keys, generated
    # into the chart's Secret.
    c.Authenticator.enable_auth_state = True
    oauth = c.GenericOAuthenticator
    oauth.scope = ["openid", "profile", "email"]
    oauth.username_claim = "preferred_username"
    # The provider's groups become JupyterHub groups. They decide who may log in and who gets which
    # role.
    oauth.manage_groups = True
    oauth.auth_state_groups_key = "oauth_user.groups"
    if "custom_403_message" not in oauth:
        allowed = ", ".join(sorted(oauth.allowed_groups)) if "allowed_groups" in oauth else ""
        oauth.custom_403_message = (
            f"Your account is not in a group allowed to use this CASA hub ({allowed}). "
            "Ask your observatory's helpdesk to add you to one of them, then sign in again."
        )
    for trait, key in CLAIMS.items():
        c.CASASessionMixin[trait] = key


def configure_spawner(c: Any, settings: HubSettings) -> None:
    """Configure the CASA spawner, honouring drains, with in-session notices.

    Kubernetes sessions fetch the user's access token from the hub's ``/hub/api/casa-token/``.
    """
    from casaspawner.services.access_token import token_handlers

    c.JupyterHub.spawner_class = settings.spawner_class
    _add_handlers(c, token_handlers())
    # The mixin is a Configurable, so this reaches CASASpawner and LocalCASASpawner alike. It also
    # outranks the KubeSpawner and Spawner sections, and z2jh writes singleuser.* into KubeSpawner.
    c.CASASessionMixin.blocked_releases = drain_blocker(settings.state_file)
    c.CASASessionMixin.notices_url = settings.notices_url
    c.CASASessionMixin.project_group_pattern = settings.project_group_pattern
    # Local sessions only: the desktop's apps of other releases ask it for drains.
    c.LocalCASASpawner.releases_url = settings.releases_url
    # Kubernetes sessions only. LocalCASASpawner has its own defaults for both.
    c.CASASpawner.storage_hub_path = settings.storage_hub_path
    c.CASASpawner.start_timeout = settings.start_timeout
    if settings.measures_versions_hub_path:
        c.CASASpawner.measures_versions_hub_path = settings.measures_versions_hub_path


def configure_services(c: Any, settings: HubSettings) -> None:
    """Configure casa-sessions and jupyterhub-idle-culler with their roles.

    They replace existing entries of the same names.
    """
    services = [casa_sessions_service(settings)]
    roles = casa_roles(settings)
    culler = idle_culler_service(settings)
    if culler is not None:
        services.append(culler[0])
        roles.append(culler[1])
    c.JupyterHub.services = _replace(_listed(c, "JupyterHub", "services"), services)
    c.JupyterHub.load_roles = _replace(_listed(c, "JupyterHub", "load_roles"), roles)


def _add_handlers(c: Any, ours: list[tuple[str, Any]]) -> None:
    """Add ``ours`` to the hub's own pages, replacing any of the same paths."""
    paths = {handler[0] for handler in ours}
    found = list(c.JupyterHub.extra_handlers) if "extra_handlers" in c.JupyterHub else []
    c.JupyterHub.extra_handlers = [h for h in found if h[0] not in paths] + ours


def configure_headless_runs(c: Any, settings: HubSettings) -> None:
    """The form's *Run headless* button and the hub's run pages, ``/hub/casa-runs/``.

    LocalCASASpawner runs them as the user's local account; CASASpawner as Jobs the hub creates.
    """
    from casaspawner.services.runs import RUNS_PATH, run_handlers

    _add_handlers(c, run_handlers())
    c.CASASessionMixin.headless_runs_url = str(
        url_path_join(settings.base_url, "hub", RUNS_PATH, "new")
    )


def configure_desktop_apps(c: Any) -> None:
    """Apps of other releases on Kubernetes desktops: the hub's ``/hub/api/casa-apps/``."""
    from casaspawner.services.apps import app_handlers

    _add_handlers(c, app_handlers())
    c.CASASpawner.desktop_apps = True


def configure_hub(c: Any, settings: HubSettings) -> None:
    """Configure everything both deployments share: login, spawner, services and roles.

    The one-machine hub (``hub-config/local``) uses it too, with its own login.
    """
    if settings.oidc_login:
        configure_login(c)
    configure_spawner(c, settings)
    configure_services(c, settings)
    if settings.headless_runs:
        configure_headless_runs(c, settings)
    if settings.desktop_apps:
        configure_desktop_apps(c)


class HubConfigError(SystemExit):
    """A hub setting cannot be used.

    ``str(error)`` is one sentence naming it. It is a :class:`SystemExit`, raised while JupyterHub
    loads its configuration file. JupyterHub reports any other exception there with a traceback,
    but stops on this one with just the sentence, on stderr with exit status 1.
    """


_WHOLE = re.compile(r"\s*[+-]?[0-9]+\s*")
_SWITCH = {
    **dict.fromkeys(("", "0", "false", "no"), False),
    **dict.fromkeys(("1", "true", "yes"), True),
}


def _switch(value: object, name: str) -> bool:
    """``value`` as on or off: a boolean, or one of 1/0, true/false, yes/no, empty (off)."""
    if isinstance(value, bool):
        return value
    found = _SWITCH.get(str(value).strip().lower())
    if found is None:
        raise HubConfigError(f"{name} must be true or false, not {str(value)[:40]!r}.")
    return found


def _whole(value: object, name: str, minimum: int, unit: str | None = "seconds") -> int:
    """Return ``value`` as a whole number of at least ``minimum``.

    ``value`` is text from the environment, or a Helm value.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number: int | None = value
    elif isinstance(value, str) and _WHOLE.fullmatch(value):
        number = int(value)
    else:
        number = None
    if number is None or number < minimum:
        given = repr(shown(value)) if isinstance(value, str) else repr(value)
        of_unit = f" of {unit}" if unit else ""
        raise HubConfigError(
            f"{name} must be a whole number{of_unit}, {minimum} or more, not {given}."
        )
    return number


def settings_from_environment(env: Mapping[str, str], *, cwd: str = ".") -> HubSettings:
    """Settings from environment variables, for a hub outside z2jh.

    That hub is ``hub-config/jupyterhub_config.py``. A number that is not one, such as
    ``CASA_CULL_TIMEOUT=1h``, raises :class:`HubConfigError` naming the variable.
    """

    def seconds(variable: str, default: int, minimum: int = 1) -> int:
        return _whole(
            env.get(variable, str(default)), f"The environment variable {variable}", minimum
        )

    timeout = seconds("CASA_CULL_TIMEOUT", CullSettings.timeout, minimum=0)
    storage = env.get("CASA_STORAGE_HUB_PATH", "/cavern")
    return HubSettings(
        state_file=(
            env.get("CASASPAWNER_RELEASE_STATE")
            or os.path.abspath(os.path.join(cwd, DEFAULT_STATE_FILE))
        ),
        sessions_url=env.get("CASA_SESSIONS_URL", "http://127.0.0.1:10101"),
        base_url=env.get("CASA_BASE_URL", "/"),
        spawner_class=env.get("CASASPAWNER_SPAWNER", "casa"),
        operators_group=env.get("CASA_OPERATORS_GROUP", "casa-operators") or None,
        admins_group=env.get("CASA_ADMINS_GROUP", "hub-admins") or None,
        project_group_pattern=env.get("CASA_PROJECT_GROUPS", "proj-.*"),
        storage_hub_path=storage or None,
        measures_versions_hub_path=env.get("CASA_MEASURES_VERSIONS_PATH") or None,
        start_timeout=seconds("CASA_START_TIMEOUT", HubSettings.start_timeout),
        notices_interval=seconds("CASA_NOTICES_INTERVAL", HubSettings.notices_interval),
        warn_before=seconds("CASA_CULL_WARN_BEFORE", HubSettings.warn_before, minimum=0),
        cull=(
            CullSettings(timeout=timeout, every=seconds("CASA_CULL_EVERY", CullSettings.every))
            if timeout > 0
            else None
        ),
        headless_runs=_switch(
            env.get("CASA_HEADLESS_RUNS", ""), "The environment variable CASA_HEADLESS_RUNS"
        ),
        desktop_apps=_switch(
            env.get("CASA_DESKTOP_APPS", ""), "The environment variable CASA_DESKTOP_APPS"
        ),
    )


#: z2jh: the hub API as seen from inside the hub pod.
#:
#: The chart's own culler uses it too. Going through the ``hub`` Service from the hub pod would
#: need the hub's NetworkPolicy to admit the hub itself.
Z2JH_HUB_API = "http://localhost:8081"
#: z2jh: casa-sessions on the hub pod, through the hub Service's extra port.
#:
#: That port is one of ``hub.service.extraPorts``.
Z2JH_SESSIONS_URL = "http://hub:10101"


def settings_from_z2jh(get_config: Callable[..., Any]) -> HubSettings:
    """Settings from the Zero to JupyterHub values.

    The values read are ``custom.casaspawner``, ``cull`` and ``hub.baseUrl``. ``get_config`` is
    z2jh's ``z2jh.get_config(key, default)``. The chart's own defaults apply to ``cull``. A number
    that is not one raises :class:`HubConfigError` naming the value.
    """
    casa: Mapping[str, Any] = get_config("custom.casaspawner", {}) or {}
    if not isinstance(casa, Mapping):
        raise HubConfigError(
            "custom.casaspawner in the Helm values must be a map of settings, "
            f"not {type(casa).__name__}."
        )
    base_url = str(get_config("hub.baseUrl", "/") or "/")
    defaults = HubSettings(state_file="", sessions_url="")
    culled = defaults.cull or CullSettings()

    def chart(key: str, default: int, minimum: int = 1, unit: str | None = "seconds") -> int:
        value = get_config(key, default)
        return _whole(
            default if value is None else value, f"{key} in the Helm values", minimum, unit
        )

    def ours(key: str, default: int, minimum: int = 1) -> int:
        return _whole(
            casa.get(key, default), f"custom.casaspawner.{key} in the Helm values", minimum
        )

    cull = None
    if get_config("cull.enabled", False):
        cull = CullSettings(
            timeout=chart("cull.timeout", culled.timeout),
            every=chart("cull.every", culled.every),
            concurrency=chart("cull.concurrency", culled.concurrency, unit=None),
            max_age=chart("cull.maxAge", culled.max_age, minimum=0),
            users=bool(get_config("cull.users", culled.users)),
            admin_users=bool(get_config("cull.adminUsers", culled.admin_users)),
            remove_named_servers=bool(
                get_config("cull.removeNamedServers", culled.remove_named_servers)
            ),
        )
    return HubSettings(
        state_file=str(casa.get("stateFile", "/srv/jupyterhub/casa-release-state.json")),
        sessions_url=str(casa.get("sessionsUrl", Z2JH_SESSIONS_URL)),
        # The proxy and the sessions reach casa-sessions through the hub Service.
        sessions_listen_ip="0.0.0.0",  # noqa: S104
        hub_api_url=Z2JH_HUB_API + url_path_join(base_url, "hub", "api"),
        base_url=base_url,
        python="python3",
        operators_group=casa.get("operatorsGroup", defaults.operators_group) or None,
        admins_group=casa.get("adminsGroup", defaults.admins_group) or None,
        project_group_pattern=str(casa.get("projectGroupPattern", defaults.project_group_pattern)),
        storage_hub_path=casa.get("storageHubPath", defaults.storage_hub_path) or None,
        measures_versions_hub_path=str(casa.get("measuresVersionsHubPath") or "") or None,
        start_timeout=ours("startTimeout", defaults.start_timeout),
        notices_interval=ours("noticesInterval", defaults.notices_interval),
        warn_before=ours("warnBefore", defaults.warn_before, minimum=0),
        cull=cull,
        headless_runs=_switch(
            casa.get("headlessRuns", False), "custom.casaspawner.headlessRuns in the Helm values"
        ),
        desktop_apps=_switch(
            casa.get("desktopApps", False), "custom.casaspawner.desktopApps in the Helm values"
        ),
    )

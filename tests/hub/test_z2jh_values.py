"""hub-config/z2jh/values.yaml: valid for the chart (merged values vs. its schema); run through the
chart's own configuration steps and hub.extraConfig, it configures real spawners and services the
way it claims, and the same way as hub-config/jupyterhub_config.py."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.z2jh import (
    CHART_APP_VERSION,
    CHART_COMMIT,
    REPO,
    SHARED,
    VALUES,
    chart_config,
    chart_culler,
    chart_data,
    getter,
    load_values,
    merge,
    prepuller_command,
)
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from casaspawner import hubconfig
from casaspawner.catalog import load_catalog
from casaspawner.cli import main as cli_main
from casaspawner.datasets.synth import write_dataset
from casaspawner.images import prepuller_values
from casaspawner.images.matrix import select_releases
from casaspawner.plan import PlanConfig
from casaspawner.services.state import ReleaseStateStore

AUTH_STATE = {
    "oauth_user": {"uid": 41001, "gid": 41001, "groups": ["alma-users", "proj-m87"], "gids": []}
}


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return load_values()


@pytest.fixture(scope="module")
def chart() -> tuple[dict[str, Any], dict[str, Any]]:
    return chart_data()


@pytest.fixture
def hub(values, chart, tmp_path) -> Config:
    """The hub's config in z2jh, with the drain state in a temporary file."""
    return chart_config(
        merge(values, {"custom": {"casaspawner": {"stateFile": str(tmp_path / "s.json")}}}),
        chart[1],
    )


def test_the_chart_data_is_of_the_replayed_chart(chart):
    """The schema and defaults on this machine come from the z2jh commit chart_config replays."""
    readme = (SHARED / "README.md").read_text()
    assert re.search(rf"\bcommit {CHART_COMMIT}\b", readme), (
        f"{SHARED}/README.md names another z2jh commit"
    )
    assert re.search(rf"\bappVersion {re.escape(CHART_APP_VERSION)}\b", readme)


def test_merge_follows_helm_rules():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert merge(base, {"a": {"y": [3]}, "c": 2}) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}


def test_merged_values_match_the_chart_schema(values, chart):
    import jsonschema

    schema, defaults = chart
    jsonschema.validate(merge(defaults, values), schema, cls=jsonschema.Draft7Validator)


def test_schema_rejects_a_broken_values_file(values, chart):
    """The check has teeth: a misspelt key is refused, as helm would refuse it."""
    import jsonschema

    schema, defaults = chart
    broken = merge(values, {"singleuser": {"extraLabel": {"a": "b"}}})
    with pytest.raises(jsonschema.ValidationError, match="extraLabel"):
        jsonschema.validate(merge(defaults, broken), schema, cls=jsonschema.Draft7Validator)


def test_network_policy_label_is_merged_with_ours(values, chart):
    labels = merge(chart[1], values)["singleuser"]["extraLabels"]
    assert labels["hub.jupyter.org/network-access-hub"] == "true"
    assert labels["casaspawner.io/session"] == "true"


def test_prepuller_images_are_what_the_documented_command_prints(values):
    """The values name the command that made prePuller.extraImages; it uses the values' registry
    and prints them."""
    command = prepuller_command(VALUES.read_text())
    registry = command[command.index("--registry") + 1]
    assert registry == values["hub"]["config"]["CASASessionMixin"]["image_registry"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(command) == 0
    assert yaml.safe_load(out.getvalue()) == {
        "prePuller": {"extraImages": values["prePuller"]["extraImages"]}
    }
    releases = select_releases(load_catalog(), command[command.index("--releases") + 1 :])
    expected = prepuller_values(releases, PlanConfig(image_registry=registry))["prePuller"][
        "extraImages"
    ]
    assert values["prePuller"]["extraImages"] == expected
    assert {r.role for r in releases} == {"pipeline", "modular"}
    # The current ALMA Cycle's builds.
    assert all(12 in r.cycles for r in releases if r.role == "pipeline")


def test_extra_config_configures_the_casa_hub(values, hub, tmp_path):
    c = hub
    assert c.JupyterHub.spawner_class == "casa"
    assert c.CASASessionMixin.notices_url == "http://hub:10101/services/casa-sessions/api/notices"
    assert c.CASASpawner.start_timeout == 600 and c.CASASpawner.storage_hub_path == "/cavern"
    assert c.CASASessionMixin.project_group_pattern == "proj-.*"
    services = {s["name"]: s for s in c.JupyterHub.services}
    # The chart's culler, replaced once.
    assert set(services) == {"casa-sessions", "jupyterhub-idle-culler"}
    command = services["casa-sessions"]["command"]
    assert command[:3] == ["python3", "-m", "casaspawner.services"]
    assert command[command.index("--state-file") + 1] == str(tmp_path / "s.json")
    assert command[command.index("--cull-timeout") + 1] == str(values["cull"]["timeout"])
    # From inside the hub pod, the hub API is on localhost, as the chart's own culler uses it.
    assert command[command.index("--hub-api-url") + 1] == "http://localhost:8081/hub/api"
    assert services["casa-sessions"]["url"] == "http://hub:10101"
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert set(roles) == {
        "casa-sessions-service",
        "casa-operators",
        "casa-admins",
        "jupyterhub-idle-culler",
    }
    assert roles["casa-operators"]["groups"] == ["casa-operators"]
    assert roles["casa-admins"]["groups"] == ["hub-admins"]
    # No JupyterHub admins (their admin role includes access:servers); admin_access is left to the
    # chart's default, which JupyterHub ignores since 2.0.
    assert "admin_groups" not in c.GenericOAuthenticator and "admin_users" not in c.Authenticator
    assert "JupyterHub" not in values["hub"]["config"]
    assert c.JupyterHub.authenticator_class == "generic-oauth"


def test_the_culler_is_the_charts_own(values, chart, hub):
    """hub.extraConfig builds the culler with the chart's building block: same command, role."""
    service, role = chart_culler(getter(merge(chart[1], values)))
    assert next(s for s in hub.JupyterHub.services if s["name"] == service["name"]) == service
    ours = next(r for r in hub.JupyterHub.load_roles if r["name"] == role["name"])
    assert {k: ours[k] for k in role} == role


def test_extra_config_follows_the_hub_base_url(values, chart):
    c = chart_config(merge(values, {"hub": {"baseUrl": "/casa/"}}), chart[1])
    assert (
        c.CASASessionMixin.notices_url
        == "http://hub:10101/casa/services/casa-sessions/api/notices"
    )
    services = {s["name"]: s for s in c.JupyterHub.services}
    command = services["casa-sessions"]["command"]
    assert command[command.index("--hub-api-url") + 1] == "http://localhost:8081/casa/hub/api"
    assert (
        "--url=http://localhost:8081/casa/hub/api" in services["jupyterhub-idle-culler"]["command"]
    )


def test_without_culling_there_is_no_culler_and_no_warning(values, chart):
    c = chart_config(merge(values, {"cull": {"enabled": False}}), chart[1])
    services = {s["name"]: s for s in c.JupyterHub.services}
    assert "jupyterhub-idle-culler" not in services
    command = services["casa-sessions"]["command"]
    assert command[command.index("--cull-timeout") + 1] == "0"


def test_drains_reach_the_spawner(hub, tmp_path):
    blocked = hub.CASASessionMixin.blocked_releases
    fake_spawner = types.SimpleNamespace(casa_catalog=load_catalog, log=None)
    assert blocked(fake_spawner) == {}
    ReleaseStateStore(tmp_path / "s.json").update(
        "pl-2023.1.0.124", by="olga", drained=True, message="image rebuild"
    )
    message = blocked(fake_spawner)["pl-2023.1.0.124"]
    assert "CASA 6.5.4-9 (pipeline 2023.1.0.124) is being drained" in message
    assert message.endswith(": image rebuild.")


async def session_pod(config: Config, dataset: Any, server_name: str = "") -> dict[str, Any]:
    """The pod a real CASASpawner built from ``config`` would submit (no cluster: dry run)."""
    from jupyterhub import orm

    from casaspawner.kube.dryrun import _DryRunUser
    from casaspawner.kube.spawner import CASASpawner
    from casaspawner.session.readers import LocalDirectoryReader

    user = _DryRunUser("alice", AUTH_STATE)
    spawner = CASASpawner(
        _mock=True, user=user, orm_spawner=orm.Spawner(name=server_name), config=config
    )
    spawner.dataset_reader = LocalDirectoryReader()
    spawner.user_options = {"dataset": str(dataset), "interface": "lab"}
    await spawner.prepare_session()
    pod = await spawner.session_manifests()
    # CASASpawner's, over the chart's KubeSpawner.start_timeout.
    assert spawner.start_timeout == 600
    return pod


@pytest.mark.parametrize(
    ("server", "file"), [("", "CASA-NOTICES.md"), ("m87", "CASA-NOTICES-m87.md")]
)
def test_session_pods_get_the_notices_url_and_file(hub, tmp_path, server, file):
    """The chart writes singleuser.extraEnv into KubeSpawner.environment; the notices must survive
    it."""
    pytest.importorskip("kubespawner")
    from casaspawner.kube.dryrun import _offline_kubernetes

    # What the chart sets from the default extraEnv.
    assert hub.KubeSpawner.environment == {}
    dataset = write_dataset(tmp_path / "data", era="cycle10")
    with _offline_kubernetes():
        pod = asyncio.run(session_pod(hub, dataset, server))
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "notebook")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CASASPAWNER_NOTICES_URL"] == "http://hub:10101/services/casa-sessions/api/notices"
    assert env["CASASPAWNER_NOTICES_FILE"] == f"/arc/home/alice/{file}"
    assert pod["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"


def test_casa_spawner_accepts_the_values_config(values):
    """Every trait the values set on CASASpawner / the mixin is a configurable trait of
    CASASpawner."""
    kube = pytest.importorskip("casaspawner.kube.spawner")
    configurable = kube.CASASpawner.class_traits(config=True)
    for section in ("CASASessionMixin", "CASASpawner"):
        for trait in values["hub"]["config"][section]:
            assert trait in configurable, f"{section}.{trait} is not a CASASpawner option"


# --------------------------------------------------------------------- the same hub outside z2jh


def standalone_config(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Config:
    """hub-config/jupyterhub_config.py loaded as JupyterHub loads it, with ``env`` as its
    environment."""
    for name in list(os.environ):
        if name.startswith(("CASA", "OIDC_", "OAUTH")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return PyFileConfigLoader("jupyterhub_config.py", path=str(REPO / "hub-config")).load_config()


def comparable(c: Config) -> dict[str, Any]:
    """What both deployments must agree on; deployment-specific values (addresses, Python, files)
    removed."""
    services = []
    for service in c.JupyterHub.services:
        service = dict(service)
        command = [a for a in service.pop("command") if not a.startswith("--url=")]
        for option in ("--state-file", "--ip", "--hub-api-url"):
            if option in command:
                del command[command.index(option) : command.index(option) + 2]
        service.pop("url", None)
        services.append({**service, "command": command[1:]})
    spawner = {k: v for k, v in c.CASASessionMixin.items() if k != "blocked_releases"}
    spawner["notices_url"] = spawner["notices_url"].split("/services/", 1)[1]
    login = {
        k: v
        for k, v in c.GenericOAuthenticator.items()
        if k not in ("login_service",) and not k.endswith("_url")
    }
    login = {k: v for k, v in login.items() if k not in ("client_id", "client_secret")}
    login["allowed_groups"] = sorted(login["allowed_groups"])
    return {
        "spawner_class": c.JupyterHub.spawner_class,
        "authenticator_class": c.JupyterHub.authenticator_class,
        "auth_state": c.Authenticator.enable_auth_state,
        "login": login,
        "mixin": spawner,
        "kube": dict(c.CASASpawner.items()) | {"storage_volume": None, "measures_volume": None},
        "services": sorted(services, key=lambda s: s["name"]),
        "roles": sorted(c.JupyterHub.load_roles, key=lambda r: r["name"]),
    }


def test_both_deployments_configure_the_same_hub(values, hub, monkeypatch, tmp_path):
    """jupyterhub_config.py with the environment equivalent of the values = the z2jh hub, but for
    addresses."""
    oauth = values["hub"]["config"]["GenericOAuthenticator"]
    casa = values["custom"]["casaspawner"]
    standalone = standalone_config(
        monkeypatch,
        {
            "CASA_ALLOWED_GROUPS": ",".join(oauth["allowed_groups"]),
            "CASA_OPERATORS_GROUP": casa["operatorsGroup"],
            "CASA_ADMINS_GROUP": casa["adminsGroup"],
            "CASA_PROJECT_GROUPS": casa["projectGroupPattern"],
            "CASA_STORAGE_HUB_PATH": casa["storageHubPath"],
            "CASA_START_TIMEOUT": str(casa["startTimeout"]),
            "CASA_NOTICES_INTERVAL": str(casa["noticesInterval"]),
            "CASA_CULL_WARN_BEFORE": str(casa["warnBefore"]),
            "CASA_CULL_TIMEOUT": str(values["cull"]["timeout"]),
            "CASA_CULL_EVERY": str(values["cull"]["every"]),
            "CASASPAWNER_RELEASE_STATE": str(tmp_path / "state.json"),
        },
    )
    z2jh, outside = comparable(hub), comparable(standalone)
    assert outside["kube"] == {
        "start_timeout": 600,
        "storage_hub_path": "/cavern",
        "storage_volume": None,
        "measures_volume": None,
    }
    assert z2jh == outside
    assert standalone.JupyterHub.base_url == "/"
    service = next(s for s in standalone.JupyterHub.services if s["name"] == "casa-sessions")
    assert service["url"] == "http://127.0.0.1:10101"
    assert (
        standalone.CASASessionMixin.notices_url
        == "http://127.0.0.1:10101/services/casa-sessions/api/notices"
    )


def test_the_standalone_config_reads_its_documented_variables(monkeypatch):
    """Every environment variable jupyterhub_config.py reads is listed in its header, and the other
    way round."""
    text = (REPO / "hub-config" / "jupyterhub_config.py").read_text()
    header = text.split("\nimport os", 1)[0]
    read = set(re.findall(r"environ\.get\(\s*\"([A-Z0-9_]+)\"", text))
    read |= set(
        re.findall(r"(?:env\.get|seconds)\(\"([A-Z0-9_]+)\"", Path(hubconfig.__file__).read_text())
    )
    assert {"OIDC_LOGIN_SERVICE", "CASA_CULL_TIMEOUT", "CASASPAWNER_IMAGE_REGISTRY"} <= read
    documented = set(re.findall(r"\b([A-Z][A-Z0-9]*_[A-Z0-9_]+)\b", header))
    assert read <= documented, sorted(read - documented)
    culling_off = standalone_config(monkeypatch, {"CASA_CULL_TIMEOUT": "0"})
    assert [s["name"] for s in culling_off.JupyterHub.services] == ["casa-sessions"]


@pytest.mark.integration
def test_a_hub_started_with_a_bad_number_stops_with_one_sentence(tmp_path):
    """``jupyterhub -f hub-config/jupyterhub_config.py`` with ``CASA_CULL_TIMEOUT=1h``: the hub
    stops while loading its configuration with one sentence naming the variable, no traceback,
    nothing created."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASA", "OIDC_", "OAUTH"))}
    env["CASA_CULL_TIMEOUT"] = "1h"
    config = REPO / "hub-config" / "jupyterhub_config.py"
    hub = subprocess.run(
        [sys.executable, "-m", "jupyterhub", "-f", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert hub.returncode == 1
    sentence = (
        "The environment variable CASA_CULL_TIMEOUT must be a whole number of seconds, 0 or "
        "more, not '1h'."
    )
    assert hub.stderr.strip() == sentence and hub.stdout == ""
    # Stopped before any database, cookie secret or proxy.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("env", "sentence"),
    [
        (
            {"CASA_START_TIMEOUT": "10 min"},
            "CASA_START_TIMEOUT must be a whole number of seconds, 1 or more",
        ),
        (
            {"CASA_NOTICES_INTERVAL": "0"},
            "CASA_NOTICES_INTERVAL must be a whole number of seconds, 1 or more",
        ),
        (
            {"CASA_CULL_WARN_BEFORE": "-1"},
            "CASA_CULL_WARN_BEFORE must be a whole number of seconds, 0 or more",
        ),
        (
            {"CASA_CULL_EVERY": "2.5"},
            "CASA_CULL_EVERY must be a whole number of seconds, 1 or more, not '2.5'.",
        ),
    ],
)
def test_every_number_in_the_environment_is_checked(env, sentence):
    with pytest.raises(hubconfig.HubConfigError) as error:
        hubconfig.settings_from_environment(env)
    assert sentence in str(error.value) and str(error.value).count(". ") == 0
    # Whole numbers, spaces around them included, are taken as they are.
    settings = hubconfig.settings_from_environment(
        {"CASA_CULL_EVERY": " 30 ", "CASA_CULL_WARN_BEFORE": "0"}
    )
    assert settings.cull is not None and settings.cull.every == 30 and settings.warn_before == 0


@pytest.mark.parametrize(
    ("override", "sentence"),
    [
        (
            {"custom": {"casaspawner": {"startTimeout": "10m"}}},
            "custom.casaspawner.startTimeout in the Helm values must be a whole number of "
            "seconds, 1 or more, not '10m'.",
        ),
        (
            {"custom": {"casaspawner": {"warnBefore": True}}},
            "custom.casaspawner.warnBefore in the Helm values must be a whole number of seconds, "
            "0 or more, not True.",
        ),
        (
            {"cull": {"every": 0}},
            "cull.every in the Helm values must be a whole number of seconds, 1 or more, not 0.",
        ),
        (
            {"custom": {"casaspawner": ["startTimeout", 600]}},
            "custom.casaspawner in the Helm values must be a map of settings, not list.",
        ),
    ],
)
def test_bad_numbers_in_the_values_stop_the_hub_with_one_sentence(
    values, chart, override, sentence
):
    """hub.extraConfig runs inside the chart's jupyterhub_config.py: the same HubConfigError stops
    the hub."""
    with pytest.raises(hubconfig.HubConfigError) as error:
        chart_config(merge(values, override), chart[1])
    assert str(error.value) == sentence


def test_roles_are_least_privilege():
    settings = hubconfig.HubSettings(state_file="s", sessions_url="http://127.0.0.1:1")
    roles = {role["name"]: role for role in hubconfig.casa_roles(settings)}
    service_scopes = set(roles["casa-sessions-service"]["scopes"])
    assert service_scopes == {"list:users", "read:users:activity", "read:servers"}
    admin = set(roles["casa-admins"]["scopes"])
    # Admins manage the hub but cannot enter sessions, read the OIDC tokens, mint tokens, share
    # servers or repoint the hub's proxy.
    forbidden = {
        "access:servers",
        "admin:users",
        "admin:auth_state",
        "tokens",
        "shares",
        "admin",
        "proxy",
    }
    assert not admin & forbidden
    assert {"admin-ui", "admin:servers", "users", "admin:groups"} <= admin


#: The sessions' access-token API, which every deployment has.
TOKEN_ROUTE = "/api/casa-token/(?P<user_name>[^/]+)/(?P<server_name>[^/]*)"


def test_both_deployments_hand_sessions_their_access_token(values, chart, monkeypatch):
    """The hub's casa-token API is always there: Kubernetes sessions fetch the token from it."""
    for c in (chart_config(values, chart[1]), standalone_config(monkeypatch, {})):
        assert [h[0] for h in c.JupyterHub.extra_handlers] == [TOKEN_ROUTE]


def test_headless_runs_are_off_until_both_deployments_turn_them_on(values, chart, monkeypatch):
    """headlessRuns / CASA_HEADLESS_RUNS add the run pages and the form's button; off by default,
    since the chart's hub Role needs casa-runs-rbac.yaml for them."""

    def pages(c: Config) -> tuple[list[str], str]:
        handlers = c.JupyterHub.extra_handlers if "extra_handlers" in c.JupyterHub else []
        paths = [h[0] for h in handlers if h[0] != TOKEN_ROUTE]
        return paths, c.CASASessionMixin.get("headless_runs_url", "")

    assert pages(chart_config(values, chart[1])) == ([], "")
    assert pages(standalone_config(monkeypatch, {})) == ([], "")
    on = chart_config(merge(values, {"custom": {"casaspawner": {"headlessRuns": True}}}), chart[1])
    assert pages(on) == pages(standalone_config(monkeypatch, {"CASA_HEADLESS_RUNS": "yes"}))
    paths, url = pages(on)
    assert "/casa-runs/new" in paths and url == "/hub/casa-runs/new"
    with pytest.raises(hubconfig.HubConfigError) as error:
        hubconfig.settings_from_environment({"CASA_HEADLESS_RUNS": "sometimes"})
    assert str(error.value) == (
        "The environment variable CASA_HEADLESS_RUNS must be true or false, not 'sometimes'."
    )


def test_desktop_apps_are_off_until_both_deployments_turn_them_on(values, chart, monkeypatch):
    """desktopApps / CASA_DESKTOP_APPS add the hub's casa-apps API and turn the spawner's
    desktop_apps on; off by default, since the chart's hub Role needs casa-apps-rbac.yaml."""

    def apps(c: Config) -> tuple[list[str], bool]:
        handlers = c.JupyterHub.extra_handlers if "extra_handlers" in c.JupyterHub else []
        paths = [h[0] for h in handlers if h[0] != TOKEN_ROUTE]
        return paths, bool(c.CASASpawner.get("desktop_apps", False))

    assert apps(chart_config(values, chart[1])) == ([], False)
    assert apps(standalone_config(monkeypatch, {})) == ([], False)
    on = chart_config(merge(values, {"custom": {"casaspawner": {"desktopApps": True}}}), chart[1])
    assert apps(on) == apps(standalone_config(monkeypatch, {"CASA_DESKTOP_APPS": "1"}))
    paths, enabled = apps(on)
    assert paths == ["/api/casa-apps/(?P<user_name>[^/]+)/(?P<server_name>[^/]*)"] and enabled
    often = merge(values, {"custom": {"casaspawner": {"desktopApps": "often"}}})
    with pytest.raises(hubconfig.HubConfigError) as error:
        chart_config(often, chart[1])
    assert str(error.value) == (
        "custom.casaspawner.desktopApps in the Helm values must be true or false, not 'often'."
    )


def test_measures_kept_by_version_are_set_alike_in_both_deployments(values, chart, monkeypatch):
    """measuresVersionsHubPath / CASA_MEASURES_VERSIONS_PATH set the spawner's
    measures_versions_hub_path; unset by default (one measures tree)."""

    def path(c: Config) -> str | None:
        return c.CASASpawner.get("measures_versions_hub_path")

    assert path(chart_config(values, chart[1])) is None
    assert path(standalone_config(monkeypatch, {})) is None
    kept = merge(values, {"custom": {"casaspawner": {"measuresVersionsHubPath": "/measures"}}})
    assert path(chart_config(kept, chart[1])) == "/measures"
    assert path(standalone_config(monkeypatch, {"CASA_MEASURES_VERSIONS_PATH": "/measures"})) == (
        "/measures"
    )

"""hub-config/z2jh/values.yaml: valid for the chart (merged values vs. its schema), and its extraConfig does
what it claims when executed the way z2jh executes it."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from traitlets.config import Config

from casaspawner.catalog import load_catalog
from casaspawner.images import prepuller_values
from casaspawner.plan import PlanConfig, image_for
from casaspawner.services import hubconfig
from casaspawner.services.state import ReleaseStateStore

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "hub-config" / "z2jh" / "values.yaml"
SHARED = REPO.parent / "shared" / "data"
SCHEMA = SHARED / "z2jh-values.schema.yaml"
DEFAULTS = SHARED / "z2jh-values.defaults.yaml"


def merge(base: Any, override: Any) -> Any:
    """Helm's rule: maps merge recursively, everything else (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture(scope="module")
def chart() -> tuple[dict[str, Any], dict[str, Any]]:
    if not SCHEMA.is_file() or not DEFAULTS.is_file():
        pytest.skip(
            f"the chart's values schema and defaults are not in {SHARED} (they are not shipped in the repo)"
        )
    return yaml.safe_load(SCHEMA.read_text()), yaml.safe_load(DEFAULTS.read_text())


def test_merge_follows_helm_rules():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert merge(base, {"a": {"y": [3]}, "c": 2}) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}


def test_merged_values_match_the_chart_schema(values, chart):
    import jsonschema

    schema, defaults = chart
    merged = merge(defaults, values)
    # The chart fills these in from chartpress at release time; a real install has real tags there.
    jsonschema.validate(merged, schema, cls=jsonschema.Draft7Validator)


def test_schema_rejects_a_broken_values_file(values, chart):
    """The check has teeth: a misspelt key is refused, as helm would refuse it."""
    import jsonschema

    schema, defaults = chart
    broken = merge(values, {"singleuser": {"extraLabel": {"a": "b"}}})
    with pytest.raises(jsonschema.ValidationError, match="extraLabel"):
        jsonschema.validate(merge(defaults, broken), schema, cls=jsonschema.Draft7Validator)


def test_network_policy_label_is_merged_with_ours(values, chart):
    _, defaults = chart
    labels = merge(defaults, values)["singleuser"]["extraLabels"]
    assert labels["hub.jupyter.org/network-access-hub"] == "true"
    assert labels["casaspawner.io/session"] == "true"


def test_prepuller_images_are_the_catalog_images(values):
    """Every runnable release's image, as `casaspawner images prepuller` names them (plan.image_for)."""
    catalog = load_catalog()
    expected = prepuller_values(catalog.available(), PlanConfig())["prePuller"]["extraImages"]
    assert values["prePuller"]["extraImages"] == expected
    assert len(expected) == len(catalog.available())
    assert {f"{i['name']}:{i['tag']}" for i in expected.values()} == {
        image_for(r, PlanConfig()) for r in catalog.available()
    }


def test_roles_are_least_privilege_and_match_the_standalone_config(values):
    roles = {role["name"]: role for role in hubconfig.casa_roles()}
    for name, role in values["hub"]["loadRoles"].items():
        assert role["scopes"] == roles[name]["scopes"]
    service_scopes = set(values["hub"]["loadRoles"]["casa-sessions-service"]["scopes"])
    assert service_scopes == {"list:users", "read:users:activity", "read:servers"}
    assert not any(s.startswith(("admin", "servers", "delete", "users")) for s in service_scopes)


def run_extra_config(values: dict[str, Any], defaults: dict[str, Any]) -> Config:
    """Execute hub.extraConfig as z2jh does: after hub.config and hub.services, with z2jh.get_config."""
    merged = merge(defaults, values)

    def get_config(key: str, default: Any = None) -> Any:
        value: Any = merged
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return value

    c = Config()
    c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
    for section, traits in merged["hub"]["config"].items():
        for trait, value in traits.items():
            c[section][trait] = value
    c.JupyterHub.services = [{**service, "name": name} for name, service in merged["hub"]["services"].items()]
    z2jh = types.ModuleType("z2jh")
    z2jh.get_config = get_config  # type: ignore[attr-defined]
    sys.modules["z2jh"] = z2jh
    try:
        for _, code in sorted(merged["hub"]["extraConfig"].items()):
            exec(compile(code, "hub.extraConfig", "exec"), {"c": c})
    finally:
        del sys.modules["z2jh"]
    return c


def test_extra_config_configures_the_casa_spawner(values, chart, tmp_path):
    _, defaults = chart
    state = tmp_path / "state.json"
    values = merge(values, {"custom": {"casaspawner": {"stateFile": str(state)}}})
    c = run_extra_config(values, defaults)

    assert c.JupyterHub.spawner_class == "casa"
    assert "--ServerApp.jpserver_extensions=casaspawner.services.session_notices=True" in c.Spawner.args
    assert c.Spawner.environment["CASASPAWNER_NOTICES_URL"] == (
        "http://hub:10101/services/casa-sessions/api/notices"
    )
    service = next(s for s in c.JupyterHub.services if s["name"] == "casa-sessions")
    assert service["command"][-2:] == ["--cull-timeout", str(values["cull"]["timeout"])]

    # The blocked_releases callable reads the drain state the service writes.
    blocked = c.CASASessionMixin.blocked_releases
    fake_spawner = types.SimpleNamespace(casa_catalog=load_catalog, log=None)
    assert blocked(fake_spawner) == {}
    ReleaseStateStore(state).update("pl-2023.1.0.124", by="olga", drained=True, message="image rebuild")
    message = blocked(fake_spawner)["pl-2023.1.0.124"]
    assert "CASA 6.5.4-9 (pipeline 2023.1.0.124) is being drained" in message
    assert message.endswith(": image rebuild.")


def test_extra_config_turns_warnings_off_without_culling(values, chart):
    _, defaults = chart
    c = run_extra_config(merge(values, {"cull": {"enabled": False}}), defaults)
    service = next(s for s in c.JupyterHub.services if s["name"] == "casa-sessions")
    assert service["command"][-2:] == ["--cull-timeout", "0"]


def test_casa_spawner_accepts_the_values_config(values):
    """Every trait the values set on CASASpawner / the mixin is a configurable trait of CASASpawner."""
    kube = pytest.importorskip("casaspawner.spawners.kube")
    configurable = kube.CASASpawner.class_traits(config=True)
    config = values["hub"]["config"]
    for section in ("CASASessionMixin", "CASASpawner"):
        for trait in config[section]:
            assert trait in configurable, f"{section}.{trait} is not a CASASpawner option"

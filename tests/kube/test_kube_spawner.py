"""CASASpawner without a cluster: the plan on the pod, KubeSpawner's traits and hooks, operator
errors.

What both spawners decide is checked in tests/spawners/test_spawners_mixin.py; this file checks
what CASASpawner adds on KubeSpawner.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from support.datasets import dataset_in
from support.pss import restricted_violations
from support.spawners import refused, sentence
from support.users import FakeUser, auth_state

from casaspawner.spawners.errors import SpawnException


async def test_a_user_without_a_uid_runs_as_the_fallback_uid_without_a_token(
    make_spawner, storage
):
    """The rest of the identity rules: tests/spawners/test_spawners_mixin.py."""
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    fallback = make_spawner(FakeUser(auth_state=None, groups=("proja",)), fallback_uid=4242)
    plan = await fallback.prepare_session(dataset)
    assert (plan.identity.uid, plan.identity.gid, plan.identity.groups) == (4242, 4242, ("proja",))
    assert fallback.access_token is None and fallback.token_url is None

    # The operator's: the hub's fault.
    zero_fallback = make_spawner(FakeUser(auth_state=None), fallback_uid=0)
    with pytest.raises(SpawnException) as info:
        await zero_fallback._run_apply_user_options(dataset)
    assert info.value.status_code == 500 and info.value.jupyterhub_message == (
        "The hub's configuration is invalid: CASASpawner.fallback_uid is 0, "
        "not an id from 1 to 4294967294."
    )


async def test_blocked_release_refused_before_any_object(cluster, make_spawner, storage):
    emulator, _server = cluster
    spawner = make_spawner(blocked_releases=["pl-2023.1.0.124"], start_timeout=10)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    with pytest.raises(SpawnException) as info:
        # An older hub: validation happens in load_user_options, inside start.
        await spawner.start()
    assert "cannot be started right now" in sentence(info.value)
    # Not even a list or watch: nothing was asked of Kubernetes.
    assert len(emulator) == 0


async def test_user_options_summary_and_labels_merge(make_spawner, storage):
    z2jh = {
        "hub.jupyter.org/network-access-hub": "true",
        "casaspawner.io/interface": "set-by-operator",
    }
    spawner = make_spawner(extra_labels=dict(z2jh), extra_annotations={"team": "alma"})
    await spawner._run_apply_user_options(
        {"dataset": dataset_in(storage, "alice", "cycle10"), "interface": "desktop"}
    )
    assert spawner.user_options == {
        "dataset": dataset_in(storage, "alice", "cycle10"),
        "interface": "desktop",
    }
    pod = await spawner.session_manifests()
    spawner.record_session(spawner.session_plan)
    assert spawner.user_options["profile"] == spawner.session_plan.summary
    assert spawner.user_options["profile"].startswith(
        "CASA 6.5.4-9 (pipeline 2023.1.0.124) · CASA desktop · "
    )
    output = spawner.user_options["casaspawner"]
    assert (output["casa_version"], output["interface"], output["release"]) == (
        "6.5.4-9",
        "desktop",
        "pl-2023.1.0.124",
    )
    labels = pod["metadata"]["labels"]
    assert labels["hub.jupyter.org/network-access-hub"] == "true"
    # Never replaced.
    assert labels["casaspawner.io/interface"] == "set-by-operator"
    assert labels["casaspawner.io/release"] == "pl-2023.1.0.124"
    assert labels["component"] == "singleuser-server"
    assert pod["metadata"]["annotations"]["team"] == "alma"
    assert (
        pod["metadata"]["annotations"]["casaspawner.io/processed-with"]
        == "CASA 6.5.4-9, pipeline 2023.1.0.124"
    )


async def test_a_dataset_named_with_braces_reaches_the_pod_as_written(make_spawner, storage):
    """KubeSpawner expands {username}-style templates in the fields the plan fills; a directory
    may be named with braces, and is neither expanded nor a broken template."""
    home = storage / "home" / "alice"
    odd = home / "data" / "b{username}{0}}"
    shutil.copytree(home / "data" / "cycle10", odd, symlinks=True)
    dataset = str(next(odd.glob("*/science_goal.*/group.*/member.*")).relative_to(home))
    spawner = make_spawner(environment={"SITE": "{username}-east"})
    await spawner._run_apply_user_options({"dataset": dataset})
    pod = await spawner.session_manifests()
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["CASASPAWNER_DATASET"] == dataset
    assert pod["metadata"]["annotations"]["casaspawner.io/dataset"] == dataset
    assert dataset in pod["metadata"]["annotations"]["casaspawner.io/summary"]
    # The operator's own values are still templates.
    assert env["SITE"] == "alice-east"


async def test_plan_wins_over_profile_overrides(make_spawner, storage):
    profile_list = [
        {
            "display_name": "Default",
            "slug": "default",
            "kubespawner_override": {
                "image": "quay.io/jupyter/minimal-notebook",
                "uid": 0,
                "node_selector": {"pool": "casa"},
                "extra_labels": {"profile": "default"},
            },
        }
    ]
    spawner = make_spawner(profile_list=profile_list, fs_gid=100)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    await spawner._run_apply_user_options(spawner.user_options)
    pod = await spawner.session_manifests()
    assert pod["spec"]["containers"][0]["image"] == spawner.session_plan.image
    assert (
        pod["spec"]["securityContext"]["runAsUser"] == 1001
        and "fsGroup" not in pod["spec"]["securityContext"]
    )
    # What the plan does not decide, the profile does.
    assert pod["spec"]["nodeSelector"] == {"pool": "casa"}
    assert pod["metadata"]["labels"]["profile"] == "default"


async def test_no_leftovers_between_sessions(make_spawner, storage):
    user = FakeUser(auth_state=auth_state(groups=("proja",)))
    spawner = make_spawner(user, environment={"OPERATOR": "1"})
    await spawner._run_apply_user_options(
        {"dataset": dataset_in(storage, "alice", "cycle10"), "interface": "desktop"}
    )
    first = await spawner.session_manifests()
    assert "/arc/projects/proja" in {
        m["mountPath"] for m in first["spec"]["containers"][0]["volumeMounts"]
    }
    spawner.clear_state()
    user.auth_state = auth_state(groups=(), token=None)
    await spawner._run_apply_user_options(
        {"dataset": dataset_in(storage, "alice", "cycle7"), "interface": "lab"}
    )
    pod = await spawner.session_manifests()
    paths = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert "/arc/projects/proja" not in paths
    assert "JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP" not in env and env["OPERATOR"] == "1"
    assert env["CASASPAWNER_PIPELINE"] == "2020.1.0.40" and "CASASPAWNER_TOKEN_FILE" not in env
    assert "CASASPAWNER_TOKEN_URL" not in env
    assert "casa-token" not in {v["name"] for v in pod["spec"]["volumes"]}
    assert spawner.default_url == "/lab"


async def test_groups_differing_only_in_case_are_both_mounted(make_spawner, storage):
    """'Proj' and 'proj' are two project directories: both reach the pod (and the plan names them
    apart)."""
    spawner = make_spawner(FakeUser(auth_state=auth_state(groups=("Proj", "proj"))))
    plan = await spawner.prepare_session({"dataset": dataset_in(storage, "alice", "cycle10")})
    projects = [m for m in plan.mounts if m.group is not None]
    assert [(m.group, m.path) for m in projects] == [
        ("Proj", "/arc/projects/Proj"),
        ("proj", "/arc/projects/proj"),
    ]
    assert len({m.name for m in plan.mounts}) == len(plan.mounts)
    pod = await spawner.session_manifests()
    mounts = {
        m["mountPath"]: m.get("subPath") for m in pod["spec"]["containers"][0]["volumeMounts"]
    }
    assert (
        mounts["/arc/projects/Proj"] == "projects/Proj"
        and mounts["/arc/projects/proj"] == "projects/proj"
    )


async def test_the_plans_environment_wins_over_a_profiles(make_spawner, storage):
    """The reason reaches pods as it reaches local sessions; a profile's variables stay, the plan's
    win."""
    profile_list = [
        {
            "display_name": "Default",
            "slug": "default",
            "kubespawner_override": {
                "environment": {"SITE": "east", "CASASPAWNER_RELEASE": "from-profile"}
            },
        }
    ]
    spawner = make_spawner(profile_list=profile_list, environment={"OPERATOR": "1"})
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod = await spawner.session_manifests()
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["CASASPAWNER_REASON"] == spawner.session_plan.reason and env[
        "CASASPAWNER_REASON"
    ].endswith(".")
    assert (env["SITE"], env["OPERATOR"], env["CASASPAWNER_RELEASE"]) == (
        "east",
        "1",
        "pl-2023.1.0.124",
    )


async def test_a_lab_after_a_desktop_keeps_no_desktop_variables(make_spawner, storage):
    """The spawner object stays between sessions: each plan's own variables replace the last's,
    the operator's stay."""
    from casaspawner.kube.apps import SESSION_ENVIRONMENT

    spawner = make_spawner(desktop_apps=True, environment={"OPERATOR": "1"})
    dataset = dataset_in(storage, "alice", "cycle10")

    async def environment(interface: str) -> dict[str, str]:
        await spawner._run_apply_user_options({"dataset": dataset, "interface": interface})
        pod = await spawner.session_manifests()
        return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}

    desktop = await environment("desktop")
    assert {k: desktop.get(k) for k in SESSION_ENVIRONMENT} == SESSION_ENVIRONMENT
    lab = await environment("lab")
    assert not set(SESSION_ENVIRONMENT) & set(lab) and lab["OPERATOR"] == "1", lab


async def test_session_memory_is_written_as_kubespawner_takes_it(make_spawner, storage):
    sizes = {
        "s": {"mem_guarantee": 2 * 2**30, "mem_limit": 8 * 2**30, "description": "bytes"},
        "t": {"mem_limit": "1.5G"},
        "u": {"mem_limit": 3 * 2**20 + 2**10},
    }
    spawner = make_spawner(session_sizes=sizes, default_size="s")
    assert {n: (r.mem_guarantee, r.mem_limit) for n, r in spawner.size_resources().items()} == {
        "s": ("2G", "8G"),
        "t": ("", "1.5G"),
        "u": ("", "3073K"),
    }
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod = await spawner.session_manifests()
    resources = pod["spec"]["containers"][0]["resources"]
    assert (resources["limits"]["memory"], resources["requests"]["memory"]) == (
        8 * 2**30,
        2 * 2**30,
    )


async def test_token_never_in_pod_or_logs(make_spawner, storage, caplog):
    caplog.set_level(logging.DEBUG)
    spawner = make_spawner()
    spawner.log.setLevel(logging.DEBUG)
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod = await spawner.session_manifests()
    assert spawner.access_token == "tok-SECRET-42"
    assert "tok-SECRET-42" not in json.dumps(pod) + json.dumps(spawner.get_state())
    assert "tok-SECRET-42" not in caplog.text
    mount = next(
        m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "casa-token"
    )
    assert mount == {"mountPath": "/var/run/secrets/casaspawner", "name": "casa-token"}


async def test_the_entry_point_is_casaspawner_and_every_option_is_described(make_spawner):
    from importlib.metadata import entry_points

    from casaspawner.kube.spawner import CASASpawner

    names = {ep.name: ep for ep in entry_points(group="jupyterhub.spawners")}
    assert names["casa"].load() is CASASpawner
    spawner = make_spawner()
    assert spawner.cmd == ["jupyterhub-singleuser"]
    for name, trait in CASASpawner.class_traits(config=True).items():
        if trait.this_class.__module__.startswith("casaspawner"):
            assert trait.help and len(trait.help.split()) >= 5, name


async def test_operator_volumes_as_list_are_kept(make_spawner, storage):
    """z2jh may pass extraVolumes as a list; they stay, in order, next to the session's own
    volumes."""
    spawner = make_spawner(
        volumes=[{"name": "shared-config", "configMap": {"name": "site"}}],
        volume_mounts=[{"name": "shared-config", "mountPath": "/etc/site", "readOnly": True}],
    )
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod = await spawner.session_manifests()
    assert pod["spec"]["volumes"][0] == {"name": "shared-config", "configMap": {"name": "site"}}
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert mounts[0]["mountPath"] == "/etc/site" and "/arc/home/alice" in {
        m["mountPath"] for m in mounts
    }


async def test_a_root_group_session_pod_passes_the_restricted_profile(make_spawner, storage):
    """gid 0 when the operator allows it (tests/spawners/test_spawners_mixin.py: the plan)."""
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    allowed = make_spawner(FakeUser(auth_state=auth_state(gid=0, gids=[0])), allow_root_group=True)
    await allowed.prepare_session(dataset)
    pod = await allowed.session_manifests()
    assert pod["spec"]["securityContext"]["runAsGroup"] == 0 and restricted_violations(pod) == {}


async def test_unusable_group_names_are_skipped_not_refused(make_spawner, storage, caplog):
    long_name = "g" * 70
    groups = ("proja", "/org/sub", "ivo://cadc.nrc.ca/gms?alma", long_name, "My Group", "/proja")
    spawner = make_spawner(FakeUser(auth_state=auth_state(groups=groups)))
    with caplog.at_level(logging.INFO):
        plan = await spawner.prepare_session({"dataset": dataset_in(storage, "alice", "cycle10")})
    assert plan.identity.groups == ("proja",)
    assert (
        "No project directories for 4 of alice's groups" in caplog.text
        and "'org/sub'" in caplog.text
    )
    pod = await spawner.session_manifests()
    paths = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert "/arc/projects/proja" in paths and not any("org" in p or "gms" in p for p in paths)
    # a dataset in a project the user has no (usable) directory of is still a clear error
    assert await refused(
        make_spawner(FakeUser(auth_state=auth_state(groups=groups))),
        {"dataset": "/arc/projects/org/sub/data"},
    ) == (
        "The dataset path '/arc/projects/org/sub/data' is outside your storage: 'org' is not one "
        "of your project directories (yours: proja)."
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"session_sizes": {"s": {"cpu_limit": "two"}}, "default_size": "s"},
            "CASASpawner.session_sizes['s']['cpu_limit'] is 'two', not a number of CPU cores "
            "(such as 0.5 or 4).",
        ),
        (
            {"session_sizes": {"s": {"mem_limit": "lots"}}, "default_size": "s"},
            "CASASpawner.session_sizes['s']['mem_limit'] is 'lots', not an amount of memory (a "
            "number with K, M, G or T, such as '8G').",
        ),
        (
            {"session_sizes": {"s": {"mem_limit": "8Gi"}}, "default_size": "s"},
            "CASASpawner.session_sizes['s']['mem_limit'] is '8Gi', the Kubernetes spelling; "
            "session memory is written as JupyterHub writes it, '8G' (its units are of 1024).",
        ),
        (
            {"session_sizes": {"s": {"mem_limit": 10**9}}, "default_size": "s"},
            "CASASpawner.session_sizes['s']['mem_limit'] is 1000000000, not a positive number of "
            "bytes that is a multiple of 1024",
        ),
        (
            {"image_template": "{registry}/{nope}"},
            "CASASpawner.image_template is '{registry}/{nope}', which uses {nope}; its "
            "fields are {registry}, {tag}, {casa}, {pipeline}, {id}.",
        ),
        (
            {"home_subpath_template": "home/{user}"},
            "CASASpawner.home_subpath_template is 'home/{user}', which uses {user}; its fields "
            "are {username}.",
        ),
        (
            {"home_mount_template": "/arc/home/{user}"},
            "CASASpawner.home_mount_template is '/arc/home/{user}', which uses {user}; its "
            "fields are {username}.",
        ),
        (
            {"project_mount_template": "/arc/projects/{group"},
            "CASASpawner.project_mount_template is '/arc/projects/{group', not a template "
            "(write {{ and }} for braces); its fields are {group}.",
        ),
        (
            {"project_subpath_template": "projects/{0}"},
            "CASASpawner.project_subpath_template is 'projects/{0}', which uses {0}; its fields "
            "are {group}.",
        ),
        (
            {"project_group_pattern": "proj-("},
            "CASASpawner.project_group_pattern is 'proj-(', not a regular expression (missing ), "
            "unterminated subpattern).",
        ),
        (
            {"scratch_mount_path": "scratch"},
            "CASASpawner.scratch_mount_path is 'scratch'; a place in the session is an absolute "
            "path.",
        ),
        (
            {"fallback_gid": 2**32},
            "CASASpawner.fallback_gid is 4294967296, not an id from 0 to 4294967294.",
        ),
        (
            {"session_sizes": {"s": {"cpu_guarantee": 4, "cpu_limit": 2}}, "default_size": "s"},
            "CASASpawner.session_sizes['s'] guarantees more CPU than its cpu_limit.",
        ),
        (
            {"session_sizes": {"s": {"cpus": 2}}, "default_size": "s"},
            "CASASpawner.session_sizes['s'] must be a",
        ),
        ({"session_sizes": {}}, "CASASpawner.session_sizes is empty"),
        (
            {"default_size": "nope"},
            "CASASpawner.default_size is 'nope', which is not one of CASASpawner.session_sizes "
            "(small, medium, large).",
        ),
        (
            {"scratch_size_limit": "20 gigs"},
            "CASASpawner.scratch_size_limit is '20 gigs', not a Kubernetes quantity of bytes "
            "such as '20Gi'.",
        ),
        ({"tmp_size_limit": "0"}, "CASASpawner.tmp_size_limit is '0', not a Kubernetes quantity"),
        (
            {"storage_volume": {"persistentVolumeClaim": {}}},
            "the storage volume's persistentVolumeClaim settings need claimName.",
        ),
        (
            {"label_prefix": "Bad Prefix"},
            "'Bad Prefix' is not a Kubernetes label prefix (a DNS subdomain).",
        ),
        ({"catalog_path": "/nonexistent.yaml"}, "the catalog /nonexistent.yaml cannot be read"),
        (
            {"pod_security_level": "lax"},
            "CASASpawner.pod_security_level is 'lax', not a Pod Security Standard level "
            "(restricted, baseline or privileged).",
        ),
    ],
)
async def test_operator_config_errors_name_the_option(make_spawner, storage, config, expected):
    """One sentence naming the option, marked as the hub's fault (500), never "Invalid user
    options"."""
    spawner = make_spawner(**config)
    with pytest.raises(SpawnException) as info:
        await spawner._run_apply_user_options(
            {"dataset": dataset_in(storage, "alice", "cycle10"), "size": "s"}
        )
    message = info.value.jupyterhub_message
    assert message.startswith("The hub's configuration is invalid: ") and expected in message, (
        message
    )
    assert info.value.status_code == 500 and "\n" not in message
    # the form still renders, saying the same
    assert expected.split(" (")[0].replace("'", "&#39;") in spawner.render_options_form()


async def test_operator_hooks_that_raise_are_one_sentence(make_spawner, storage):
    def broken(*args):
        return 1 / 0

    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    spawner = make_spawner(auth_state_hook=broken)
    with pytest.raises(SpawnException) as info:
        await spawner.run_auth_state_hook({})
    assert info.value.jupyterhub_message == (
        "The hub's configured auth_state_hook failed (ZeroDivisionError: division by zero)."
    )
    spawner = make_spawner(pre_spawn_hook=broken)
    with pytest.raises(
        SpawnException, match=r"configured pre_spawn_hook failed \(ZeroDivisionError"
    ):
        await spawner.run_pre_spawn_hook()
    spawner = make_spawner(modify_pod_hook=broken)
    await spawner._run_apply_user_options(dict(dataset))
    with pytest.raises(
        SpawnException, match=r"configured modify_pod_hook failed \(ZeroDivisionError"
    ):
        await spawner.session_manifests()
    spawner = make_spawner(modify_pod_hook=lambda spawner, pod: None)
    await spawner._run_apply_user_options(dict(dataset))
    with pytest.raises(SpawnException, match="modify_pod_hook returned nothing"):
        await spawner.session_manifests()

    def no_uid(spawner, auth_state):
        return {"gid": auth_state["oauth_user"]["uidNumber"]}

    spawner = make_spawner(identity_hook=no_uid)
    with pytest.raises(SpawnException) as info:
        await spawner._run_apply_user_options(dict(dataset))
    assert info.value.status_code == 500
    assert (
        info.value.jupyterhub_message
        == "The hub's configured identity_hook failed (KeyError: 'uidNumber')."
    )
    spawner = make_spawner(group_overrides=broken)
    with pytest.raises(SpawnException) as info:
        # As JupyterHub calls it before apply_user_options.
        await spawner.apply_group_overrides()
    assert info.value.status_code == 500 and info.value.jupyterhub_message == (
        "The hub's configured group_overrides failed (ZeroDivisionError: division by zero)."
    )
    spawner = make_spawner(after_pod_created_hook=broken)
    pod = {"metadata": {"name": "jupyter-alice", "uid": "u-1"}}
    spawner._access_token = None
    with pytest.raises(
        SpawnException, match=r"configured after_pod_created_hook failed \(ZeroDivisionError"
    ):
        await spawner.after_pod_created_hook(spawner, pod)


async def test_dry_run_runs_the_hubs_steps_in_the_hubs_order(make_spawner, storage):
    calls = []

    async def auth_state_hook(spawner, auth_state):
        calls.append("auth_state_hook")
        spawner.extra_annotations = {
            **spawner.extra_annotations,
            "team": auth_state["oauth_user"]["team"],
        }

    def group_overrides(spawner):
        calls.append("group_overrides")
        return {
            "gpu": {
                "groups": ["proja"],
                "spawner_override": {"tolerations": [{"key": "gpu", "operator": "Exists"}]},
            }
        }

    def pre_spawn_hook(spawner):
        calls.append(
            "pre_spawn_hook"
            if spawner.session_plan is not None
            else "pre_spawn_hook before the plan"
        )
        spawner.node_selector = {"pool": "casa"}

    def modify_pod_hook(spawner, pod):
        calls.append("modify_pod_hook")
        return pod

    user = FakeUser(auth_state=auth_state(groups=("proja",), team="alma"), groups=("proja",))
    spawner = make_spawner(
        user,
        auth_state_hook=auth_state_hook,
        group_overrides=group_overrides,
        pre_spawn_hook=pre_spawn_hook,
        modify_pod_hook=modify_pod_hook,
    )
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    pod = await spawner.dry_run_manifests()
    assert calls == ["auth_state_hook", "group_overrides", "pre_spawn_hook", "modify_pod_hook"]
    assert pod["metadata"]["annotations"]["team"] == "alma"
    assert (
        pod["metadata"]["annotations"]["casaspawner.io/dataset"] == spawner.user_options["dataset"]
    )
    assert pod["spec"]["nodeSelector"] == {"pool": "casa"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]

    # the next session of the same spawner starts from the configuration again, plus its own hooks'
    # values
    spawner.clear_state()
    user.auth_state = auth_state(groups=("proja",), team="vla")
    calls.clear()
    pod = await spawner.dry_run_manifests()
    assert pod["metadata"]["annotations"]["team"] == "vla"


async def test_a_repeated_event_keeps_its_place_so_progress_skips_none(make_spawner, monkeypatch):
    """KubeSpawner's progress reads ``events`` by index: an event repeated later (its count and
    lastTimestamp updated, as the kubelet's ClusterDNS warning is) must not move."""
    from types import SimpleNamespace

    from casaspawner.kube.spawner import CASASpawner

    def event(uid: str, first: str, last: str, reason: str) -> dict:
        return {
            "metadata": {"uid": uid},
            "involvedObject": {"name": "jupyter-alice"},
            "firstTimestamp": first,
            "lastTimestamp": last,
            "eventTime": None,
            "reason": reason,
        }

    found = {
        "ns/scheduled": event("1", "T00:00:32", "T00:00:32", "Scheduled"),
        "ns/dns": event("2", "T00:00:33", "T00:00:33", "DNSConfigForming"),
        "ns/pulled": event("3", "T00:00:33", "T00:00:33", "Pulled"),
        "ns/created": event("4", "T00:00:33", "T00:00:33", "Created"),
    }
    reflector = SimpleNamespace(resources=found)
    monkeypatch.setattr(CASASpawner, "event_reflector", property(lambda self: reflector))
    spawner = make_spawner()
    before = [e["reason"] for e in spawner.events]
    found["ns/dns"] = {**found["ns/dns"], "lastTimestamp": "T00:00:34"}
    after = [e["reason"] for e in spawner.events]
    assert before == after == ["Scheduled", "DNSConfigForming", "Pulled", "Created"]

"""The Pod Security Standards check (kube/podsecurity.py) against an independent checker
(tests/support/pss.py), and on the final pod after every operator setting."""

from __future__ import annotations

import asyncio
import copy

import pytest
from support.datasets import dataset_in
from support.pss import BASELINE_RULES, restricted_violations
from support.users import FakeUser, auth_state

from casaspawner.datasets.synth import write_dataset
from casaspawner.kube import podsecurity
from casaspawner.spawners.errors import SpawnException

#: z2jh's default ``singleuser.cloudMetadata.blockWithIptables: true`` init container (its chart's
#: hub config).
Z2JH_BLOCK_CLOUD_METADATA = {
    "name": "block-cloud-metadata",
    "image": "quay.io/jupyterhub/k8s-network-tools:4.4.0",
    "command": [
        "iptables",
        "--append",
        "OUTPUT",
        "--protocol",
        "tcp",
        "--destination",
        "169.254.169.254",
        "--destination-port",
        "80",
        "--jump",
        "DROP",
    ],
    "securityContext": {
        "privileged": True,
        "runAsUser": 0,
        "capabilities": {"add": ["NET_ADMIN"]},
    },
}


def csc(pod: dict) -> dict:
    """The session container's security context."""
    return pod["spec"]["containers"][0]["securityContext"]


def psc(pod: dict) -> dict:
    """The pod's security context."""
    return pod["spec"]["securityContext"]


def drop_all(*add: str) -> dict:
    return {"drop": ["ALL"], "add": list(add)}


#: Ways to weaken a pod, each a change made in place.
WEAKENINGS = {
    "privileged": lambda p: csc(p).update(privileged=True),
    "escalation": lambda p: csc(p).update(allowPrivilegeEscalation=True),
    "cap-add-sys-admin": lambda p: csc(p).update(capabilities={"add": ["SYS_ADMIN"]}),
    "cap-sys-admin": lambda p: csc(p).update(capabilities=drop_all("SYS_ADMIN")),
    "cap-chown": lambda p: csc(p).update(capabilities=drop_all("CHOWN")),
    "cap-bind": lambda p: csc(p).update(capabilities=drop_all("NET_BIND_SERVICE")),
    "root-user": lambda p: csc(p).update(runAsUser=0),
    "non-root-off": lambda p: [csc(p).pop("runAsNonRoot"), psc(p).pop("runAsNonRoot")],
    "seccomp-unconfined": lambda p: csc(p).update(seccompProfile={"type": "Unconfined"}),
    "no-seccomp": lambda p: [csc(p).pop("seccompProfile"), psc(p).pop("seccompProfile")],
    "host-network": lambda p: p["spec"].update(hostNetwork=True),
    "host-pid": lambda p: p["spec"].update(hostPID=True),
    "host-path": lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "nfs": lambda p: p["spec"]["volumes"].append(
        {"name": "n", "nfs": {"server": "x", "path": "/"}}
    ),
    "host-port": lambda p: p["spec"]["containers"][0]["ports"][0].update(hostPort=80),
    "proc-mount": lambda p: csc(p).update(procMount="Unmasked"),
    "selinux": lambda p: csc(p).update(seLinuxOptions={"type": "spc_t"}),
    "sysctl": lambda p: psc(p).update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    "apparmor": lambda p: csc(p).update(appArmorProfile={"type": "Unconfined"}),
    "z2jh-init": lambda p: (
        p["spec"].setdefault("initContainers", []).append(copy.deepcopy(Z2JH_BLOCK_CLOUD_METADATA))
    ),
}

#: The rules of the independent checker that some of the weakenings break.
CAUGHT_BY = {
    "privileged": {"privileged"},
    "escalation": {"privilege-escalation"},
    "cap-add-sys-admin": {"capabilities-baseline", "capabilities-restricted"},
    "root-user": {"run-as-user"},
    "non-root-off": {"run-as-non-root"},
    "no-seccomp": {"seccomp-restricted"},
    "host-network": {"host-namespaces"},
    "host-path": {"host-path-volumes", "volume-types"},
    "host-port": {"host-ports"},
}


@pytest.fixture(scope="module")
def clean_pod(tmp_path_factory):
    """A generated session pod, as plain JSON (built once, from the synthetic Cycle 10 dataset)."""
    pytest.importorskip("kubespawner", reason="the session pod is KubeSpawner's")
    from casaspawner.kube.dryrun import _offline_kubernetes
    from casaspawner.kube.spawner import CASASpawner

    root = tmp_path_factory.mktemp("pss")
    member = write_dataset(root / "home" / "alice" / "d", "cycle10")

    async def build() -> dict:
        user = FakeUser(auth_state=auth_state())
        spawner = CASASpawner(_mock=True, user=user, storage_hub_path=str(root))
        spawner.user_options = {"dataset": str(member.relative_to(root / "home" / "alice"))}
        pod = await spawner.session_manifests()
        return pod

    with _offline_kubernetes():
        return asyncio.run(build())


@pytest.mark.parametrize("weakening", sorted(CAUGHT_BY))
def test_checker_catches_weakened_pods(clean_pod, weakening):
    """The PSS checker is not vacuous: each weakening of a generated pod is caught by its rule."""
    assert restricted_violations(clean_pod) == {}
    pod = copy.deepcopy(clean_pod)
    WEAKENINGS[weakening](pod)
    assert set(restricted_violations(pod)) == CAUGHT_BY[weakening]


@pytest.mark.parametrize("weakening", sorted(WEAKENINGS))
def test_pod_security_check_agrees_with_the_independent_checker(clean_pod, weakening):
    """Our checker (which refuses pods) finds a problem exactly when tests/support/pss.py does, at
    each level."""
    assert podsecurity.pod_security_violations(clean_pod, "restricted") == []
    pod = copy.deepcopy(clean_pod)
    WEAKENINGS[weakening](pod)
    independent = restricted_violations(pod)
    ours = podsecurity.pod_security_violations(pod, "restricted")
    assert bool(ours) == bool(independent), (ours, independent)
    baseline = podsecurity.pod_security_violations(pod, "baseline")
    assert bool(baseline) == bool(set(independent) & set(BASELINE_RULES)), (baseline, independent)
    assert podsecurity.pod_security_violations(pod, "privileged") == []


async def refusal(make_spawner, storage, **config) -> str:
    """The sentence refusing the final pod of a session on ``config``, the hub's fault (500)."""
    spawner = make_spawner(**config)
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    with pytest.raises(SpawnException) as info:
        await spawner.session_manifests()
    assert info.value.status_code == 500
    return info.value.jupyterhub_message


async def test_an_operators_init_container_reaches_the_check(make_spawner, storage):
    message = await refusal(make_spawner, storage, init_containers=[Z2JH_BLOCK_CLOUD_METADATA])
    assert message.startswith(
        "The session pod breaks the restricted Pod Security Standard: init container "
        "block-cloud-metadata is privileged (and "
    )
    assert message.endswith("or CASASpawner.pod_security_level.") and "\n" not in message


def privileged_sidecar(spawner, pod):
    sidecar = {"name": "sidecar", "image": "x", "securityContext": {"privileged": True}}
    pod.spec.containers.append(sidecar)
    return pod


def token_in_env(spawner, pod):
    pod.spec.containers[0].env.append({"name": "TOKEN", "value": f"Bearer {spawner.access_token}"})
    return pod


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"extra_container_config": {"ports": [{"containerPort": 8888, "hostPort": 80}]}},
            "host port",
        ),
        ({"extra_pod_config": {"hostNetwork": True}}, "sets hostNetwork"),
        (
            {"volumes": [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}]},
            "the volume docker is a hostPath volume",
        ),
        ({"modify_pod_hook": privileged_sidecar}, "container sidecar is privileged"),
        (
            {"modify_pod_hook": token_in_env},
            "put the user's access token into the pod itself",
        ),
    ],
    ids=["host-port", "host-network", "host-path", "privileged-sidecar", "token-in-env"],
)
async def test_final_pod_is_checked_after_every_operator_setting(
    make_spawner, storage, config, expected
):
    """Operator volumes, extra_*_config and modify_pod_hook all reach the check."""
    assert expected in await refusal(make_spawner, storage, **config)


async def test_a_lower_level_lets_the_operators_choice_through(make_spawner, storage):
    """The operator's init container at the privileged level: nothing is said about it."""
    spawner = make_spawner(
        init_containers=[Z2JH_BLOCK_CLOUD_METADATA], pod_security_level="privileged"
    )
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod = await spawner.session_manifests()
    assert pod["spec"]["initContainers"][0]["name"] == "block-cloud-metadata"


async def test_pod_security_refusal_before_the_pod_exists(cluster, make_spawner, storage):
    emulator, _server = cluster
    spawner = make_spawner(init_containers=[Z2JH_BLOCK_CLOUD_METADATA], start_timeout=10)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    await spawner._run_apply_user_options(spawner.user_options)
    with pytest.raises(SpawnException, match="init container block-cloud-metadata is privileged"):
        await spawner.start()
    # Nothing was created.
    assert not [r for r in emulator if r.method.value == "POST"]

"""Pod manifests from the real CASASpawner path for a grid of sessions: Kubernetes schema + restricted PSS."""

from __future__ import annotations

import copy
import itertools
import json

import kubernetes_validate
import pytest
from conftest import dataset_in
from kube_support import FakeUser, auth_state
from pss import restricted_violations

from casaspawner.errors import InvalidInput
from casaspawner.kube import objects, podsecurity, quantities
from casaspawner.kube.events import spawn_failure
from casaspawner.spawners.errors import SpawnException

K8S_VERSION = kubernetes_validate.latest_version()

STORAGE = {
    "pvc": {"persistentVolumeClaim": {"claimName": "cavern"}},
    "csi-nfs": {
        "csi": {"driver": "nfs.csi.k8s.io", "volumeAttributes": {"server": "nfs.example.org", "share": "/"}}
    },
    "cephfs-pv": {"persistentVolumeClaim": {"claimName": "cavern-cephfs"}},
    "cephfs": {
        "cephfs": {
            "monitors": ["10.0.0.1:6789"],
            "path": "/cavern",
            "user": "cavern",
            "secretRef": {"name": "ceph"},
        }
    },
    "nfs": {"nfs": {"server": "nfs.example.org", "path": "/cavern"}},
    "hostPath": {"hostPath": {"path": "/srv/cavern", "type": "Directory"}},
}
#: Which storage kinds each Pod Security level admits (the spawner refuses the others with one sentence).
LEVEL = {
    "pvc": "restricted",
    "csi-nfs": "restricted",
    "cephfs-pv": "restricted",
    "cephfs": "baseline",
    "nfs": "baseline",
    "hostPath": "privileged",
}
ERAS = ("cycle10", "cycle7", "cycle3-pipeline", "cycle2-manual")
GROUPS = ((), ("proja", "projb"))


def validate(manifest: dict) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


async def manifests_for(make_spawner, storage, *, interface, era, groups, storage_kind, level=None):
    user = FakeUser(auth_state=auth_state(uid=20001, gid=20001, groups=groups, gids=[30001, 30002]))
    spawner = make_spawner(
        user,
        storage_volume=STORAGE[storage_kind],
        pod_security_level=level or LEVEL[storage_kind],
        supplemental_gids_claim="oauth_user.gids",
    )
    spawner.user_options = {"dataset": dataset_in(storage, "alice", era), "interface": interface}
    await spawner.prepare_session()
    return spawner, *(await spawner.session_manifests())


GRID = list(itertools.product(("lab", "desktop"), ERAS, list(STORAGE), GROUPS))


@pytest.mark.parametrize(("interface", "era", "storage_kind", "groups"), GRID)
async def test_grid_pod_is_valid_and_hardened(make_spawner, storage, interface, era, storage_kind, groups):
    spawner, pod, secret = await manifests_for(
        make_spawner, storage, interface=interface, era=era, groups=groups, storage_kind=storage_kind
    )
    validate(pod)
    validate(secret)
    violations = restricted_violations(pod)
    if LEVEL[storage_kind] == "restricted":
        assert violations == {}
    else:  # opted into a lower level: the storage volume is the only thing the restricted profile objects to
        expected = {"volume-types"} | ({"host-path-volumes"} if storage_kind == "hostPath" else set())
        assert set(violations) == expected
        assert all("casa-storage" in v for found in violations.values() for v in found)

    (container,) = pod["spec"]["containers"]
    assert container["name"] == "notebook" and container["args"] == ["jupyterhub-singleuser"]
    assert container["image"] == spawner.session_plan.image
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["JUPYTERHUB_DEFAULT_URL"] == ("/lab" if interface == "lab" else "/desktop/")
    assert ("JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP" in env) == (interface == "desktop")
    assert env["HOME"] == "/arc/home/alice" and env["SCRATCH"] == "/scratch"

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/arc/home/alice"]["subPath"] == "home/alice"
    for group in groups:
        assert mounts[f"/arc/projects/{group}"]["subPath"] == f"projects/{group}"
        assert mounts[f"/arc/projects/{group}"]["name"] == "casa-storage"
    assert not any(path.startswith("/arc/projects/") for path in mounts if not groups)
    assert mounts["/opt/casa/measures"]["readOnly"] is True
    assert "/tmp" in mounts and "/scratch" in mounts
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["casa-scratch"]["emptyDir"]["sizeLimit"] == "20Gi"
    assert volumes["casa-storage"] == {"name": "casa-storage", **STORAGE[storage_kind]}

    psc, csc = pod["spec"]["securityContext"], container["securityContext"]
    assert psc["runAsUser"] == csc["runAsUser"] == 20001
    assert psc["supplementalGroups"] == [30001, 30002]
    assert "fsGroup" not in psc  # fsGroup would chown all of Cavern on every start
    assert csc["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert "tok-SECRET-42" not in json.dumps(pod)
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "Pod" and "data" not in secret


async def test_inline_storage_refused_at_restricted_level(make_spawner, storage):
    for kind in ("cephfs", "nfs", "hostPath"):
        with pytest.raises(SpawnException) as info:
            await manifests_for(
                make_spawner,
                storage,
                interface="lab",
                era="cycle10",
                groups=(),
                storage_kind=kind,
                level="restricted",
            )
        assert info.value.jupyterhub_message == (
            f"The hub's configuration is invalid: the storage volume is an inline {kind} volume, which the "
            "restricted Pod Security Standard forbids; use a PersistentVolumeClaim or a CSI driver, or lower "
            "CASASpawner.pod_security_level."
        )
        assert info.value.status_code == 500  # the hub's fault, not the user's
    with pytest.raises(SpawnException, match="baseline Pod Security Standard forbids"):
        await manifests_for(
            make_spawner,
            storage,
            interface="lab",
            era="cycle10",
            groups=(),
            storage_kind="hostPath",
            level="baseline",
        )


def test_volume_source_shapes():
    assert objects.volume_source({"csi": {"driver": "x"}}, "storage") == {"csi": {"driver": "x"}}
    for bad in (
        {},
        {"emptyDir": {}},
        {"persistentVolumeClaim": {}, "csi": {}},
        {"persistentVolumeClaim": "cavern"},
        {"persistentVolumeClaim": {}},
        {"nfs": {"server": "nfs.example.org"}},
    ):
        with pytest.raises(InvalidInput):
            objects.volume_source(bad, "storage")
    with pytest.raises(InvalidInput, match="pod_security_level is 'lax', not a Pod Security Standard level"):
        objects.volume_source({"csi": {}}, "storage", "lax")


def test_volume_source_names_missing_settings():
    with pytest.raises(InvalidInput) as info:
        objects.volume_source({"nfs": {"server": "nfs.example.org"}}, "storage", "baseline")
    assert str(info.value) == "The storage volume's nfs settings need path."


def test_labels_merge_never_replaces_existing():
    merged = objects.merge_keeping(
        {"hub.jupyter.org/network-access-hub": "true", "a/b": "theirs"}, {"a/b": "ours", "c/d": "x"}
    )
    assert merged == {"hub.jupyter.org/network-access-hub": "true", "a/b": "theirs", "c/d": "x"}


def test_token_secret_manifest():
    secret = objects.token_secret(
        "pod-token", "s3cr3t", owner_name="pod", owner_uid="u-1", labels={"a": "b"}
    )
    validate(secret)
    assert secret["data"] == {"token": "czNjcjN0"}
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "pod",
            "uid": "u-1",
            "blockOwnerDeletion": True,
            "controller": False,
        }
    ]
    assert "data" not in objects.token_secret("pod-token", None, owner_name="pod", owner_uid="u-1")


IMAGE = "registry/casa:6.6.5-31"
PULL_FAILED = {"reason": "Failed", "message": f'Failed to pull image "{IMAGE}": manifest unknown'}
ERR_IMAGE_PULL = {"reason": "Failed", "message": "Error: ErrImagePull"}
BACK_OFF = {"reason": "BackOff", "message": f'Back-off pulling image "{IMAGE}"'}
IMAGE_PULL_BACK_OFF = {"reason": "Failed", "message": "Error: ImagePullBackOff"}
PULLING = {"reason": "Pulling", "message": f'Pulling image "{IMAGE}"'}
PULLED = {"reason": "Pulled", "message": f'Successfully pulled image "{IMAGE}"'}
FAILED_SCHEDULING = {
    "reason": "FailedScheduling",
    "message": "0/3 nodes are available: 3 Insufficient memory.",
}
SCHEDULED = {"reason": "Scheduled", "message": "Successfully assigned test/pod to node-1"}
SCALE_UP = {"reason": "TriggeredScaleUp", "message": "pod triggered scale-up: [{pool 1->2 (max: 5)}]"}
NOT_PULLED = (
    f'The session image {IMAGE} could not be pulled (Failed to pull image "{IMAGE}": manifest unknown).'
)
UNSCHEDULABLE = "No node can run this session: 0/3 nodes are available: 3 Insufficient memory."


def waiting(reason: str, message: str = "") -> dict:
    state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    return {"status": {"phase": "Pending", "containerStatuses": [{"name": "notebook", "state": state}]}}


@pytest.mark.parametrize(
    ("pod", "events", "expected"),
    [
        (None, [], None),
        ({"status": {"phase": "Pending"}}, [SCHEDULED, PULLING], None),
        # a pull that failed once may still work on the kubelet's next try …
        (None, [SCHEDULED, PULLING, PULL_FAILED, ERR_IMAGE_PULL], None),
        (waiting("ErrImagePull", "manifest unknown"), [PULLING, PULL_FAILED], None),
        (None, [PULLING, PULL_FAILED, ERR_IMAGE_PULL, PULLING, PULLED], None),
        # … but one that failed and then backed off, with no Pulled since, has failed
        (None, [PULLING, PULL_FAILED, ERR_IMAGE_PULL, BACK_OFF, IMAGE_PULL_BACK_OFF], NOT_PULLED),
        (waiting("ImagePullBackOff"), [PULLING, PULL_FAILED, ERR_IMAGE_PULL], NOT_PULLED),
        (
            waiting("ImagePullBackOff"),
            [],
            f"The session image {IMAGE} could not be pulled (ImagePullBackOff).",
        ),
        (None, [PULL_FAILED, BACK_OFF, PULLING, PULLED, {"reason": "Started", "message": "x"}], None),
        # no retry cures these
        (
            waiting("InvalidImageName", f'Failed to apply default image tag "{IMAGE}"'),
            [],
            f'The session image {IMAGE} could not be pulled (Failed to apply default image tag "{IMAGE}").',
        ),
        # scheduling: the latest word wins
        (None, [FAILED_SCHEDULING], UNSCHEDULABLE),
        (None, [FAILED_SCHEDULING, SCHEDULED, PULLING], None),
        (None, [FAILED_SCHEDULING, SCALE_UP], None),
        (None, [FAILED_SCHEDULING, SCALE_UP, FAILED_SCHEDULING], UNSCHEDULABLE),
        (
            {
                "status": {
                    "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
                }
            },
            [],
            "No node can run this session: unschedulable.",
        ),
        ({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}, [FAILED_SCHEDULING], None),
    ],
)
def test_spawn_failure_decides_each_cause_on_its_latest_state(pod, events, expected):
    assert spawn_failure(pod, events, IMAGE) == expected


def test_unschedulable_not_fatal_when_turned_off():
    assert spawn_failure(None, [FAILED_SCHEDULING], IMAGE, unschedulable_is_fatal=False) is None
    backed_off = [PULL_FAILED, BACK_OFF]
    assert spawn_failure(None, backed_off, IMAGE, unschedulable_is_fatal=False) == NOT_PULLED


def test_security_contexts_refuse_root():
    from casaspawner.plan import Identity

    identity = Identity("alice", 1001, 1001)
    object.__setattr__(identity, "uid", 0)  # Identity itself refuses 0; the builder checks again
    with pytest.raises(InvalidInput, match="never run as root"):
        objects.security_contexts(identity)


async def test_checker_catches_weakened_pods(make_spawner, storage):
    """The PSS checker is not vacuous: each weakening of a generated pod is reported by its rule."""
    _, pod, _ = await manifests_for(
        make_spawner, storage, interface="lab", era="cycle10", groups=(), storage_kind="pvc"
    )
    assert restricted_violations(pod) == {}

    def weakened(change) -> dict:
        copy_ = copy.deepcopy(pod)
        change(copy_)
        return restricted_violations(copy_)

    csc = lambda p: p["spec"]["containers"][0]["securityContext"]  # noqa: E731
    assert set(weakened(lambda p: csc(p).update(privileged=True))) == {"privileged"}
    assert set(weakened(lambda p: csc(p).update(allowPrivilegeEscalation=True))) == {"privilege-escalation"}
    assert set(weakened(lambda p: csc(p).update(capabilities={"add": ["SYS_ADMIN"]}))) == {
        "capabilities-baseline",
        "capabilities-restricted",
    }
    assert set(weakened(lambda p: csc(p).update(runAsUser=0))) == {"run-as-user"}
    assert set(
        weakened(lambda p: [csc(p).pop("runAsNonRoot"), p["spec"]["securityContext"].pop("runAsNonRoot")])
    ) == {"run-as-non-root"}
    assert set(
        weakened(lambda p: [csc(p).pop("seccompProfile"), p["spec"]["securityContext"].pop("seccompProfile")])
    ) == {"seccomp-restricted"}
    assert set(weakened(lambda p: p["spec"].update(hostNetwork=True))) == {"host-namespaces"}
    assert set(weakened(lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}))) == {
        "host-path-volumes",
        "volume-types",
    }
    assert set(weakened(lambda p: p["spec"]["containers"][0]["ports"][0].update(hostPort=80))) == {
        "host-ports"
    }


# ------------------------------------------------------------------------------- the final pod's security
#: z2jh's default ``singleuser.cloudMetadata.blockWithIptables: true`` init container (its chart's hub config).
Z2JH_BLOCK_CLOUD_METADATA = {
    "name": "block-cloud-metadata",
    "image": "quay.io/jupyterhub/k8s-network-tools:4.4.0",
    "command": ["iptables", "--append", "OUTPUT", "--protocol", "tcp", "--destination", "169.254.169.254",
                "--destination-port", "80", "--jump", "DROP"],
    "securityContext": {"privileged": True, "runAsUser": 0, "capabilities": {"add": ["NET_ADMIN"]}},
}  # fmt: skip

WEAKENINGS = {
    "privileged": lambda p: csc(p).update(privileged=True),
    "escalation": lambda p: csc(p).update(allowPrivilegeEscalation=True),
    "cap-sys-admin": lambda p: csc(p).update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    "cap-chown": lambda p: csc(p).update(capabilities={"drop": ["ALL"], "add": ["CHOWN"]}),
    "cap-bind": lambda p: csc(p).update(capabilities={"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}),
    "root-user": lambda p: csc(p).update(runAsUser=0),
    "non-root-off": lambda p: [csc(p).pop("runAsNonRoot"), p["spec"]["securityContext"].pop("runAsNonRoot")],
    "seccomp-unconfined": lambda p: csc(p).update(seccompProfile={"type": "Unconfined"}),
    "no-seccomp": lambda p: [csc(p).pop("seccompProfile"), p["spec"]["securityContext"].pop("seccompProfile")],
    "host-network": lambda p: p["spec"].update(hostNetwork=True),
    "host-pid": lambda p: p["spec"].update(hostPID=True),
    "host-path": lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "nfs": lambda p: p["spec"]["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
    "host-port": lambda p: p["spec"]["containers"][0]["ports"][0].update(hostPort=80),
    "proc-mount": lambda p: csc(p).update(procMount="Unmasked"),
    "selinux": lambda p: csc(p).update(seLinuxOptions={"type": "spc_t"}),
    "sysctl": lambda p: p["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    "apparmor": lambda p: csc(p).update(appArmorProfile={"type": "Unconfined"}),
    "z2jh-init": lambda p: p["spec"].setdefault("initContainers", []).append(copy.deepcopy(Z2JH_BLOCK_CLOUD_METADATA)),
}  # fmt: skip


def csc(pod: dict) -> dict:
    return pod["spec"]["containers"][0]["securityContext"]


@pytest.fixture(scope="module")
def clean_pod(tmp_path_factory):
    """A generated session pod, as plain JSON (built once, from the synthetic Cycle 10 dataset)."""
    import asyncio

    from casaspawner.datasets.synth import write_dataset
    from casaspawner.kube.dryrun import _offline_kubernetes
    from casaspawner.kube.spawner import CASASpawner

    root = tmp_path_factory.mktemp("pss")
    member = write_dataset(root / "home" / "alice" / "d", "cycle10")

    async def build() -> dict:
        spawner = CASASpawner(_mock=True, user=FakeUser(auth_state=auth_state()), storage_hub_path=str(root))
        spawner.user_options = {"dataset": str(member.relative_to(root / "home" / "alice"))}
        pod, _ = await spawner.session_manifests()
        return pod

    with _offline_kubernetes():
        return asyncio.run(build())


@pytest.mark.parametrize("weakening", sorted(WEAKENINGS))
def test_pod_security_check_agrees_with_the_independent_checker(clean_pod, weakening):
    """Our checker (which refuses pods) finds a problem exactly when tests/kube/pss.py does, at each level."""
    from pss import BASELINE_RULES

    assert podsecurity.pod_security_violations(clean_pod, "restricted") == []
    pod = copy.deepcopy(clean_pod)
    WEAKENINGS[weakening](pod)
    independent = restricted_violations(pod)
    ours = podsecurity.pod_security_violations(pod, "restricted")
    assert bool(ours) == bool(independent), (ours, independent)
    baseline = podsecurity.pod_security_violations(pod, "baseline")
    assert bool(baseline) == bool(set(independent) & set(BASELINE_RULES)), (baseline, independent)
    assert podsecurity.pod_security_violations(pod, "privileged") == []


async def test_final_pod_is_checked_after_every_operator_setting(make_spawner, storage):
    """Operator volumes, init containers, extra_*_config and modify_pod_hook all reach the check."""
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}

    async def refusal(**config) -> str:
        spawner = make_spawner(**config)
        await spawner._run_apply_user_options(dict(dataset))
        with pytest.raises(SpawnException) as info:
            await spawner.session_manifests()
        assert info.value.status_code == 500
        return info.value.jupyterhub_message

    message = await refusal(init_containers=[Z2JH_BLOCK_CLOUD_METADATA])
    assert message.startswith(
        "The session pod breaks the restricted Pod Security Standard: init container block-cloud-metadata is "
        "privileged (and "
    )
    assert message.endswith("or CASASpawner.pod_security_level.") and "\n" not in message
    assert "host port" in await refusal(
        extra_container_config={"ports": [{"containerPort": 8888, "hostPort": 80}]}
    )
    assert "sets hostNetwork" in await refusal(extra_pod_config={"hostNetwork": True})
    assert "the volume docker is a hostPath volume" in await refusal(
        volumes=[{"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}]
    )

    def privileged_sidecar(spawner, pod):
        pod.spec.containers.append({"name": "sidecar", "image": "x", "securityContext": {"privileged": True}})
        return pod

    assert "container sidecar is privileged" in await refusal(modify_pod_hook=privileged_sidecar)

    def token_in_env(spawner, pod):
        pod.spec.containers[0].env.append({"name": "TOKEN", "value": f"Bearer {spawner.access_token}"})
        return pod

    assert "put the user's access token into the pod itself" in await refusal(modify_pod_hook=token_in_env)

    # a lower level lets the operator's choice through, and says nothing about it
    spawner = make_spawner(init_containers=[Z2JH_BLOCK_CLOUD_METADATA], pod_security_level="privileged")
    await spawner._run_apply_user_options(dict(dataset))
    pod, _ = await spawner.session_manifests()
    assert pod["spec"]["initContainers"][0]["name"] == "block-cloud-metadata"


async def test_pod_security_refusal_before_the_pod_exists(cluster, make_spawner, storage):
    emulator, _server = cluster
    spawner = make_spawner(init_containers=[Z2JH_BLOCK_CLOUD_METADATA], start_timeout=10)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    await spawner._run_apply_user_options(spawner.user_options)
    with pytest.raises(SpawnException, match="init container block-cloud-metadata is privileged"):
        await spawner.start()
    assert not [r for r in emulator if r.method.value == "POST"]  # nothing was created


def test_quantities():
    assert quantities.quantity_bytes("20Gi") == 20 * 1024**3
    assert quantities.quantity_bytes("1.5Gi") == 1536 * 1024**2
    assert quantities.quantity_bytes("500M") == 500_000_000
    assert quantities.quantity_bytes("1e9") == 10**9
    assert quantities.quantity_bytes("1500m") == 2  # milli-bytes round up
    assert quantities.quantity_bytes("  64Mi ") == 64 * 1024**2
    for bad in ("20 gigs", "20GB", "-1Gi", "", "Gi", "1.2.3Gi", "0x10"):
        assert quantities.quantity_bytes(bad) is None, bad
    assert quantities.format_bytes(21 * 1024**3) == "21Gi"
    assert quantities.format_bytes(1536 * 1024**2) == "1536Mi"
    assert quantities.format_bytes(1_000_000_001) == "1000000001"


async def test_container_reserves_scratch_and_tmp_as_ephemeral_storage(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    spawner = make_spawner(scratch_size_limit="50Gi", tmp_size_limit="512Mi")
    await spawner._run_apply_user_options(dict(dataset))
    pod, _ = await spawner.session_manifests()
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["ephemeral-storage"] == "51712Mi"  # 50Gi + 512Mi
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["casa-scratch"]["emptyDir"]["sizeLimit"] == "50Gi"
    assert volumes["casa-tmp"]["emptyDir"]["sizeLimit"] == "512Mi"
    validate(pod)
    # an operator's own limit stays
    own = make_spawner(extra_resource_limits={"ephemeral-storage": "100Gi", "nvidia.com/gpu": "1"})
    await own._run_apply_user_options(dict(dataset))
    pod, _ = await own.session_manifests()
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["ephemeral-storage"] == "100Gi" and limits["nvidia.com/gpu"] == "1"

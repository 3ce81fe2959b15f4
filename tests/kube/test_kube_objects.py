"""The pod's fields (kube/objects.py): the builders on their own, and the pod
of the real CASASpawner path for a grid of sessions, checked against the Kubernetes schema and the
restricted Pod Security Standard."""

from __future__ import annotations

import itertools
import json

import kubernetes_validate
import pytest
from support.datasets import dataset_in
from support.pss import restricted_violations
from support.users import FakeUser, auth_state

from casaspawner.errors import InvalidInput
from casaspawner.kube import objects
from casaspawner.plan import Identity
from casaspawner.spawners.errors import SpawnException

K8S_VERSION = kubernetes_validate.latest_version()

STORAGE = {
    "pvc": {"persistentVolumeClaim": {"claimName": "cavern"}},
    "csi-nfs": {
        "csi": {
            "driver": "nfs.csi.k8s.io",
            "volumeAttributes": {"server": "nfs.example.org", "share": "/"},
        }
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
#: Which storage kinds each Pod Security level admits (the spawner refuses the others with one
#: sentence).
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


async def manifests_for(
    make_spawner, storage, *, interface, era, groups, storage_kind, level=None
):
    user = FakeUser(
        auth_state=auth_state(uid=20001, gid=20001, groups=groups, gids=[30001, 30002])
    )
    spawner = make_spawner(
        user,
        storage_volume=STORAGE[storage_kind],
        pod_security_level=level or LEVEL[storage_kind],
        supplemental_gids_claim="oauth_user.gids",
    )
    spawner.user_options = {"dataset": dataset_in(storage, "alice", era), "interface": interface}
    await spawner.prepare_session()
    return spawner, await spawner.session_manifests()


GRID = list(itertools.product(("lab", "desktop"), ERAS, list(STORAGE), GROUPS))


@pytest.mark.parametrize(("interface", "era", "storage_kind", "groups"), GRID)
async def test_grid_pod_is_valid_and_hardened(
    make_spawner, storage, interface, era, storage_kind, groups
):
    spawner, pod = await manifests_for(
        make_spawner,
        storage,
        interface=interface,
        era=era,
        groups=groups,
        storage_kind=storage_kind,
    )
    validate(pod)
    violations = restricted_violations(pod)
    if LEVEL[storage_kind] == "restricted":
        assert violations == {}
    else:
        # Opted into a lower level: the storage volume is the only thing the restricted profile
        # objects to.
        expected = {"volume-types"} | (
            {"host-path-volumes"} if storage_kind == "hostPath" else set()
        )
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
    # fsGroup would chown all of Cavern on every start.
    assert "fsGroup" not in psc
    assert csc["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert "tok-SECRET-42" not in json.dumps(pod)
    # The token's directory: the pod's own memory, which the session writes the token into.
    assert volumes["casa-token"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    assert mounts["/var/run/secrets/casaspawner"] == {
        "name": "casa-token",
        "mountPath": "/var/run/secrets/casaspawner",
    }
    assert env["CASASPAWNER_TOKEN_FILE"] == "/var/run/secrets/casaspawner/token"
    assert env["CASASPAWNER_TOKEN_URL"].endswith("/casa-token/alice/")


@pytest.mark.parametrize("kind", ["cephfs", "nfs", "hostPath"])
async def test_inline_storage_refused_at_restricted_level(make_spawner, storage, kind):
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
        f"The hub's configuration is invalid: the storage volume is an inline {kind} volume, "
        "which the restricted Pod Security Standard forbids; use a PersistentVolumeClaim or a "
        "CSI driver, or lower CASASpawner.pod_security_level."
    )
    # The hub's fault, not the user's.
    assert info.value.status_code == 500


async def test_a_host_path_is_refused_at_the_baseline_level(make_spawner, storage):
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


async def test_container_reserves_scratch_and_tmp_as_ephemeral_storage(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    spawner = make_spawner(scratch_size_limit="50Gi", tmp_size_limit="512Mi")
    await spawner._run_apply_user_options(dict(dataset))
    pod = await spawner.session_manifests()
    (container,) = pod["spec"]["containers"]
    # 50Gi + 512Mi.
    assert container["resources"]["limits"]["ephemeral-storage"] == "51712Mi"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["casa-scratch"]["emptyDir"]["sizeLimit"] == "50Gi"
    assert volumes["casa-tmp"]["emptyDir"]["sizeLimit"] == "512Mi"
    validate(pod)
    # an operator's own limit stays
    own = make_spawner(extra_resource_limits={"ephemeral-storage": "100Gi", "nvidia.com/gpu": "1"})
    await own._run_apply_user_options(dict(dataset))
    pod = await own.session_manifests()
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["ephemeral-storage"] == "100Gi" and limits["nvidia.com/gpu"] == "1"


def test_a_storage_volume_is_one_known_source_with_its_settings():
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
    with pytest.raises(
        InvalidInput, match="pod_security_level is 'lax', not a Pod Security Standard level"
    ):
        objects.volume_source({"csi": {}}, "storage", "lax")


def test_volume_source_names_missing_settings():
    with pytest.raises(InvalidInput) as info:
        objects.volume_source({"nfs": {"server": "nfs.example.org"}}, "storage", "baseline")
    assert str(info.value) == "The storage volume's nfs settings need path."


def test_labels_merge_never_replaces_existing():
    merged = objects.merge_keeping(
        {"hub.jupyter.org/network-access-hub": "true", "a/b": "theirs"},
        {"a/b": "ours", "c/d": "x"},
    )
    assert merged == {"hub.jupyter.org/network-access-hub": "true", "a/b": "theirs", "c/d": "x"}


def test_a_pods_addresses_are_read_in_one_spelling():
    """The hub compares a request's peer with these: IPv4 mapped into IPv6 reads as IPv4."""
    pod = {"status": {"podIP": "10.244.0.7", "podIPs": [{"ip": "10.244.0.7"}, {"ip": "fd00::7"}]}}
    assert objects.pod_addresses(pod) == {"10.244.0.7", "fd00::7"}
    assert objects.pod_addresses({"status": {}}) == set()
    assert objects.pod_addresses({}) == set()
    assert objects.plain_address("::ffff:10.244.0.7") == "10.244.0.7"
    assert objects.plain_address("FD00:0::7") == "fd00::7"
    assert objects.plain_address("not an address") == "not an address"


def test_security_contexts_refuse_root():
    identity = Identity("alice", 1001, 1001)
    # Identity itself refuses 0; the builder checks again.
    object.__setattr__(identity, "uid", 0)
    with pytest.raises(InvalidInput, match="never run as root"):
        objects.security_contexts(identity)


async def test_a_record_pod_runs_as_the_user_with_the_storage_alone(make_spawner, storage):
    """The pod that completes a killed session's record: valid, restricted, the user's ids and
    storage mounts, no token, no measures, one run."""
    spawner, _ = await manifests_for(
        make_spawner,
        storage,
        interface="desktop",
        era="cycle10",
        groups=GROUPS[-1],
        storage_kind="pvc",
    )
    plan = spawner.session_plan
    pod = objects.record_pod(
        plan,
        spawner.pod_settings(),
        name="jupyter-alice-record",
        image="registry.example/casa@sha256:" + "a" * 64,
        command=["python", "-m", "casaspawner.insession.record", "stop", "/arc/home/alice/r"],
        labels={"component": "casa-record"},
    )
    validate(pod)
    assert restricted_violations(pod) == {}
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["command"][-1] == "/arc/home/alice/r"
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] > 0
    assert spec["securityContext"]["runAsUser"] == plan.identity.uid
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {plan.home, "/arc/projects/proja", "/arc/projects/projb", "/tmp"}
    assert {v["name"] for v in spec["volumes"]} == {"casa-storage", "casa-tmp"}
    assert "casa-token" not in json.dumps(pod)
    assert [e["name"] for e in container["env"]] == ["HOME"]

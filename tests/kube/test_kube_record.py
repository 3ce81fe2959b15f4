"""CASASpawner hands each session its reproducibility record, and notes the image's digest.

The pod cannot be given the digest before it runs, so the record names the image reference and
the hub puts the digest from the pod's status beside the session's summary, where the session
reads it with its own token. What the session writes, and how it asks, is checked in
tests/session/test_session_record.py.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest
from support.datasets import dataset_in

from casaspawner.runtime import record_from_text
from casaspawner.spawners.errors import SpawnException

DIGEST = "0123456789abcdef" * 4


def pod_env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


async def test_the_pod_carries_the_record_and_its_directory(make_spawner, storage):
    typed = dataset_in(storage, "alice", "cycle10")
    spawner = make_spawner()
    await spawner._run_apply_user_options({"dataset": typed, "interface": "desktop"})
    pod = await spawner.session_manifests()
    env = pod_env(pod)
    directory = env["CASASPAWNER_RECORD_DIR"]
    assert directory.startswith("/arc/home/alice/.casaspawner/sessions/")
    assert directory.endswith("-member.uid___A001_X3621_X3d68")
    assert spawner.session_record_dir == directory
    record = record_from_text(env["CASASPAWNER_RECORD"])
    graph = {item["@id"]: item for item in record["@graph"]}
    action = graph["#session"]
    assert action["containerImage"] == {"@id": "#runtime"} and action["startTime"]
    image = graph["#runtime"]
    assert (
        image["@type"] == "ContainerImage"
        and image["identifier"] == pod["spec"]["containers"][0]["image"]
    )
    assert "sha256" not in image
    # Paths as the session sees them, for the session to hash.
    assert graph["#dataset"]["contentUrl"] == f"file:///arc/home/alice/{typed}/"
    assert graph["#evidence"]["contentUrl"].startswith(f"file:///arc/home/alice/{typed}/")
    assert graph["#measures"]["contentUrl"] == "file:///opt/casa/measures/"
    assert graph["#option-interface"]["value"] == "desktop"
    # The state keeps it across hub restarts.
    assert spawner.get_state()["casa_record_dir"] == directory
    # The session's token may read its own server's model, where the hub notes the digest.
    assert spawner.server_token_scopes == [
        "users:activity!user",
        "access:servers!server",
        "read:servers!server",
    ]


async def test_records_can_be_turned_off_and_their_directory_stays_in_the_home(
    make_spawner, storage
):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    off = make_spawner(session_records=False)
    await off._run_apply_user_options(dataset)
    pod = await off.session_manifests()
    assert not {"CASASPAWNER_RECORD", "CASASPAWNER_RECORD_DIR"} & set(pod_env(pod))

    elsewhere = make_spawner(session_records_dir="../bob")
    with pytest.raises(SpawnException) as info:
        await elsewhere._run_apply_user_options(dataset)
    assert info.value.status_code == 500 and info.value.jupyterhub_message == (
        "The hub's configuration is invalid: CASASpawner.session_records_dir is '../bob', "
        "not a directory inside the home."
    )

    other = make_spawner(session_records_dir="records")
    await other._run_apply_user_options(dataset)
    pod = await other.session_manifests()
    assert pod_env(pod)["CASASPAWNER_RECORD_DIR"].startswith("/arc/home/alice/records/")


class Reflector:
    def __init__(self, pods: dict) -> None:
        self.pods = pods


async def test_the_running_pods_digest_is_kept_beside_the_summary(
    make_spawner, storage, monkeypatch, caplog
):
    from casaspawner.kube.spawner import CASASpawner

    spawner = make_spawner()
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    spawner.record_session(spawner.session_plan)
    status = {
        "containerStatuses": [
            {"name": "sidecar", "imageID": "docker.io/other@sha256:" + "f" * 64},
            {"name": "notebook", "imageID": f"ghcr.io/casaspawner/casa@sha256:{DIGEST}"},
        ]
    }
    pods = {f"test/{spawner.pod_name}": {"status": status}}
    monkeypatch.setattr(CASASpawner, "pod_reflector", property(lambda self: Reflector(pods)))
    assert spawner.image_id() == f"ghcr.io/casaspawner/casa@sha256:{DIGEST}"
    with caplog.at_level("INFO"):
        spawner.record_image_digest()
    assert spawner.user_options["casaspawner"]["image_digest"] == f"sha256:{DIGEST}"
    assert f"@sha256:{DIGEST}" in caplog.text
    # A pod not (yet) in the reflector changes nothing.
    pods.clear()
    spawner.user_options["casaspawner"].pop("image_digest")
    spawner.record_image_digest()
    assert "image_digest" not in spawner.user_options["casaspawner"]
    # The hub forgets the record once the session has ended; the session completed it.
    await spawner.run_post_stop_hook()
    assert spawner.session_record_dir is None
    assert "casa_record_dir" not in spawner.get_state()


async def test_a_session_that_ran_is_relaunched_by_its_digest(make_spawner, storage, monkeypatch):
    """The running pod's digest makes the session a past one: the form offers it, the hub's state
    keeps it across a restart, and relaunching it builds a pod of that very image."""
    from casaspawner.kube.spawner import CASASpawner

    dataset = dataset_in(storage, "alice", "cycle10")
    spawner = make_spawner()
    await spawner._run_apply_user_options({"dataset": dataset, "interface": "desktop"})
    await spawner.session_manifests()
    name = PurePosixPath(spawner.session_record_dir).name
    tagged = spawner.session_plan.image
    status = {
        "containerStatuses": [
            {"name": "notebook", "imageID": f"ghcr.io/casaspawner/casa@sha256:{DIGEST}"}
        ]
    }
    pods = {f"test/{spawner.pod_name}": {"status": status}}
    monkeypatch.setattr(CASASpawner, "pod_reflector", property(lambda self: Reflector(pods)))
    spawner.record_session(spawner.session_plan)
    spawner.record_image_digest()
    (past,) = spawner.session_history
    assert (past.name, past.dataset, past.interface, past.sha256) == (
        name,
        dataset,
        "desktop",
        DIGEST,
    )

    # A hub restart: the state brings it back, and the form offers it.
    state = json.loads(json.dumps(spawner.get_state()))
    spawner.clear_state()
    fresh = make_spawner()
    fresh.load_state(state)
    assert fresh.session_history == [past]
    html = fresh.render_options_form()
    assert f'<option value="{name}">' in html and f"sha256:{DIGEST[:12]}" in html

    # The relaunch: the form's other fields do not count, the image is the digest that ran.
    await fresh._run_apply_user_options({"relaunch": name, "dataset": "elsewhere"})
    pod = await fresh.session_manifests()
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "notebook"]
    assert container["image"] == f"{tagged.rsplit(':', 1)[0]}@sha256:{DIGEST}"
    assert fresh.session_plan.options.dataset == dataset
    assert fresh.session_plan.interface == "desktop"
    # A past session the hub does not know is one sentence.
    fresh.clear_state()
    with pytest.raises(SpawnException, match="There is no past session 'gone' of yours"):
        await fresh._run_apply_user_options({"relaunch": "gone"})


async def test_measures_kept_by_version_are_mounted_recorded_and_relaunched(
    make_spawner, storage, tmp_path, monkeypatch
):
    """With ``measures_versions_hub_path`` the pod mounts the newest version by sub-path, the
    record and the summary name it, and a relaunch mounts it again, or is refused once gone."""
    from casaspawner.kube.formruns import KubeRuns
    from casaspawner.kube.spawner import CASASpawner

    root = tmp_path / "measures"
    for version in ("2026-11-01", "2026-12-01"):
        (root / version / "geodetic").mkdir(parents=True)
    dataset = dataset_in(storage, "alice", "cycle10")
    spawner = make_spawner(measures_versions_hub_path=str(root))
    await spawner._run_apply_user_options({"dataset": dataset})
    pod = await spawner.session_manifests()
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "notebook"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/opt/casa/measures"]
    assert (mount["subPath"], mount["readOnly"]) == ("2026-12-01", True)
    record = record_from_text(pod_env(pod)["CASASPAWNER_RECORD"])
    graph = {item["@id"]: item for item in record["@graph"]}
    assert graph["#measures"]["identifier"] == "2026-12-01"
    spawner.record_session(spawner.session_plan)
    assert spawner.user_options["casaspawner"]["measures"] == "2026-12-01"
    # A run from the form reads the same version, and its pods say which one.
    (storage / "home" / "alice" / dataset / "restore.py").write_text("listobs(vis='x.ms')\n")
    run, _, _ = await KubeRuns(spawner)._planned(dataset, "restore.py", "", "")
    assert run.measures_version == "2026-12-01"
    assert run.annotations["casaspawner.io/measures"] == "2026-12-01"
    assert pod["metadata"]["annotations"]["casaspawner.io/measures"] == "2026-12-01"
    status = {"containerStatuses": [{"name": "notebook", "imageID": f"casa@sha256:{DIGEST}"}]}
    pods = {f"test/{spawner.pod_name}": {"status": status}}
    monkeypatch.setattr(CASASpawner, "pod_reflector", property(lambda self: Reflector(pods)))
    spawner.record_image_digest()
    (past,) = spawner.session_history
    state = json.loads(json.dumps(spawner.get_state()))

    # A newer version arrives: new sessions read it, the relaunch reads what it read.
    (root / "2027-01-01" / "geodetic").mkdir(parents=True)
    fresh = make_spawner(measures_versions_hub_path=str(root))
    fresh.load_state(state)
    await fresh._run_apply_user_options({"relaunch": past.name})
    assert fresh.session_plan.measures_version == "2026-12-01"
    fresh.clear_state()
    await fresh._run_apply_user_options({"dataset": dataset})
    assert fresh.session_plan.measures_version == "2027-01-01"

    # The operators remove it: the relaunch is one sentence, the user's fault to choose again.
    fresh.clear_state()
    (root / "2026-12-01" / "geodetic").rmdir()
    (root / "2026-12-01").rmdir()
    with pytest.raises(SpawnException) as info:
        await fresh._run_apply_user_options({"relaunch": past.name})
    assert info.value.status_code == 400 and info.value.jupyterhub_message == (
        "The measures data that session read (2026-12-01) is no longer kept on this hub, so it "
        "cannot be relaunched exactly; start a new session instead."
    )
    # An unreadable path is the hub's fault.
    broken = make_spawner(measures_versions_hub_path=str(tmp_path / "absent"))
    with pytest.raises(SpawnException) as info:
        await broken._run_apply_user_options({"dataset": dataset})
    assert info.value.status_code == 500
    assert "CASASpawner.measures_versions_hub_path" in info.value.jupyterhub_message

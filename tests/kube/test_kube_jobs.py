"""A headless run as a Kubernetes Job (kube/jobs.py, kube/runs.py, local/run_job.py), pure.

The Job the command line submits for alice's dataset, read through a storage root as an operator
mounts Cavern: checked against the Kubernetes schema and the restricted Pod Security Standard
(both the independent checker and casaspawner's), and for what it carries. The command the pod
runs for each kind of image, how a run's end is said, and the bad input refused in one sentence.
The real Job on the real cluster is tests/k8s/test_jobs.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.datasets import dataset_in
from support.pss import restricted_violations

from casaspawner.cli import build_parser, main
from casaspawner.errors import InvalidInput
from casaspawner.kube import jobs
from casaspawner.kube.podsecurity import pod_security_violations
from casaspawner.kube.runs import (
    ROLE_RULES,
    Cluster,
    failed_condition,
    result_from_pod,
    stamp_key,
    submission,
)
from casaspawner.local.run_job import describe, image_command
from casaspawner.runtime import RUN_IMAGE_KEY_ENV, RUN_IMAGE_URL_ENV, record_from_text
from casaspawner.session.runs import CASA_RUNNER, RUN_FILE, casa_command

K8S_VERSION = kubernetes_validate.latest_version()
ALICE = ("--user", "alice", "--uid", "41001", "--gid", "41001")


def job_for(storage: Path, *extra: str, script: str = "restore.py") -> dict[str, Any]:
    """The Job ``casaspawner run --kubernetes`` would create for alice's cycle 10 dataset."""
    typed = dataset_in(storage, "alice", "cycle10")
    (storage / "home" / "alice" / typed / script).write_text("listobs(vis='x.ms')\n")
    argv = ["run", "--kubernetes", *ALICE, "--storage-path", str(storage), "--dataset", typed]
    args = build_parser().parse_args([*argv, *extra, "--", script, "--flag"])
    return asyncio.run(submission(args))


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_the_job_is_a_restricted_pod_of_alice_with_her_storage(storage: Path) -> None:
    job = job_for(storage, "--size", "small", "--deadline", "7200", "--ttl", "600")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = {"apiVersion": "v1", "kind": "Pod", **job["spec"]["template"]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert restricted_violations(pod) == {}
    assert pod_security_violations(pod, "restricted") == []

    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 7200 and spec["ttlSecondsAfterFinished"] == 600
    template = spec["template"]["spec"]
    assert template["restartPolicy"] == "Never"
    assert template["automountServiceAccountToken"] is False
    assert template["terminationGracePeriodSeconds"] > 10
    assert template["securityContext"]["runAsUser"] == 41001
    assert template["securityContext"]["runAsGroup"] == 41001
    (container,) = template["containers"]
    assert container["args"] == list(jobs.RUN_ARGS) and "command" not in container
    assert container["image"] == "ghcr.io/casaspawner/casa:6.5.4-9-pipeline-2023.1.0.124"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The session's mounts without the token: her home, scratch, /tmp, the measures read-only.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {"/arc/home/alice", "/scratch", "/tmp", "/opt/casa/measures"}
    assert mounts["/arc/home/alice"]["subPath"] == "home/alice"
    assert mounts["/opt/casa/measures"]["readOnly"] is True
    assert "casa-token" not in json.dumps(job) and "CASASPAWNER_TOKEN_FILE" not in json.dumps(job)
    assert not [v for v in template["volumes"] if "secret" in v or "projected" in v]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in template["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"cavern", "casa-measures"}
    # The small size: 2 CPU and 4 GB at most, half a core and 2 GB asked for.
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "2G"}
    assert container["resources"]["limits"]["cpu"] == "2"
    assert container["resources"]["limits"]["memory"] == "4G"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    assert len(job["metadata"]["name"]) <= 63


def test_the_job_carries_the_run_and_its_record_in_her_paths(storage: Path) -> None:
    typed = dataset_in(storage, "alice", "cycle10")
    job = job_for(storage)
    env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    run = json.loads(base64.b64decode(env[jobs.RUN_ENV]))
    dataset = f"/arc/home/alice/{typed}"
    assert run["run_dir"].startswith(f"{dataset}/casaspawner-runs/")
    assert run["run_dir"].endswith("-restore") and run["id"] == run["run_dir"].rsplit("/")[-1]
    assert env["CASASPAWNER_RECORD_DIR"] == run["run_dir"] and env["HOME"] == "/arc/home/alice"
    assert run["script"] == f"{dataset}/restore.py" and run["arguments"] == ["--flag"]
    assert run["cwd"] == run["run_dir"]
    # The default size on Kubernetes is a session's: medium, 4 cores.
    assert run["processes"] == 4 and run["environment"]["OMP_NUM_THREADS"] == "4"
    assert run["environment"]["CASASPAWNER_DATASET"] == dataset
    assert run["environment"]["CASASPAWNER_CASA_LOGFILE"].startswith(f"{run['run_dir']}/casa-")
    record = record_from_text(env["CASASPAWNER_RECORD"])
    graph = {item["@id"]: item for item in record["@graph"]}
    script = storage / "home" / "alice" / typed / "restore.py"
    assert graph["#script"]["sha256"] == hashlib.sha256(script.read_bytes()).hexdigest()
    assert graph["#script"]["contentUrl"] == f"file://{dataset}/restore.py"
    assert graph["#dataset"]["contentUrl"] == f"file://{dataset}/"
    assert (
        graph["#runtime"]["identifier"]
        == job["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    annotations = job["metadata"]["annotations"]
    assert annotations["casaspawner.io/run-dir"] == run["run_dir"]
    assert (
        annotations["casaspawner.io/run-storage-path"]
        == f"home/alice/{typed}/casaspawner-runs/{run['id']}"
    )


def test_a_script_for_pi_runs_from_its_own_directory(storage: Path) -> None:
    typed = dataset_in(storage, "alice", "cycle7")
    script_dir = storage / "home" / "alice" / typed / "script"
    script_dir.mkdir(exist_ok=True)
    (script_dir / "member.uid___A001_X1.scriptForPI.py").write_text("print(1)\n")
    argv = ["run", "--kubernetes", *ALICE, "--storage-path", str(storage), "--dataset", typed]
    args = build_parser().parse_args([*argv, "--", "member.uid___A001_X1.scriptForPI.py"])
    job = asyncio.run(submission(args))
    run = json.loads(
        base64.b64decode(env_of(job["spec"]["template"]["spec"]["containers"][0])[jobs.RUN_ENV])
    )
    assert run["cwd"] == f"/arc/home/alice/{typed}/script"


def test_the_pod_runs_mpicasa_when_the_image_has_it(tmp_path: Path) -> None:
    """A monolithic image with mpicasa: ``mpicasa -n N casa …``, one OMP thread each."""
    home = tmp_path / "casa"
    (home / "bin").mkdir(parents=True)
    for name in ("casa", "mpicasa"):
        (home / "bin" / name).write_text("#!/bin/sh\n")
        (home / "bin" / name).chmod(0o755)
    spec = {
        "id": "r",
        "run_dir": "/arc/home/alice/d/casaspawner-runs/r",
        "script": "/arc/home/alice/d/restore.py",
        "arguments": ["a"],
        "cwd": "/arc/home/alice/d/casaspawner-runs/r",
        "casa_log": "casa-x.log",
        "environment": {"OMP_NUM_THREADS": "4"},
        "pipeline": True,
        "processes": 4,
    }
    environ = {"CASASPAWNER_CASA_HOME": str(home), "PATH": "/nonexistent"}
    command, how = image_command(spec, environ)
    assert command[:3] == [str(home / "bin" / "mpicasa"), "-n", "4"]
    assert command[3:] == [
        str(home / "bin" / "casa"),
        "--nologger",
        "--nogui",
        "--logfile",
        "/arc/home/alice/d/casaspawner-runs/r/casa-x.log",
        "--pipeline",
        "-c",
        "/arc/home/alice/d/restore.py",
        "a",
    ]
    assert how == "mpicasa -n 4"
    assert describe(spec, environ)["environment"]["OMP_NUM_THREADS"] == "1"
    # Without mpicasa, or on one core: casa alone.
    (home / "bin" / "mpicasa").unlink()
    command, how = image_command(spec, environ)
    assert command[0] == str(home / "bin" / "casa") and "no mpicasa for 4 cores" in how
    assert describe(spec, environ)["environment"]["OMP_NUM_THREADS"] == "4"


def test_a_modular_image_runs_the_script_with_casa_run() -> None:
    spec = {"run_dir": "/r", "script": "/s.py", "casa_log": "c.log", "processes": 1}
    environ = {"CASASPAWNER_CASA_HOME": "/nonexistent", "CASASPAWNER_CASA_PYTHON": "/p/python"}
    command, how = image_command(spec, environ)
    assert command == ["/p/python", "-s", str(CASA_RUNNER), "/s.py"] and how == "one process"
    assert casa_command("/s.py", [], "l", casa=None, python="/p", pipeline=False, processes=8) == [
        "/p",
        "-s",
        str(CASA_RUNNER),
        "/s.py",
    ]


class Condition:
    def __init__(self, reason: str) -> None:
        self.type, self.status, self.reason, self.message = "Failed", "True", reason, "m"


class Status:
    def __init__(self, *conditions: Condition) -> None:
        self.conditions = list(conditions)


class Spec:
    active_deadline_seconds = 20


class Job:
    def __init__(self, *conditions: Condition) -> None:
        self.status = Status(*conditions)
        self.spec = Spec()


def test_how_a_run_ends_from_its_pod_when_its_file_is_out_of_reach() -> None:
    assert result_from_pod({"exit_code": 0})["status"] == "finished"
    failed = result_from_pod({"exit_code": 1, "message": "failed: the script raised E: x"})
    assert failed == {"status": "failed", "exit_code": 1, "error": "the script raised E: x"}
    assert result_from_pod({"exit_code": 130})["status"] == "stopped"
    lost = result_from_pod({"exit_code": None, "gone": "its Job was deleted"})
    assert lost["status"] == "lost" and "its Job was deleted" in lost["why"]
    assert result_from_pod({"exit_code": 137})["status"] == "lost"
    never = result_from_pod({"exit_code": None, "never": "ErrImagePull: nope"})
    assert never["status"] == "failed" and "ErrImagePull" in never["error"]
    assert failed_condition(Job()) is None
    deadline = failed_condition(Job(Condition("DeadlineExceeded")))
    assert deadline == "it ran past its time limit of 20 s"


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--uid", "0"], "never run as root"),
        (["--gid", "0"], "gid 0 (the root group)"),
        (["--supplemental-gid", "0"], "gid 0 (the root group)"),
        (["--size", "machine"], "is not a session size"),
        (["--deadline", "0"], "--deadline must be above 0"),
        (["--approximate"], "--approximate is for runs on this machine"),
        (["--dataset", "/arc/home/bob/data"], "outside your storage"),
        (["--dataset", "nothing-here"], "nothing-here"),
        (["--release", "casa-0.0"], "is not a release in the catalog"),
        (["--sizes", "/nonexistent/sizes.yaml"], "cannot be read: No such file or directory."),
    ],
)
def test_bad_input_is_one_sentence_and_status_2(
    storage: Path, capsys: pytest.CaptureFixture[str], extra: list[str], said: str
) -> None:
    typed = dataset_in(storage, "alice", "cycle10")
    argv = ["run", "--kubernetes", *ALICE, "--storage-path", str(storage), "--dataset", typed]
    assert main([*argv, *extra, "--", "restore.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err


def test_without_storage_or_a_script_there_it_says_so(
    storage: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    typed = dataset_in(storage, "alice", "cycle10")
    assert main(["run", "--kubernetes", *ALICE, "--dataset", typed, "--", "x.py"]) == 2
    assert "--storage-path" in capsys.readouterr().err
    # A script only on this machine is not in her storage.
    local = tmp_path / "mine.py"
    local.write_text("print(1)\n")
    argv = ["run", "--kubernetes", *ALICE, "--storage-path", str(storage), "--dataset", typed]
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--", "mine.py"]) == 2
    assert "There is no script mine.py in the user's storage" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_the_hub_never_follows_her_links_to_the_script(
    storage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A script that is a link, even into her own storage, or a FIFO, is not read here."""
    typed = dataset_in(storage, "alice", "cycle10")
    dataset = storage / "home" / "alice" / typed
    (dataset / "real.py").write_text("print(1)\n")
    (dataset / "linked.py").symlink_to("real.py")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "secret.py").write_text("the operator's\n")
    (storage / "home" / "alice" / "elsewhere").symlink_to(outside)
    os.mkfifo(dataset / "pipe.py")
    argv = ["run", "--kubernetes", *ALICE, "--storage-path", str(storage), "--dataset", typed]
    for script in ("linked.py", "pipe.py", f"~/{typed}/pipe.py", "~/elsewhere/secret.py"):
        assert main([*argv, "--", script]) == 2, script
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "There is no script" in err, err
    # The file itself, by name or by path, is hashed.
    args = build_parser().parse_args([*argv, "--", f"/arc/home/alice/{typed}/real.py"])
    record = env_of(asyncio.run(submission(args))["spec"]["template"]["spec"]["containers"][0])
    graph = {i["@id"]: i for i in record_from_text(record["CASASPAWNER_RECORD"])["@graph"]}
    assert graph["#script"]["sha256"] == hashlib.sha256(b"print(1)\n").hexdigest()


@pytest.mark.timeout(30)
def test_the_run_file_is_read_without_following_her_links(storage: Path, tmp_path: Path) -> None:
    """A run file swapped for a link or a FIFO: the pod's end is said, never a file elsewhere."""
    run_dir = storage / "home" / "alice" / "runs-here" / "r1"
    run_dir.mkdir(parents=True)
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({"result": {"status": "finished", "exit_code": 0}}))
    annotations = {"casaspawner.io/run-storage-path": "home/alice/runs-here/r1"}
    cluster: Any = types.SimpleNamespace(storage=storage)
    failed = {"exit_code": 1, "message": "failed: the script raised E: x"}
    (run_dir / RUN_FILE).symlink_to(forged)
    assert Cluster.ending(cluster, "j", "r1", "", failed, annotations) == 1
    (run_dir / RUN_FILE).unlink()
    os.mkfifo(run_dir / RUN_FILE)
    assert Cluster.ending(cluster, "j", "r1", "", failed, annotations) == 1
    (run_dir / RUN_FILE).unlink()
    (run_dir / RUN_FILE).write_text(forged.read_text())
    assert Cluster.ending(cluster, "j", "r1", "", failed, annotations) == 0


def test_the_role_in_the_docs_is_what_the_command_needs() -> None:
    """docs/headless.md's Role is ``ROLE_RULES``, which the k8s tier runs the command with."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "headless.md").read_text()
    block = text.split("kind: Role\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block)["rules"] == ROLE_RULES


@pytest.mark.parametrize(
    "command",
    [("lost", "its node was lost"), ("digest", "d" * 64)],
    ids=["lost", "digest"],
)
def test_a_run_record_is_completed_by_a_small_job_of_the_same_pod(
    storage: Path, command: tuple[str, str]
) -> None:
    """The run's Job as the API returns it (with the labels Kubernetes adds) → a record Job."""
    job = job_for(storage)
    template = job["spec"]["template"]
    template["metadata"]["labels"].update(
        {"batch.kubernetes.io/controller-uid": "u", "batch.kubernetes.io/job-name": "x"}
    )
    # A hub's run also carries where its pod asks for its digest, and the key.
    template["spec"]["containers"][0]["env"] += [
        {"name": RUN_IMAGE_URL_ENV, "value": "http://hub:8081/hub/api/casa-runs/alice/x/image"},
        {"name": RUN_IMAGE_KEY_ENV, "value": "key"},
    ]
    name = jobs.record_job_name(job["metadata"]["name"], command[0])
    assert len(name) <= 63 and name.startswith("casa-run-alice-")
    # Runs whose long names share their first 53 characters get Jobs of their own.
    long = "casa-run-" + "a" * 44 + "-20261206t0215"
    assert jobs.record_job_name(long + "1", "lost") != jobs.record_job_name(long + "2", "lost")
    completing = jobs.record_job(job, name=name, command=command)
    kubernetes_validate.validate(completing, K8S_VERSION, strict=True)
    pod = {"apiVersion": "v1", "kind": "Pod", **completing["spec"]["template"]}
    assert restricted_violations(pod) == {}
    labels = completing["spec"]["template"]["metadata"]["labels"]
    assert "batch.kubernetes.io/controller-uid" not in labels
    (container,) = completing["spec"]["template"]["spec"]["containers"]
    run_dir = env_of(template["spec"]["containers"][0])["CASASPAWNER_RECORD_DIR"]
    assert container["args"] == [*jobs.RUN_ARGS, command[0], run_dir, command[1]]
    dropped = {jobs.RUN_ENV, "CASASPAWNER_RECORD", RUN_IMAGE_URL_ENV, RUN_IMAGE_KEY_ENV}
    assert dropped.isdisjoint(env_of(container))
    assert completing["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 41001
    spec = completing["spec"]
    assert spec["activeDeadlineSeconds"] <= 120 and spec["backoffLimit"] == 0


def test_log_times_order_as_text_whatever_their_fraction() -> None:
    """Kubernetes trims a log time's trailing zeros: ``.5Z`` is after ``.25Z``."""
    assert stamp_key(b"2026-12-06T08:30:28.5Z") > stamp_key(b"2026-12-06T08:30:28.25Z")
    assert stamp_key(b"2026-12-06T08:30:28Z") < stamp_key(b"2026-12-06T08:30:28.000000001Z")
    assert stamp_key(b"2026-12-06T08:30:29Z") > stamp_key(b"2026-12-06T08:30:28.999Z")


def test_the_hubs_sizes_size_the_run(storage: Path, tmp_path: Path) -> None:
    """``--sizes`` takes the mapping the hub's ``CASASpawner.session_sizes`` has."""
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text(
        "xl:\n  cpu_guarantee: 4\n  cpu_limit: 8\n  mem_guarantee: 32G\n  mem_limit: 64G\n"
    )
    job = job_for(storage, "--sizes", str(sizes), "--size", "xl")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "32G"}
    assert container["resources"]["limits"]["cpu"] == "8"
    assert container["resources"]["limits"]["memory"] == "64G"
    spec = json.loads(base64.b64decode(env_of(container)[jobs.RUN_ENV]))
    assert spec["processes"] == 8
    # Its one size is the default; the built-in ones are not sizes there.
    default = job_for(storage, "--sizes", str(sizes))["spec"]["template"]["spec"]["containers"]
    assert default[0]["resources"] == container["resources"]
    with pytest.raises(InvalidInput, match=r"^'small' is not a session size; choose one of xl\.$"):
        job_for(storage, "--sizes", str(sizes), "--size", "small")
    sizes.write_text("xl:\n  cpu_guarantee: 9\n  cpu_limit: 8\n")
    with pytest.raises(InvalidInput, match=r"guarantees more CPU than its cpu_limit\.$"):
        job_for(storage, "--sizes", str(sizes), "--size", "xl")


def test_a_run_reads_the_newest_measures_kept_by_version(storage: Path, tmp_path: Path) -> None:
    """``--measures-path`` is the hub's ``measures_versions_hub_path``: the newest version is
    mounted by sub-path, and the run's record names it."""
    for version in ("2026-11-01", "2026-12-01", ".2027-01-01"):
        (tmp_path / version / "geodetic").mkdir(parents=True)
    job = job_for(storage, "--measures-path", str(tmp_path))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/opt/casa/measures"]
    assert (mount["subPath"], mount["readOnly"]) == ("2026-12-01", True)
    record = record_from_text(env_of(container)["CASASPAWNER_RECORD"])
    graph = {e["@id"]: e for e in record["@graph"]}
    assert graph["#measures"]["identifier"] == "2026-12-01"
    with pytest.raises(InvalidInput, match="^--measures-path .* holds no measures version"):
        job_for(storage, "--measures-path", str(tmp_path / "2026-12-01"))
    # Without it, the volume is one tree, mounted whole.
    (plain,) = job_for(storage)["spec"]["template"]["spec"]["containers"]
    (whole,) = [m for m in plain["volumeMounts"] if m["mountPath"] == "/opt/casa/measures"]
    assert "subPath" not in whole

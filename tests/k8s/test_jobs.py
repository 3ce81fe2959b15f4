"""``casaspawner run --kubernetes``: a real CASA script as a Job on the real cluster, as alice.

The command runs as an operator would run it (as a ServiceAccount holding only the Role
docs/headless.md gives it, Cavern mounted here), in a namespace enforcing the restricted Pod
Security level, with the CASA image the images tier builds, imported into containerd. Cavern and
the measures are ``hostPath`` PersistentVolumes on this machine, bound to the claims a session
mounts. A restore-like split and listobs of a small simulated MeasurementSet finishes, and its
outputs, CASA log and completed record land in alice's Cavern directory, owned by her; a failing
script, a stopped run, a lost one (its processes killed, as when its node goes) and one past its
deadline each end with their sentence and exit status. The spawn form's runs are the same Jobs,
created by the hub as a ServiceAccount holding Zero to JupyterHub's hub Role and
``hub-config/z2jh/casa-runs-rbac.yaml``, for the logged-in user alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_hub import (
    ALICE,
    RELEASE,
    HubAccount,
    User,
    acting_as,
    alice,
    bind_storage,
    create_hub_account,
    delete_volumes,
)
from kubernetes_asyncio import client

from casaspawner.catalog import load_catalog
from casaspawner.datasets.synth import SIMULATE_MS, DatasetSpec, write_dataset
from casaspawner.errors import CasaspawnerError, InvalidInput
from casaspawner.kube.formruns import FORM_RUN_RULES, KubeRuns
from casaspawner.kube.jobs import job_name
from casaspawner.kube.runs import ROLE_RULES
from casaspawner.plan import PlanConfig, image_for
from casaspawner.runtime import RECORD_FILE
from casaspawner.session.runs import RUN_FILE, RUNS_DIR
from cluster import REPO, Cluster

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(600)]

REGISTRY = "localhost/casaspawner"
PROJECT = "2023.1.01234.S"
MS = "uid___A002_X10d5a8a_X3c21.ms"
#: The restore-like script: the demo MeasurementSet (simulated in the Job the first time, as
#: ``make demo`` simulates it), split and listed.
RESTORE = f"""\
import glob, os, runpy, sys
dataset = os.environ["CASASPAWNER_DATASET"]
member = glob.glob(os.path.join(dataset, "**", "member.*"), recursive=True)[0]
ms = os.path.join(member, "calibrated", "{MS}")
if not os.path.isdir(ms):
    os.makedirs(os.path.dirname(ms), exist_ok=True)
    sys.argv = ["simulate_ms.py", ms]
    runpy.run_path(os.path.join(dataset, "simulate_ms.py"), run_name="__main__")
split(vis=ms, outputvis="restored.ms", datacolumn="data", spw="0")
listobs(vis="restored.ms", listfile="listobs.txt")
print("display", os.environ.get("DISPLAY"))
print("uid", os.getuid(), "threads", os.environ["OMP_NUM_THREADS"])
"""
FAILING = 'raise RuntimeError("no calibrated data here")\n'
SLEEP = 'import time\nprint("sleeping", flush=True)\ntime.sleep(600)\n'


@dataclass
class Site:
    namespace: str
    cavern: Path
    volumes: list[str]
    #: A ServiceAccount's kubeconfig holding exactly the Role docs/headless.md gives the command.
    kubeconfig: Path

    @property
    def dataset(self) -> Path:
        return self.cavern / "home" / "alice" / PROJECT


def run_async(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _admin(cluster: Cluster, work: Any) -> Any:
    async with await cluster.api_client() as api:
        return await work(api)


def admin(cluster: Cluster, work: Any) -> Any:
    """Run ``work(api)`` with a fresh admin client."""
    return run_async(_admin(cluster, work))


@pytest.fixture(scope="module")
def casa_image(cluster: Cluster) -> str:
    """The CASA image of ``RELEASE`` the images tier builds, put into the cluster's containerd."""
    image = image_for(load_catalog().get(RELEASE), PlanConfig(image_registry=REGISTRY))
    if not cluster.own:
        pytest.skip("the Job test imports its image into the repository's own cluster")
    found = subprocess.run(["podman", "image", "exists", image], check=False)
    assert found.returncode == 0, f"{image} is not built: `make k8s-images` builds it"
    cluster.import_image(image)
    return image


def write_home(root: Path) -> None:
    """alice's Cavern home: a dataset whose manifest names ``RELEASE``'s CASA, and the scripts."""
    home = root / "home" / "alice"
    casa = load_catalog().get(RELEASE).casa
    spec = DatasetSpec(
        project=PROJECT,
        mous="uid___A001_X3621_X4d1b",
        casa=casa.replace("-", "."),
        pipeline=None,
        evidence=("manifest",),
        eb="uid___A002_X10d5a8a_X3c21",
    )
    write_dataset(home / PROJECT, spec=spec)
    for name, text in (
        ("simulate_ms.py", SIMULATE_MS),
        ("restore.py", RESTORE),
        ("failing.py", FAILING),
        ("sleep.py", SLEEP),
    ):
        (home / PROJECT / name).write_text(text)
    for path in (home, *home.rglob("*")):
        os.chown(path, ALICE["uid"], ALICE["gid"], follow_symlinks=False)
    home.chmod(0o700)
    root.chmod(0o755)


@pytest.fixture(scope="module")
def site(cluster: Cluster, measures: Path, casa_image: str) -> Iterator[Site]:
    cavern = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-jobs-"))
    work = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-jobs-account-"))
    write_home(cavern)

    async def setup(api: Any) -> Site:
        namespace = await cluster.create_namespace(api, "casaspawner-jobs")
        volumes = await bind_storage(api, namespace, cavern, measures)
        account = await create_hub_account(
            api, namespace, cluster.kubeconfig, work, rules=ROLE_RULES, name="casa-run"
        )
        return Site(namespace, cavern, volumes, account.kubeconfig)

    made = admin(cluster, setup)
    try:
        yield made
    finally:

        async def teardown(api: Any) -> None:
            await delete_volumes(api, made.volumes)
            await client.CoreV1Api(api).delete_namespace(made.namespace)

        admin(cluster, teardown)
        shutil.rmtree(cavern, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def command(cluster: Cluster, site: Site, *args: str) -> list[str]:
    """``casaspawner run --kubernetes`` as the operator's account, for alice."""
    return [
        sys.executable,
        "-m",
        "casaspawner",
        "run",
        "--kubernetes",
        "--kubeconfig",
        str(site.kubeconfig),
        "--namespace",
        site.namespace,
        "--storage-path",
        str(site.cavern),
        "--user",
        "alice",
        "--uid",
        str(ALICE["uid"]),
        "--gid",
        str(ALICE["gid"]),
        "--image-registry",
        REGISTRY,
        *args,
    ]


def run(cluster: Cluster, site: Site, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(cluster, site, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def one_sentence(stderr: str) -> str:
    """The command's last word: one line, no traceback."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def job_of(stderr: str) -> str:
    """The Job's name, from the command's first line (``casaspawner: Job NAME in …``)."""
    first = next(line for line in stderr.splitlines() if line.startswith("casaspawner: Job "))
    return first.split()[2]


def run_dir_of(site: Site, stderr: str) -> Path:
    """The run's directory here, from the path the last sentence names (in the pod)."""
    runs = site.dataset / RUNS_DIR
    found = [
        path
        for path in runs.iterdir()
        if re.search(rf"/{RUNS_DIR}/{re.escape(path.name)}(?![\w-])", stderr)
    ]
    assert len(found) == 1, (stderr, list(runs.iterdir()))
    return found[0]


def kill_pod_processes(pod: str) -> int:
    """SIGKILL every process of the run's container in ``pod`` (the node is this machine)."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HOSTNAME={pod}".encode() in environ and any(
            v.startswith(b"CASASPAWNER_RUN=") for v in environ
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
    return killed


def entities(run_dir: Path) -> dict[str, dict[str, Any]]:
    record = json.loads((run_dir / RECORD_FILE).read_text())
    return {item["@id"]: item for item in record["@graph"]}


def test_a_restore_and_a_failing_script_run_as_jobs_as_alice(
    cluster: Cluster, site: Site, casa_image: str
) -> None:
    started = time.monotonic()
    restore = run(
        cluster, site, "--size", "small", "--dataset", f"~/{PROJECT}", "--", "restore.py"
    )
    failing = run(
        cluster, site, "--size", "small", "--dataset", f"~/{PROJECT}", "--", "failing.py"
    )
    out, err = restore.communicate(timeout=400)
    fail_out, fail_err = failing.communicate(timeout=200)
    took = time.monotonic() - started

    # The restore: the output streamed, one sentence, status 0.
    assert restore.returncode == 0, (out, err)
    sentence = one_sentence(err)
    assert sentence.startswith("casaspawner: run ") and " finished; " in sentence, sentence
    assert f"/arc/home/alice/{PROJECT}/{RUNS_DIR}/" in sentence, sentence
    # The supervisor names the image's CASA: the release the dataset's manifest asked for.
    assert f"casaspawner: {load_catalog().get(RELEASE).label} runs restore.py" in out, out
    assert f"uid {ALICE['uid']} threads 2" in out, out
    # The image has TigerVNC's Xtigervnc, so the script had a display of its own.
    assert "display :" in out, out
    run_dir = run_dir_of(site, sentence)
    assert run_dir.stat().st_uid == ALICE["uid"]
    names = {path.name for path in run_dir.iterdir()}
    assert {"output.log", RECORD_FILE, RUN_FILE, "listobs.txt", "restored.ms"} <= names, names
    (casa_log,) = run_dir.glob("casa-*.log")
    assert "split" in casa_log.read_text() and "listobs" in casa_log.read_text()
    assert "DemoQuasar" in (run_dir / "listobs.txt").read_text()
    assert "uid 41001" in (run_dir / "output.log").read_text()
    ran = json.loads((run_dir / RUN_FILE).read_text())
    assert ran["result"]["status"] == "finished"
    # A modular image has no mpicasa: one process, OMP threads from the size.
    assert ran["parallel"] == "one process: this image has no mpicasa for 2 cores", ran
    assert ran["command"][:2] == [f"/opt/casa/{RELEASE.removeprefix('casa-')}/bin/python", "-s"]
    graph = entities(run_dir)
    action = graph["#session"]
    assert action["actionStatus"]["@id"].endswith("CompletedActionStatus") and action["endTime"]
    assert {"@id": "restored.ms/"} in action["result"]
    assert graph["#script"]["name"] == "restore.py" and len(graph["#script"]["sha256"]) == 64
    assert graph["#runtime"]["identifier"] == casa_image
    # No hub gave the pod its digest: the command put the kubelet's on the record after the run.
    name = job_of(err)
    pods = admin(
        cluster,
        lambda api: client.CoreV1Api(api).list_namespaced_pod(
            site.namespace, label_selector=f"batch.kubernetes.io/job-name={name}"
        ),
    )
    (ran_by,) = [s for p in pods.items for s in p.status.container_statuses]
    assert graph["#runtime"]["sha256"] == ran_by.image_id.rsplit("sha256:", 1)[1], graph
    assert graph["#evidence"].get("sha256"), graph["#evidence"]
    assert graph["#measures"]["version"]

    # The failing script: its output, one sentence naming the exception, status 1.
    assert failing.returncode == 1, (fail_out, fail_err)
    sentence = one_sentence(fail_err)
    assert " failed: the script raised RuntimeError: no calibrated data here;" in sentence
    assert "RuntimeError: no calibrated data here" in fail_out, fail_out
    failed = entities(run_dir_of(site, sentence))["#session"]
    assert failed["actionStatus"]["@id"].endswith("FailedActionStatus"), failed
    print(f"[k8s] restore and failing Jobs: {took:.0f} s")


def test_a_stopped_run_a_lost_one_and_one_past_its_deadline(cluster: Cluster, site: Site) -> None:
    args = ("--size", "small", "--dataset", f"~/{PROJECT}", "--", "sleep.py")
    # One started with --detach and followed with --follow, as after a closed terminal.
    detached = subprocess.run(
        command(cluster, site, "--detach", *args), capture_output=True, text=True, timeout=60
    )
    assert detached.returncode == 0, detached.stderr
    stopped = run(cluster, site, "--follow", detached.stdout.strip())
    lost = run(cluster, site, *args)
    late = run(cluster, site, "--deadline", "25", *args)
    assert lost.stderr is not None
    names = {stopped: detached.stdout.strip(), lost: job_of(lost.stderr.readline())}
    for process in (stopped, lost):
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        while "sleeping" not in process.stdout.readline():
            assert time.monotonic() < deadline, "the script never started"

    stop = subprocess.run(
        [*command(cluster, site), "--stop", names[stopped]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stderr
    assert one_sentence(stop.stderr).endswith(" ended: stopped."), stop.stderr

    # The lost one's processes are killed at once, as when its node goes: no result.
    async def pod_name(api: Any) -> str:
        pods = await client.CoreV1Api(api).list_namespaced_pod(
            site.namespace, label_selector=f"batch.kubernetes.io/job-name={names[lost]}"
        )
        return str(pods.items[0].metadata.name)

    assert kill_pod_processes(admin(cluster, pod_name)) > 0
    _, stop_err = stopped.communicate(timeout=120)
    _, lost_err = lost.communicate(timeout=120)
    assert stopped.returncode == 130, stop_err
    assert " was stopped; " in one_sentence(stop_err), stop_err
    assert lost.returncode == 3, lost_err
    _, late_err = late.communicate(timeout=120)
    assert late.returncode == 130, late_err
    sentence = one_sentence(late_err)
    assert " was stopped: it ran past its time limit of 25 s; " in sentence, sentence
    sentence = one_sentence(lost_err)
    assert " was lost: its pod ended without a result (exit status 137" in sentence, sentence
    # A pod of the run recorded it as lost, as the user: the record failed, with its end.
    lost_dir = run_dir_of(site, sentence)
    assert json.loads((lost_dir / RUN_FILE).read_text())["result"]["status"] == "lost"
    action = entities(lost_dir)["#session"]
    assert action["actionStatus"]["@id"].endswith("FailedActionStatus") and action["endTime"]
    assert "exit status 137" in action["error"], action


# Runs from the spawn form: Jobs the hub creates as its own ServiceAccount
#: What an operator applies beside Zero to JupyterHub's hub Role (docs/headless-form.md).
RUNS_RBAC = REPO / "hub-config" / "z2jh" / "casa-runs-rbac.yaml"
USER_NODES = {
    "key": "hub.jupyter.org/dedicated",
    "operator": "Equal",
    "value": "user",
    "effect": "NoSchedule",
}
BOB = User("bob", {"oauth_user": {**ALICE, "preferred_username": "bob", "uid": 41002}})


async def hub_accounts(
    api: Any, cluster: Cluster, site: Site, work: Path
) -> tuple[HubAccount, HubAccount]:
    """Two hub accounts: Zero to JupyterHub's Role alone, and with casa-runs-rbac.yaml applied.

    The file's RoleBinding names the chart's ServiceAccount, ``hub``.
    """
    namespace = site.namespace
    plain = await create_hub_account(api, namespace, cluster.kubeconfig, work, name="plain-hub")
    hub = await create_hub_account(api, namespace, cluster.kubeconfig, work)
    rbac = client.RbacAuthorizationV1Api(api)
    role, binding = yaml.safe_load_all(RUNS_RBAC.read_text())
    assert role["rules"] == FORM_RUN_RULES
    await rbac.create_namespaced_role(namespace, role)
    await rbac.create_namespaced_role_binding(namespace, binding)
    return plain, hub


def form_runs(account: HubAccount, site: Site, user: Any) -> KubeRuns:
    """The run pages' backend for ``user``, whose CASASpawner acts as the hub's ``account``."""
    from casaspawner.hubconfig import CLAIMS
    from casaspawner.kube.spawner import CASASpawner

    with acting_as(account):
        spawner = CASASpawner(
            _mock=True,
            user=user,
            **CLAIMS,
            namespace=site.namespace,
            storage_hub_path=str(site.cavern),
            project_group_pattern="proj-.*",
            image_registry=REGISTRY,
            # What an operator sets for session pods (Zero to JupyterHub's userPods, say).
            extra_labels={"hub.jupyter.org/network-access-hub": "true"},
            node_selector={"kubernetes.io/os": "linux"},
            tolerations=[USER_NODES],
        )
    return KubeRuns(spawner)


async def until_ended(runs: KubeRuns, run_id: str, timeout: float) -> dict[str, Any]:
    """The run's page once it says the run ended."""
    deadline = time.monotonic() + timeout
    while (shown := await runs.show(run_id))["status"] == "running":
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(2)
    return shown


def test_runs_from_the_form_are_jobs_the_hub_creates_for_alice_alone(
    cluster: Cluster, site: Site, casa_image: str
) -> None:
    work = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-form-runs-"))
    try:
        plain, hub = admin(cluster, lambda api: hub_accounts(api, cluster, site, work))
        # KubeSpawner shares one API client per event loop: one loop per hub account.
        run_async(refused_without_the_runs_role(plain, site))
        run_async(form_runs_as_alice(cluster, hub, site, casa_image))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def refused_without_the_runs_role(plain: HubAccount, site: Site) -> None:
    """With Zero to JupyterHub's Role alone, the pages say what the hub may not do."""
    refused = form_runs(plain, site, alice("token"))
    with pytest.raises(CasaspawnerError, match=r"^Kubernetes refused to list your runs' Jobs "):
        await refused.runs()
    with pytest.raises(CasaspawnerError, match=r"^Kubernetes refused to list .* forbidden"):
        await refused.start(f"~/{PROJECT}", "restore.py", "small", "")


async def form_runs_as_alice(
    cluster: Cluster, hub: HubAccount, site: Site, casa_image: str
) -> None:
    dataset, home = f"~/{PROJECT}", f"/arc/home/alice/{PROJECT}"
    runs = form_runs(hub, site, alice("token"))
    found = await runs.preview(dataset, "restore.py", "small", "")
    assert found["release"] == RELEASE and found["exact"], found
    assert found["script"] == f"{home}/restore.py" and found["runs_dir"] == f"{home}/{RUNS_DIR}"
    restore = await runs.start(dataset, "restore.py", "small", "")
    with pytest.raises(InvalidInput, match=r"^restore.py is already running on this dataset"):
        await runs.start(dataset, "restore.py", "small", "")
    sleeper = await runs.start(dataset, "sleep.py", "small", "")
    assert {r["id"] for r in await runs.runs()} >= {restore, sleeper}

    # The Job: the restricted profile's pod of alice, in the image ALMA's rule picked.
    async with await cluster.api_client() as api:
        job = await client.BatchV1Api(api).read_namespaced_job(
            job_name("alice", restore), site.namespace
        )
    pod = job.spec.template.spec
    assert pod.security_context.run_as_user == ALICE["uid"]
    assert pod.containers[0].image == casa_image and not pod.automount_service_account_token
    # Held to what a session may reach and where it may run: its labels (which Zero to
    # JupyterHub's NetworkPolicy for user pods selects on) and its scheduling.
    labels = job.spec.template.metadata.labels
    assert labels["component"] == "singleuser-server", labels
    assert labels["hub.jupyter.org/username"] == "alice", labels
    assert labels["hub.jupyter.org/network-access-hub"] == "true", labels
    assert pod.node_selector == {"kubernetes.io/os": "linux"}
    assert [api.sanitize_for_serialization(t) for t in pod.tolerations] == [USER_NODES]

    ended = await until_ended(runs, restore, 400)
    assert ended["status"] == "finished", ended
    assert ended["sentence"].startswith(f"Run {restore} finished; ") and home in ended["sentence"]
    assert "uid 41001" in ended["output"], ended["output"]
    assert {"listobs.txt", "restored.ms/", RECORD_FILE, RUN_FILE} <= set(ended["files"])
    assert ended["casa_log"].startswith("casa-") and ended["label"], ended

    # Stop: the pod gets SIGTERM, and the run records that it was stopped.
    deadline = time.monotonic() + 180
    while "sleeping" not in (await runs.show(sleeper))["output"]:
        assert time.monotonic() < deadline, "the sleeping script never started"
        await asyncio.sleep(2)
    await runs.stop(sleeper)
    stopped = await until_ended(runs, sleeper, 90)
    assert stopped["status"] == "stopped", stopped
    assert stopped["sentence"].startswith(f"Run {sleeper} was stopped; "), stopped

    # Bob, on the same hub, reaches none of alice's runs.
    bob = form_runs(hub, site, BOB)
    assert await bob.runs() == []
    with pytest.raises(InvalidInput, match=r"^There is no run "):
        await bob.show(restore)

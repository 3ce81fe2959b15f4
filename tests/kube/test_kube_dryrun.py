"""``casaspawner pod`` (kube/dryrun.py): the dry run's output, checked independently (Kubernetes
schema + restricted PSS)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from support.pss import restricted_violations

from casaspawner.cli import main
from casaspawner.datasets.synth import write_dataset

pytest.importorskip("kubespawner", reason="the dry run builds CASASpawner's pod (the hub extra)")

K8S_VERSION = kubernetes_validate.latest_version()


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    return {
        era: write_dataset(root / era, era)
        for era in (
            "cycle2-manual",
            "cycle3-pipeline",
            "cycle5",
            "cycle7",
            "cycle10",
            "cycle11",
            "no-evidence",
        )
    }


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["pod", *args])
    out, err = capsys.readouterr()
    return code, out, err


def base_args(dataset: Path | str, *extra: str) -> list[str]:
    return ["--user", "alice", "--uid", "1001", "--gid", "1001", "--dataset", str(dataset), *extra]


def check_items(listing: dict) -> dict:
    """Check the dry run's output independently: schema, restricted profile, no token anywhere."""
    assert listing["kind"] == "List"
    (pod,) = listing["items"]
    assert pod["kind"] == "Pod"
    for item in listing["items"]:
        kubernetes_validate.validate(item, K8S_VERSION, strict=True)
    assert restricted_violations(pod) == {}
    assert "dry-run-placeholder" not in json.dumps(listing)
    return pod


ERA_RELEASES = {
    "cycle2-manual": "4.2.2",
    "cycle3-pipeline": "4.5.3",
    "cycle5": "5.1.1-5",
    "cycle7": "6.1.1-15",
    "cycle10": "6.5.4-9",
    "cycle11": "6.6.1-17",
}


@pytest.mark.parametrize("interface", ["lab", "desktop"])
@pytest.mark.parametrize("era", sorted(ERA_RELEASES))
def test_the_dry_run_prints_a_valid_restricted_pod_as_json(capsys, trees, era, interface):
    code, out, err = run(
        capsys, *base_args(trees[era], "--group", "proja", "--interface", interface, "--json")
    )
    assert (code, err) == (0, "")
    pod = check_items(json.loads(out))
    container = pod["spec"]["containers"][0]
    assert container["image"].split(":")[1].startswith(ERA_RELEASES[era])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["JUPYTERHUB_DEFAULT_URL"] == {"lab": "/lab", "desktop": "/desktop/"}[interface]
    assert env["CASASPAWNER_CASA"].startswith(ERA_RELEASES[era])
    mounts = {m["mountPath"]: m.get("subPath") for m in container["volumeMounts"]}
    assert (
        mounts["/arc/projects/proja"] == "projects/proja"
        and mounts["/arc/home/alice"] == "home/alice"
    )
    token_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "casa-token")
    assert token_volume["emptyDir"]["medium"] == "Memory"
    assert env["CASASPAWNER_TOKEN_URL"].endswith("/casa-token/alice/")


def test_the_dry_run_prints_yaml_and_leaves_the_token_out_when_asked(capsys, trees):
    code, out, _ = run(capsys, *base_args(trees["cycle10"]))
    documents = list(yaml.safe_load_all(out))
    assert code == 0 and [d["kind"] for d in documents] == ["Pod"]
    code, out, _ = run(capsys, *base_args(trees["cycle10"], "--no-token", "--json"))
    pod = check_items(json.loads(out))
    assert "casa-token" not in {v["name"] for v in pod["spec"]["volumes"]}


def test_the_dry_run_reads_a_hub_config(capsys, trees, tmp_path, monkeypatch):
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        textwrap.dedent(
            """
            from casaspawner.datasets.synth import ERAS, manifest_xml
            from pathlib import Path

            class Archive:
                name = "fixture-archive"

                def fetch_manifest(self, identifier):
                    path = Path(__file__).parent / "archive" / "member.pipeline_manifest.xml"
                    path.parent.mkdir(exist_ok=True)
                    path.write_text(manifest_xml(ERAS["cycle9"]))
                    return path

            c.KubeSpawner.extra_labels = {"hub.jupyter.org/network-access-hub": "true"}
            c.CASASpawner.image_registry = "registry.example.org/alma"
            c.CASASpawner.storage_volume = {
                "csi": {"driver": "nfs.csi.k8s.io", "volumeAttributes": {"share": "/"}}
            }
            c.CASASpawner.archive_client = Archive()
            c.CASASpawner.session_sizes = {
                "tiny": {"cpu_limit": 1, "mem_limit": "2G", "description": "1 CPU"}
            }
            c.CASASpawner.default_size = "tiny"
            """
        )
    )
    code, out, err = run(
        capsys, *base_args("uid://A001/X2d20/X3ee5", "--config", str(config), "--json")
    )
    assert (code, err) == (0, "")
    pod = check_items(json.loads(out))
    assert pod["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"
    assert (
        pod["spec"]["containers"][0]["image"]
        == "registry.example.org/alma/casa:6.4.1-12-pipeline-2022.2.0.64"
    )
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == 2 * 1024**3
    assert {
        "name": "casa-storage",
        "csi": {"driver": "nfs.csi.k8s.io", "volumeAttributes": {"share": "/"}},
    } in pod["spec"]["volumes"]
    # the uid___ spelling is an identifier too; a directory here named after a project code is read
    # directly
    code, out, err = run(
        capsys, *base_args("uid___A001_X2d20_X3ee5", "--config", str(config), "--json")
    )
    assert (code, err) == (0, "") and "6.4.1-12" in out
    write_dataset(tmp_path / "2023.1.00545.S", "cycle10")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *base_args("2023.1.00545.S", "--config", str(config), "--json"))
    assert (code, err) == (0, "") and "casa:6.5.4-9-pipeline-2023.1.0.124" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uid", "0"], "Sessions never run as root; give a --uid other than 0."),
        (
            ["--dataset", "/nonexistent/dataset"],
            "There is no dataset directory at '/nonexistent/dataset'.",
        ),
        (
            ["--release", "casa-99"],
            "'casa-99' is not a release in the catalog; choose one from the list.",
        ),
        (["--size", "huge"], "'huge' is not a session size; choose one of small, medium, large."),
        (
            ["--gid", "0"],
            "User alice would run with gid 0 (the root group), which this hub does not allow; "
            "ask the hub's administrators.",
        ),
        (["--gid", "-5"], "The gid of alice in the login data is -5, which is not a valid id."),
    ],
)
def test_bad_input_exit_2_one_line(capsys, trees, args, message):
    code, out, err = run(capsys, *base_args(trees["cycle10"]), *args)
    assert (code, out) == (2, "")
    assert err == f"casaspawner: {message}\n"


def test_bad_config_exit_2_one_line(capsys, trees, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("c.CASASpawner.storage_volume = {\n")
    code, _, err = run(capsys, *base_args(trees["cycle10"], "--config", str(broken)))
    assert code == 2 and err.startswith(
        f"casaspawner: The config file {broken} could not be loaded ("
    )
    assert err.count("\n") == 1
    host_path = tmp_path / "hostpath.py"
    host_path.write_text('c.CASASpawner.storage_volume = {"hostPath": {"path": "/srv/cavern"}}\n')
    code, _, err = run(capsys, *base_args(trees["cycle10"], "--config", str(host_path)))
    assert (
        code == 2
        and "inline hostPath volume, which the restricted Pod Security Standard forbids" in err
    )
    code, _, err = run(
        capsys, *base_args(trees["cycle10"], "--config", str(tmp_path / "missing.py"))
    )
    assert (code, err) == (
        2,
        f"casaspawner: The config file {tmp_path / 'missing.py'} does not exist.\n",
    )


def test_command_line_entry_point(trees):
    """The installed command, as an operator runs it (a separate process, no cluster anywhere)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "casaspawner",
            "pod",
            *base_args(trees["cycle11"], "--interface", "desktop", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(trees["cycle11"].parents[4]),
            "KUBECONFIG": "/nonexistent",
        },
    )
    assert result.returncode == 0, result.stderr
    pod = check_items(json.loads(result.stdout))
    assert pod["metadata"]["labels"]["casaspawner.io/interface"] == "desktop"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "casaspawner",
            "pod",
            *base_args(trees["cycle11"], "--interface", "vnc"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.count("\n") == 1
        and "invalid choice: 'vnc'" in bad.stderr
    )


def test_release_override_starts_a_dataset_without_version(capsys, trees):
    """The issue's example: the resolver says to choose a release; choosing one works."""
    code, _, err = run(capsys, *base_args(trees["no-evidence"]))
    assert code == 2 and err.endswith("; choose a CASA release yourself.\n")
    code, out, err = run(
        capsys, *base_args(trees["no-evidence"], "--release", "pl-2020.1.0.40", "--json")
    )
    assert (code, err) == (0, "")
    pod = check_items(json.loads(out))
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert (env["CASASPAWNER_RELEASE"], env["CASASPAWNER_EXACT"]) == ("pl-2020.1.0.40", "false")
    reason = pod["metadata"]["annotations"]["casaspawner.io/reason"]
    assert reason.startswith("Nothing in ") and reason.endswith(
        "; you chose CASA 6.1.1-15 (pipeline 2020.1.0.40)."
    )


def test_unusable_groups_are_skipped(capsys, trees):
    code, out, err = run(
        capsys,
        *base_args(
            trees["cycle10"],
            "--group",
            "proja",
            "--group",
            "/org/sub",
            "--group",
            "bad group",
            "--json",
        ),
    )
    assert (code, err) == (
        0,
        "casaspawner: note: no project directory for --group '/org/sub', 'bad group': a project "
        "group's name matches CASASpawner.project_group_pattern and can be a directory name.\n",
    )
    pod = check_items(json.loads(out))
    projects = [
        m["mountPath"]
        for m in pod["spec"]["containers"][0]["volumeMounts"]
        if "projects" in m["mountPath"]
    ]
    assert projects == ["/arc/projects/proja"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            'c.CASASpawner.session_sizes = {"s": {"cpu_limit": '
            '"two"}}\nc.CASASpawner.default_size = "s"',
            "The hub's configuration is invalid: CASASpawner.session_sizes['s']['cpu_limit'] is "
            "'two', not a number of CPU cores (such as 0.5 or 4).",
        ),
        (
            'c.CASASpawner.session_sizes = {"s": {"mem_limit": '
            '"lots"}}\nc.CASASpawner.default_size = "s"',
            "The hub's configuration is invalid: CASASpawner.session_sizes['s']['mem_limit'] is "
            "'lots', not an amount of memory (a number with K, M, G or T, such as '8G').",
        ),
        (
            'c.CASASpawner.default_size = "nope"',
            "The hub's configuration is invalid: CASASpawner.default_size is 'nope', which is "
            "not one of CASASpawner.session_sizes (small, medium, large).",
        ),
        (
            'c.CASASpawner.scratch_size_limit = "20 gigs"',
            "The hub's configuration is invalid: CASASpawner.scratch_size_limit is '20 gigs', "
            "not a Kubernetes quantity of bytes such as '20Gi'.",
        ),
        (
            "c.KubeSpawner.modify_pod_hook = lambda s, pod: 1/0",
            "The hub's configured modify_pod_hook failed (ZeroDivisionError: division by zero).",
        ),
        (
            "def hook(spawner):\n    raise KeyError('pool')\nc.Spawner.pre_spawn_hook = hook",
            "The hub's configured pre_spawn_hook failed (KeyError: 'pool').",
        ),
        (
            "c.Spawner.auth_state_hook = lambda spawner, state: state['missing']",
            "The hub's configured auth_state_hook failed (KeyError: 'missing').",
        ),
        (
            "def hook(spawner, state):\n    spawner.environment['LEAK'] = state['access_token']\n"
            "c.Spawner.auth_state_hook = hook",
            "The hub's configuration put the user's access token into the pod itself; it may "
            "reach the session only as the token file.",
        ),
        (
            "c.KubeSpawner.modify_pod_hook = lambda s, pod: "
            "pod.spec.containers[0].args.append(s.access_token) or pod",
            "The hub's configuration put the user's access token into the pod itself; it may "
            "reach the session only as the token file.",
        ),
        (
            "c.KubeSpawner.init_containers = [{'name': 'block-cloud-metadata', 'image': 'x', "
            "'securityContext': {'privileged': True, 'runAsUser': 0, 'capabilities': {'add': "
            "['NET_ADMIN']}}}]",
            "The session pod breaks the restricted Pod Security Standard: init container "
            "block-cloud-metadata is privileged (and 4 more); change the hub's configuration "
            "(init containers, extra containers, volumes, extra_*_config, modify_pod_hook) or "
            "CASASpawner.pod_security_level.",
        ),
    ],
)
def test_config_and_hook_errors_exit_2_one_line(capsys, trees, tmp_path, config, message):
    path = tmp_path / "jupyterhub_config.py"
    path.write_text(config + "\n")
    code, out, err = run(capsys, *base_args(trees["cycle10"], "--config", str(path)))
    assert (code, out, err) == (2, "", f"casaspawner: {message}\n")


def test_dry_run_shows_what_the_hooks_set(capsys, trees, tmp_path):
    """The audit's cfg6: a pre_spawn_hook's nodeSelector and an auth_state_hook's annotation are in
    the pod."""
    path = tmp_path / "jupyterhub_config.py"
    path.write_text(
        textwrap.dedent(
            """
            def hook(spawner):
                spawner.node_selector = {"pool": "casa"}
            c.KubeSpawner.pre_spawn_hook = hook
            c.Spawner.auth_state_hook = lambda spawner, auth_state: setattr(
                spawner,
                "extra_annotations",
                {"from": "auth_state_hook", "uid": str(auth_state["oauth_user"]["uid"])},
            )
            c.KubeSpawner.group_overrides = {
                "proja": {
                    "groups": ["proja"],
                    "spawner_override": {"extra_labels": {"project": "proja"}},
                }
            }
            """
        )
    )
    code, out, err = run(
        capsys, *base_args(trees["cycle10"], "--group", "proja", "--config", str(path), "--json")
    )
    assert (code, err) == (0, "")
    pod = check_items(json.loads(out))
    assert pod["spec"]["nodeSelector"] == {"pool": "casa"}
    annotations = pod["metadata"]["annotations"]
    assert (annotations["from"], annotations["uid"]) == ("auth_state_hook", "1001")
    # The plan's annotations are added to the hook's.
    assert "casaspawner.io/reason" in annotations
    assert pod["metadata"]["labels"]["project"] == "proja"

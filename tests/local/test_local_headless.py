"""``casaspawner run``: scripts in the dataset's CASA build, headless, through the real command.

The integration tests run the command as the demo user, on the demo dataset (conftest.py's
``demo_root``), in the demo's real CASA environment: a restore-like split and listobs, a failing
script, a stopped run and a lost one. The bad-input tests need no CASA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import REPO

from casaspawner.catalog.model import Release
from casaspawner.local import demo
from casaspawner.local.demo import as_owner_of
from casaspawner.local.environments import EnvironmentManager
from casaspawner.local.headless import RUN_FILE, RUNS_DIR
from casaspawner.local.processes import ProcessHandle

RESTORE = """\
import glob, os
ms = sorted(glob.glob(os.path.join(os.environ["CASASPAWNER_DATASET"], "**", "calibrated", "*.ms"),
                      recursive=True))[0]
split(vis=ms, outputvis="restored.ms", datacolumn="data", spw="0")
listobs(vis="restored.ms", listfile="listobs.txt")
print("display", os.environ["DISPLAY"])
print("restored", ms)
"""
SLEEP = 'import time\nprint("sleeping", flush=True)\ntime.sleep(600)\n'


def write_file(path: Path, text: str) -> None:
    path.write_text(text)


class Runner:
    """``casaspawner run`` as the owner of ``home``: never root."""

    def __init__(self, home: Path, cache_dir: Path) -> None:
        self.home = home
        owner = home.stat()
        self.ids = (owner.st_uid, owner.st_gid)
        if os.geteuid() != 0:
            self.command = [sys.executable, "-m", "casaspawner", "run"]
            pythonpath = str(REPO)
        else:
            from casaspawner.local.spawner import ui_requirements

            # Root's own Python may be private: the sessions' Jupyter environment, which the
            # demo prepared, and the package's copy every user reads.
            manager = EnvironmentManager(cache_dir)
            requirements = ui_requirements()
            python = (
                sys.executable
                if requirements is None
                else str(manager.ui_prefix(requirements) / "bin" / "python")
            )
            self.command = [python, "-m", "casaspawner", "run"]
            pythonpath = str(manager.session_files() / "python")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "PYTHONPATH": pythonpath,
            "CASASPAWNER_ENVIRONMENTS_DIR": str(cache_dir),
        }

    def kwargs(self) -> dict[str, Any]:
        found: dict[str, Any] = {"env": self.env, "cwd": self.home, "text": True}
        if os.geteuid() == 0:
            found.update(user=self.ids[0], group=self.ids[1], extra_groups=[])
        return found

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command, *args], capture_output=True, timeout=timeout, **self.kwargs()
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # As from a terminal: a test run started in the background (`make test &`) has
            # SIGINT ignored, which the command would inherit.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            **self.kwargs(),
        )

    def script(self, name: str, text: str) -> str:
        as_owner_of(self.home, write_file, self.home / name, text)
        return name


@pytest.fixture(scope="module")
def home(demo_root: Path) -> Path:
    return demo_root / "arc" / "home" / demo.DEMO_USER


@pytest.fixture(scope="module")
def run(home: Path, cache_dir: Path) -> Runner:
    return Runner(home, cache_dir)


def one_sentence(stderr: str) -> str:
    """The command's last word on stderr: one line, never a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


def entities(run_dir: Path) -> dict[str, dict[str, Any]]:
    record = json.loads((run_dir / "ro-crate-metadata.json").read_text())
    return {item["@id"]: item for item in record["@graph"]}


def run_dir_of(home: Path, run_id: str) -> Path:
    return home / demo.DEMO_PROJECT / RUNS_DIR / run_id


def eventually(check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.2)
    return found


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_restore_like_script_runs_in_the_datasets_build_and_lands_beside_it(
    run: Runner, home: Path, demo_release: Release
) -> None:
    script = run.script("restore.py", RESTORE)
    done = run("--dataset", f"~/{demo.DEMO_PROJECT}", "--", script)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "restored" in done.stdout and "display :" in done.stdout
    last = one_sentence(done.stderr)
    assert "finished" in last
    run_dir = Path(last.rsplit(" are in ", 1)[1].rstrip("."))
    assert run_dir.parent == home / demo.DEMO_PROJECT / RUNS_DIR
    # The split MS, listobs's file, CASA's log and the output, in the user's storage, theirs.
    assert (run_dir / "restored.ms" / "table.dat").is_file()
    assert "DemoQuasar" in (run_dir / "listobs.txt").read_text()
    casa_logs = list(run_dir.glob("casa-*.log"))
    assert len(casa_logs) == 1 and "listobs" in casa_logs[0].read_text()
    assert "restored" in (run_dir / "output.log").read_text()
    assert (run_dir / "restored.ms").stat().st_uid == home.stat().st_uid
    # The record names the release, the dataset, the script and what the run left.
    found = entities(run_dir)
    assert found["#casa"]["identifier"] == demo_release.id
    assert found["#casa"]["softwareVersion"] == demo_release.casa
    assert found["#dataset"]["contentUrl"] == f"file://{home / demo.DEMO_PROJECT}/"
    assert found["#evidence"]["sha256"]
    assert found["#script"]["sha256"] and found["#script"]["name"] == "restore.py"
    action = found["#session"]
    assert action["actionStatus"]["@id"] == "http://schema.org/CompletedActionStatus"
    assert action["endTime"] >= action["startTime"]
    assert {"@id": "restored.ms/"} in action["result"]
    assert found["#measures"]["version"] and found["#runtime"]["sha256"]


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('listobs(vis="no-such.ms")\n', "the script raised AssertionError"),
        ("import sys\nsys.exit(3)\n", "the script exited with status 3"),
    ],
    ids=["casa-exception", "exit-status"],
)
def test_a_failing_script_ends_with_one_sentence_and_a_failed_record(
    run: Runner, home: Path, text: str, said: str
) -> None:
    script = run.script("failing.py", text)
    done = run("--dataset", demo.DEMO_PROJECT, "--", script)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    last = one_sentence(done.stderr)
    assert " failed: " in last and said in last
    run_dir = Path(last.rsplit(" are in ", 1)[1].rstrip("."))
    action = entities(run_dir)["#session"]
    assert action["actionStatus"]["@id"] == "http://schema.org/FailedActionStatus"
    assert said in action["error"]


def child_of(run_dir: Path) -> ProcessHandle | None:
    child = json.loads((run_dir / RUN_FILE).read_text()).get("child") or {}
    return ProcessHandle.open(child["pid"], child["start"]) if child else None


def sleeping(run_dir: Path) -> bool:
    log = run_dir / "output.log"
    return log.is_file() and "sleeping" in log.read_text()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_stop_ends_a_detached_run_and_its_follower_says_so(run: Runner, home: Path) -> None:
    script = run.script("sleeping.py", SLEEP)
    started = run("--dataset", demo.DEMO_PROJECT, "--detach", "--", script)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    run_dir = run_dir_of(home, run_id)
    eventually(lambda: sleeping(run_dir))
    follower = run.popen("--follow", run_id)
    stopped = run("--stop", run_id)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in one_sentence(stopped.stderr)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 130
    assert "sleeping" in out
    assert one_sentence(err).endswith(f"was stopped; what it wrote is in {run_dir}.")
    assert child_of(run_dir) is None
    action = entities(run_dir)["#session"]
    assert action["actionStatus"]["@id"] == "http://schema.org/FailedActionStatus"


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_ctrl_c_stops_the_followed_run(run: Runner, home: Path) -> None:
    script = run.script("sleeping.py", SLEEP)
    follower = run.popen("--dataset", demo.DEMO_PROJECT, "--", script)
    assert follower.stdout is not None
    # The follower prints the script's output as it comes.
    assert eventually(lambda: "sleeping" in follower.stdout.readline())  # type: ignore[union-attr]
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=60)
    assert follower.returncode == 130, err
    last = one_sentence(err)
    assert "was stopped" in last
    run_dir = Path(last.rsplit(" is in ", 1)[1].rstrip("."))
    assert child_of(run_dir) is None


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_run_whose_process_is_lost_ends_with_one_sentence(run: Runner, home: Path) -> None:
    script = run.script("sleeping.py", SLEEP)
    started = run("--dataset", demo.DEMO_PROJECT, "--detach", "--", script)
    run_id = started.stdout.strip()
    run_dir = run_dir_of(home, run_id)
    eventually(lambda: sleeping(run_dir))
    described = json.loads((run_dir / RUN_FILE).read_text())
    supervisor, display = described["supervisor"], described["display"]
    os.kill(supervisor["pid"], signal.SIGKILL)
    done = run("--follow", run_id)
    assert done.returncode == 3, done.stderr
    assert "was lost: its process ended without a result" in one_sentence(done.stderr)
    # What the lost run left running is stopped, and its record says it failed.
    eventually(lambda: child_of(run_dir) is None, timeout=10)
    eventually(lambda: ProcessHandle.open(display["pid"], display["start"]) is None, timeout=10)
    assert not Path(display["directory"]).exists()
    action = entities(run_dir)["#session"]
    assert action["actionStatus"]["@id"] == "http://schema.org/FailedActionStatus"


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_run_elsewhere_is_followed_by_its_id(run: Runner, home: Path) -> None:
    script = run.script("hello.py", 'print("hello from", casalog.version())\n')
    started = run(
        "--dataset", demo.DEMO_PROJECT, "--runs-dir", "my-runs", "--detach", "--", script
    )
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    done = run("--follow", run_id)
    assert done.returncode == 0, done.stderr
    assert "hello from CASA" in done.stdout
    assert one_sentence(done.stderr).endswith(f"are in {home / 'my-runs' / run_id}.")
    assert not run_dir_of(home, run_id).exists()


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "casaspawner", "run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "HOME": str(cwd or Path.home())},
        timeout=60,
    )


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    made = subprocess.run(
        [sys.executable, "-m", "casaspawner", "demo-data", str(tmp_path), "--era", "cycle10"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    (tmp_path / "script.py").write_text("print('hello')\n")
    return tmp_path / "cycle10"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--dataset", "no/such/dir", "--", "script.py"], "does not exist"),
        (["--dataset", "cycle10", "--release", "casa-0.0-1", "--", "script.py"], "not a release"),
        (["--dataset", "cycle10", "--size", "huge", "--", "script.py"], "is not a size"),
        (["--dataset", "cycle10", "--", "no-such-script.py"], "There is no script"),
        (["--dataset", "cycle10"], "Give the script to run after --"),
        (["--", "script.py"], "Give the dataset with --dataset"),
        (["--follow", "20991231T000000Z-nothing"], "There is no run 20991231T000000Z-nothing"),
        (["--stop", "/nowhere"], "There is no run /nowhere"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(dataset: Path, args: list[str], said: str) -> None:
    done = cli(*args, cwd=dataset.parent)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    line = one_sentence(done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1
    assert line.startswith("casaspawner: ") and said in line
    assert not (dataset / RUNS_DIR).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can ask to run as root")
def test_root_is_refused_in_one_sentence(dataset: Path) -> None:
    done = cli("--dataset", "cycle10", "--", "script.py", cwd=dataset.parent)
    assert done.returncode == 2
    assert one_sentence(done.stderr) == (
        "casaspawner: casaspawner run never runs CASA as root; run it as your own user."
    )

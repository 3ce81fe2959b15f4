"""The spawn form's *Run headless*: the hub's run pages, their worker and a real run in a browser.

The first tests need no hub: a request's checks, the preview's line about the build, the worker's
view of run directories written as ``casaspawner run`` writes them, the form's part and the hub
configuration. The integration test logs in to the embedded hub, presses Run headless on the
form and Start on the preview, and watches a split and listobs of the demo MeasurementSet finish
in the demo user's storage, as the demo user; then a failing script and bad input, each one
sentence, and another user who cannot see the run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import REPO, SCREENSHOTS
from support.browser import password_login
from support.hub import Hub
from traitlets.config import Config

from casaspawner.catalog.model import Release, load_catalog
from casaspawner.datasets.worker import WorkerLimits, limited
from casaspawner.errors import CasaspawnerError, InvalidInput
from casaspawner.hubconfig import HubSettings, configure_headless_runs
from casaspawner.local import demo, formruns, headless
from casaspawner.local.demo import as_owner_of
from casaspawner.local.processes import ProcessHandle
from casaspawner.plan import DEFAULT_SIZES, Identity
from casaspawner.services.runs import (
    REFRESH_SECONDS,
    RunRequest,
    backend_for,
    build_description,
    run_request,
)
from casaspawner.session.form import render_form
from casaspawner.session.runs import OUTPUT_LOG, RUN_FILE

#: A restore-like script: split the demo MS, listobs the result and show listobs's output.
RESTORE = """\
import glob, os
ms = sorted(glob.glob(os.path.join(os.environ["CASASPAWNER_DATASET"], "**", "calibrated", "*.ms"),
                      recursive=True))[0]
split(vis=ms, outputvis="restored.ms", datacolumn="data", spw="0")
listobs(vis="restored.ms", listfile="listobs.txt")
print(open("listobs.txt").read())
"""
SLEEP = 'import time\nprint("zzz", flush=True)\ntime.sleep(600)\n'
RUN_ID = "20261206T080000Z-restore"


# Without a hub
def fields(**values: str) -> Any:
    return lambda name: values.get(name, "")


def test_a_request_defaults_to_scriptforpi_and_keeps_what_the_form_sent() -> None:
    assert run_request(fields(dataset=" ~/d ")) == RunRequest("~/d", "scriptForPI.py", "", "")
    found = run_request(fields(dataset="d", script="my.py", size="machine", release="r"))
    assert found.query() == {"dataset": "d", "script": "my.py", "size": "machine", "release": "r"}


@pytest.mark.parametrize(
    ("values", "said"),
    [
        ({}, "Name the dataset on the form"),
        ({"dataset": "d", "script": "--help"}, "not an option"),
        ({"dataset": "d\x00"}, "control characters"),
        ({"dataset": "d" * 2000}, "too long"),
    ],
)
def test_bad_input_is_one_sentence(values: dict[str, str], said: str) -> None:
    with pytest.raises(InvalidInput, match=said):
        run_request(fields(**values))


def test_the_preview_says_whether_the_build_is_exact() -> None:
    assert build_description({"label": "CASA 6.6", "exact": True}) == "CASA 6.6: the exact build."
    assert "approximation" in build_description({"label": "x", "approximate": True})
    assert "not the exact" in build_description({"label": "x", "exact": False})


def test_runs_from_the_form_need_a_casa_spawner_and_on_kubernetes_the_storage() -> None:
    from jupyterhub.spawner import LocalProcessSpawner

    from casaspawner.kube.spawner import CASASpawner

    with pytest.raises(InvalidInput, match="does not start headless runs from the form"):
        backend_for(LocalProcessSpawner(_mock=True))
    # The Kubernetes backend reads the runs' files through the hub's mount of the storage.
    unmounted = CASASpawner.__new__(CASASpawner)
    unmounted.storage_hub_path = None
    with pytest.raises(InvalidInput, match="^This hub does not see your storage, where a run"):
        backend_for(unmounted)


def write_run(run_dir: Path, **extra: Any) -> None:
    run_dir.mkdir(parents=True)
    run = {"id": run_dir.name, "label": "CASA 6.6.5", "script": "/d/restore.py", **extra}
    (run_dir / RUN_FILE).write_text(json.dumps(run))


def test_a_finished_run_shows_the_commands_sentence_its_output_and_files(tmp_path: Path) -> None:
    run_dir = tmp_path / RUN_ID
    write_run(run_dir, result={"status": "finished", "ended": "now"}, casa_log="casa-1.log")
    (run_dir / OUTPUT_LOG).write_text("first\n" + "x" * 20_000 + "\nlast line\n")
    (run_dir / "restored.ms").mkdir()
    found = formruns.summary(run_dir, tail=True)
    assert found["status"] == "finished"
    assert found["sentence"] == (
        f"Run {RUN_ID} finished; its CASA log, output and record are in {run_dir}."
    )
    # The tail starts at a whole line and ends with the log's end.
    assert found["output"] == "last line\n"
    assert "restored.ms/" in found["files"] and RUN_FILE in found["files"]


def test_a_failed_run_says_why_and_a_living_one_runs(tmp_path: Path) -> None:
    failed = tmp_path / "20261206T080000Z-failing"
    write_run(failed, result={"status": "failed", "error": "the script exited with status 3"})
    assert formruns.summary(failed)["sentence"].endswith(
        f"failed: the script exited with status 3; its CASA log and output are in {failed}."
    )
    running = tmp_path / "20261206T080000Z-sleep"
    me = ProcessHandle.open(os.getpid())
    assert me is not None
    write_run(running, supervisor={"pid": me.pid, "start": me.start})
    me.close()
    assert formruns.summary(running)["status"] == "running"


def test_a_run_whose_supervisor_is_gone_is_recorded_lost(tmp_path: Path) -> None:
    run_dir = tmp_path / "20261206T080000Z-lost"
    # A pid that lived once with another start time: not this run's supervisor.
    write_run(run_dir, supervisor={"pid": os.getpid(), "start": 1})
    found = formruns.summary(run_dir)
    assert found["status"] == "lost"
    assert "was lost" in found["sentence"]
    assert json.loads((run_dir / RUN_FILE).read_text())["result"]["status"] == "lost"


def test_runs_are_found_only_by_id_in_the_callers_own_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    index = tmp_path / "state" / "casaspawner" / "runs"
    index.mkdir(parents=True)
    older, newer = tmp_path / "runs" / "20261206T070000Z-a", tmp_path / "runs" / RUN_ID
    for run_dir in (older, newer):
        write_run(run_dir, result={"status": "finished"})
        (index / run_dir.name).symlink_to(run_dir)
    assert [r["id"] for r in formruns.list_runs()["runs"]] == [RUN_ID, older.name]
    assert formruns.find(RUN_ID) == newer
    for bad in ("../20261206T070000Z-a", str(newer), "20261206T090000Z-none"):
        with pytest.raises(InvalidInput, match="There is no run"):
            formruns.find(bad)


def test_the_form_offers_run_headless_only_when_configured() -> None:
    form = dict(
        releases=[], sizes=DEFAULT_SIZES, default_size="medium", previous={}, recent=[], last=None
    )
    assert "Run headless</button>" not in render_form(**form)  # type: ignore[arg-type]
    html = render_form(runs_url="/hub/casa-runs/new", **form)  # type: ignore[arg-type]
    assert 'data-runs-url="/hub/casa-runs/new"' in html
    # Not a submit button: Enter in the dataset field still presses Start.
    assert re.search(r'<button type="button"[^>]*id="casa-run-headless"', html)
    # The script field has no name: Start never sends it (sessions refuse unknown options).
    script = re.search(r"<input[^>]*id=\"casa-script\"[^>]*>", html)
    assert (
        script and "name=" not in script.group(0) and 'value="scriptForPI.py"' in script.group(0)
    )


def test_the_hub_configuration_adds_the_pages_and_the_button_once() -> None:
    c = Config()
    settings = HubSettings(state_file="s", sessions_url="http://127.0.0.1:1", base_url="/x/")
    configure_headless_runs(c, settings)
    configure_headless_runs(c, settings)
    paths = [handler[0] for handler in c.JupyterHub.extra_handlers]
    assert paths == sorted(set(paths), key=paths.index) and "/casa-runs/new" in paths
    assert c.CASASessionMixin.headless_runs_url == "/x/hub/casa-runs/new"


class FakeProcess:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.returncode = 0

    async def communicate(self) -> tuple[bytes, bytes]:
        return json.dumps(self.answer).encode() + b"\n", b""


class FakeSpawner:
    """What :class:`formruns.LocalRuns` asks of the local spawner."""

    allow_approximate = False
    catalog_path = None
    log = logging.getLogger("test")

    def __init__(self, home: Path) -> None:
        self.home_mount_template = str(home)
        self.user = SimpleNamespace(name="demo")
        self.built: list[str] = []

    async def session_identity(self) -> Identity:
        return Identity("demo", os.getuid() or 1000, os.getgid() or 1000)

    def environment_manager(self) -> Any:
        spawner = self

        class Manager:
            cache_dir = Path("/nonexistent-environments")

            def session_files(self) -> Path:
                return Path("/nonexistent-session")

            async def ensure(self, release: Release) -> Any:
                spawner.built.append(release.id)
                yield "built"

        return Manager()

    async def _resolver_python(self) -> str:
        return sys.executable

    def system_username(self) -> str:
        return "demo"

    def resolver_limits(self) -> WorkerLimits:
        return WorkerLimits()

    def casa_catalog(self) -> Any:
        return load_catalog()


def worker_answering(
    monkeypatch: pytest.MonkeyPatch, answer: dict[str, Any]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Replace the worker's process with one that gives ``answer``; the calls made."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def create(*args: Any, **kwargs: Any) -> FakeProcess:
        calls.append((args, kwargs))
        return FakeProcess(answer)

    monkeypatch.setattr(formruns.asyncio, "create_subprocess_exec", create)
    monkeypatch.setattr(formruns, "prepare_owned_dir", lambda *args: None)
    return calls


def test_the_worker_runs_as_the_resolver_does_out_of_reach_of_the_users_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/site.pem")
    calls = worker_answering(monkeypatch, {"runs": []})
    assert asyncio.run(formruns.LocalRuns(FakeSpawner(tmp_path)).runs()) == []
    (args, kwargs) = calls[0]
    # Neither the user's site-packages nor a casaspawner/ in the working directory is imported.
    assert args[1:5] == ("-s", "-P", "-m", "casaspawner.local.formruns")
    assert kwargs["cwd"] == "/" and kwargs["env"]["PYTHONNOUSERSITE"] == "1"
    assert kwargs["env"]["https_proxy"] == "http://proxy.example:3128"
    assert kwargs["env"]["SSL_CERT_FILE"] == "/etc/ssl/site.pem"
    assert callable(kwargs["preexec_fn"])


def test_the_workers_limits_are_soft_so_that_the_run_it_starts_can_lift_them() -> None:
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_CPU))"
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    said = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        preexec_fn=limited(WorkerLimits(cpu_seconds=30), None, soft_only=True),
        check=True,
    ).stdout
    assert said.strip() == str((30 if hard == resource.RLIM_INFINITY else min(30, hard), hard))


@pytest.mark.parametrize(
    ("action", "answer"),
    [
        ("start", {"id": "../../../hub/admin"}),
        ("start", {"id": 7}),
        ("show", {"id": "https://elsewhere.example/"}),
        ("preview", {"release": "../../etc", "script": "/s", "runs_dir": "/d"}),
    ],
)
def test_what_the_worker_answers_is_checked_before_the_hub_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, answer: dict[str, Any]
) -> None:
    worker_answering(monkeypatch, answer)
    runs = formruns.LocalRuns(FakeSpawner(tmp_path))
    if action == "start":
        monkeypatch.setattr(runs, "preview", lambda *a: asyncio.sleep(0, PREVIEW))
        monkeypatch.setattr(runs, "runs", lambda: asyncio.sleep(0, []))
        call = runs.start("~/d", "s.py", "", "")
    elif action == "show":
        call = runs.show(RUN_ID)
    else:
        call = runs.preview("~/d", "s.py", "", "")
    with pytest.raises((formruns.WorkerError, CasaspawnerError)):
        asyncio.run(call)


PREVIEW = {
    "release": load_catalog().releases[0].id,
    "script": "/home/demo/d/sleeping.py",
    "runs_dir": "/home/demo/d/casaspawner-runs",
    "ready": True,
}


def test_a_second_start_of_a_running_script_on_the_same_dataset_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    runs = formruns.LocalRuns(FakeSpawner(tmp_path))
    running = {
        "id": RUN_ID,
        "status": "running",
        "script": PREVIEW["script"],
        "directory": f"{PREVIEW['runs_dir']}/{RUN_ID}",
    }

    async def worker(*args: str) -> dict[str, Any]:
        started.append(args[0])
        return {"preview": PREVIEW, "list": {"runs": [running]}}.get(args[0], {"id": RUN_ID})

    monkeypatch.setattr(runs, "_worker", worker)
    with pytest.raises(InvalidInput, match=f"sleeping.py is already running .*{RUN_ID}"):
        asyncio.run(runs.start("~/d", "sleeping.py", "", ""))
    assert "start" not in started
    # Ended, or on another dataset: it starts.
    running["status"] = "finished"
    assert asyncio.run(runs.start("~/d", "sleeping.py", "", "")) == RUN_ID


def test_values_that_look_like_options_reach_the_worker_as_values(tmp_path: Path) -> None:
    spawner = FakeSpawner(tmp_path)
    options = formruns.LocalRuns(spawner)._run_options("-d", "s.py", "-m", "--help")
    args = formruns.worker_parser().parse_args(["preview", *options])
    assert (args.dataset, args.script, args.size, args.release) == ("-d", "s.py", "-m", "--help")


def test_the_form_refuses_a_non_directory_before_any_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any) -> Any:
        raise AssertionError("looked up")

    monkeypatch.setattr(headless, "resolve", never)
    monkeypatch.chdir(tmp_path)
    args = formruns.worker_parser().parse_args(
        ["preview", "--dataset=uid://A001/X1/X2", "--script=s.py"]
    )
    with pytest.raises(InvalidInput, match="is not a directory in your storage"):
        formruns.preview(args)
    # A directory the account cannot write: the form's own sentence, not the command's.
    (tmp_path / "d").mkdir()
    monkeypatch.setattr(formruns.os, "access", lambda *args: False)
    args = formruns.worker_parser().parse_args(
        ["preview", f"--dataset={tmp_path / 'd'}", "--script=s.py"]
    )
    with pytest.raises(InvalidInput, match="copy the dataset to a directory of yours") as said:
        formruns.preview(args)
    assert "--runs-dir" not in str(said.value)


def test_the_preview_plans_as_the_command_even_with_braces_in_the_home_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "{home}"
    made = subprocess.run(
        [sys.executable, "-m", "casaspawner", "demo-data", str(home), "--era", "cycle10"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    (home / "script.py").write_text("print('hello')\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CASASPAWNER_ENVIRONMENTS_DIR", str(tmp_path / "environments"))
    monkeypatch.setattr(headless, "caller_identity", lambda: Identity("demo", 1000, 1000))
    args = formruns.worker_parser().parse_args(
        ["preview", "--dataset=~/cycle10", "--script=~/script.py", "--approximate"]
    )
    found = formruns.preview(args)
    assert found["dataset"] == str(home / "cycle10")
    assert found["script"] == str(home / "script.py")


def test_a_running_runs_page_reloads_no_more_than_every_five_seconds() -> None:
    assert REFRESH_SECONDS >= 5


# In a browser, on the embedded hub
def shot(page: Any, name: str) -> None:
    if os.environ.get("CASASPAWNER_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def ended(page: Any, timeout: float = 300) -> str:
    """Wait on a run's page (it reloads itself) until the run ends; its status."""
    deadline = time.monotonic() + timeout
    while True:
        status = page.locator("#run-status").inner_text()
        if status != "running":
            return str(status)
        assert time.monotonic() < deadline, page.content()[-3000:]
        page.wait_for_timeout(1000)


def run_from_form(page: Any, hub: Hub, script: str, screenshot: str = "") -> None:
    page.goto(f"{hub.url}/hub/spawn")
    page.fill("#casa-dataset", f"~/{demo.DEMO_PROJECT}")
    page.fill("#casa-script", script)
    if screenshot:
        page.locator("#casa-headless").scroll_into_view_if_needed()
        shot(page, screenshot)
    page.click("#casa-run-headless")
    page.wait_for_url("**/hub/casa-runs/new?**")


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_run_headless_from_the_form_runs_as_the_user_beside_the_dataset(
    hub: Hub, browser: Any, demo_root: Path, demo_release: Release
) -> None:
    home = demo_root / "arc" / "home" / demo.DEMO_USER
    for name, text in (
        ("restore.py", RESTORE),
        ("failing.py", "import sys\nsys.exit(3)\n"),
        ("sleeping.py", SLEEP),
    ):
        as_owner_of(home, Path.write_text, home / name, text)
    page = password_login(browser, hub, demo.DEMO_USER)
    run_from_form(page, hub, "restore.py", screenshot="local-run-form")
    # What will run, before it runs: the dataset, its build and why, the script; no session.
    assert page.locator("#run-preview").count(), page.content()[-3000:]
    assert page.locator("#run-dataset").inner_text() == str(home / demo.DEMO_PROJECT)
    assert demo_release.label in page.locator("#run-build").inner_text()
    assert page.locator("#run-reason").inner_text()
    assert page.locator("#run-script").inner_text() == str(home / "restore.py")
    assert not hub.server()
    shot(page, "local-run-new")
    page.click("#run-start")
    page.wait_for_url(re.compile(r".*/hub/casa-runs/[0-9]{8}T[0-9]{6}Z-restore$"))
    run_id = page.url.rsplit("/", 1)[1]
    assert ended(page) == "finished", page.locator("#run-sentence").inner_text()
    run_dir = home / demo.DEMO_PROJECT / "casaspawner-runs" / run_id
    sentence = page.locator("#run-sentence").inner_text()
    assert sentence == f"Run {run_id} finished; its CASA log, output and record are in {run_dir}."
    assert "DemoQuasar" in page.locator("#run-output").inner_text()
    assert "restored.ms/" in page.locator("#run-files").inner_text()
    shot(page, "local-run-finished")
    # The outputs and the completed record in the user's storage, the user's.
    owner = home.stat().st_uid
    assert owner != 0
    for name in ("restored.ms", "listobs.txt", "output.log", "ro-crate-metadata.json"):
        assert (run_dir / name).stat().st_uid == owner, name
    assert len(list(run_dir.glob("casa-*.log"))) == 1
    record = json.loads((run_dir / "ro-crate-metadata.json").read_text())
    action = next(e for e in record["@graph"] if e["@id"] == "#session")
    assert action["actionStatus"]["@id"] == "http://schema.org/CompletedActionStatus"

    # A failing script ends with its sentence.
    run_from_form(page, hub, "failing.py")
    page.click("#run-start")
    page.wait_for_url(re.compile(r".*/hub/casa-runs/[0-9]{8}T[0-9]{6}Z-failing$"))
    assert ended(page) == "failed"
    assert (
        page.locator("#run-sentence")
        .inner_text()
        .endswith(
            f"failed: the script exited with status 3; its CASA log and output are in "
            f"{home / demo.DEMO_PROJECT / 'casaspawner-runs' / page.url.rsplit('/', 1)[1]}."
        )
    )
    # A running script stops with Stop, and says so.
    run_from_form(page, hub, "sleeping.py")
    # A double click starts it once (the list below has one sleeping run).
    page.dblclick("#run-start")
    page.wait_for_url(re.compile(r".*/hub/casa-runs/[0-9]{8}T[0-9]{6}Z-sleeping$"))
    page.wait_for_function("document.querySelector('#run-output').textContent.includes('zzz')")
    sleeping_id = page.url.rsplit("/", 1)[1]
    new_url = f"{hub.url}/hub/casa-runs/new"
    sent = {"dataset": f"~/{demo.DEMO_PROJECT}", "script": "sleeping.py"}
    # A Start sent again while the script runs on the dataset: one sentence, what was typed kept.
    xsrf = page.locator("input[name=_xsrf]").first.get_attribute("value")
    again = page.request.post(new_url, form={"_xsrf": xsrf, **sent})
    assert again.status == 400
    assert f"sleeping.py is already running on this dataset (run {sleeping_id})" in again.text()
    assert 'id="run-again-script" value="sleeping.py"' in again.text()
    # A POST without the hub's xsrf token starts nothing.
    assert page.request.post(new_url, form=sent).status == 403
    # Another user cannot stop it.
    other = password_login(browser, hub, demo.OPERATOR)
    cookie = next(c["value"] for c in other.context.cookies() if c["name"] == "_xsrf")
    refused = other.request.post(f"{new_url[:-4]}/{sleeping_id}/stop", form={"_xsrf": cookie})
    assert refused.status == 400 and f"There is no run {sleeping_id}" in refused.text()
    page.reload()
    assert page.locator("#run-status").inner_text() == "running"
    page.click("#run-stop")
    assert ended(page) == "stopped"
    assert " was stopped; what it wrote is in " in page.locator("#run-sentence").inner_text()
    # All three on the list, newest first.
    page.goto(f"{hub.url}/hub/casa-runs")
    listed = page.locator("tr.run").evaluate_all("rows => rows.map(r => r.dataset.run)")
    assert [r.rsplit("-", 1)[1] for r in listed] == ["sleeping", "failing", "restore"]
    assert listed[2] == run_id

    # Bad input: one sentence, never a traceback, nothing started.
    for query, said in (
        ("dataset=~/no-such-dataset", "no-such-dataset"),
        (f"dataset=~/{demo.DEMO_PROJECT}&script=nope.py", "There is no script nope.py"),
    ):
        response = page.goto(f"{hub.url}/hub/casa-runs/new?{query}")
        assert response.status == 400
        error = page.locator("#run-error").inner_text()
        assert said in error and "Traceback" not in page.content()
        assert page.locator("#run-start").count() == 0

    # Another user does not see the run.
    response = other.goto(f"{hub.url}/hub/casa-runs/{run_id}")
    assert response.status == 400
    assert other.locator("#run-error").inner_text() == f"There is no run {run_id}; " + (
        "give the id casaspawner run printed, or its directory."
    )
    other.goto(f"{hub.url}/hub/casa-runs")
    assert run_id not in other.content()

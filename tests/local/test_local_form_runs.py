"""The spawn form's *Run headless*: the hub's run pages, their worker and a real run in a browser.

The first tests need no hub: a request's checks, the preview's line about the build, the worker's
view of run directories written as ``casaspawner run`` writes them, the form's part and the hub
configuration. The integration test logs in to the embedded hub, presses Run headless on the
form and Start on the preview, and watches a split and listobs of the demo MeasurementSet finish
in the demo user's storage, as the demo user; then a failing script and bad input, each one
sentence, and another user who cannot see the run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from support import SCREENSHOTS
from support.browser import password_login
from support.hub import Hub
from traitlets.config import Config

from casaspawner.catalog.model import Release
from casaspawner.errors import InvalidInput
from casaspawner.hubconfig import HubSettings, configure_headless_runs
from casaspawner.local import demo, formruns
from casaspawner.local.demo import as_owner_of
from casaspawner.local.processes import ProcessHandle
from casaspawner.plan import DEFAULT_SIZES
from casaspawner.services.runs import RunRequest, backend_for, build_description, run_request
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


def test_only_the_local_spawner_starts_runs_from_the_form() -> None:
    from casaspawner.kube.spawner import CASASpawner

    with pytest.raises(InvalidInput, match="does not start headless runs from the form"):
        backend_for(CASASpawner.__new__(CASASpawner))


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
    page.click("#run-start")
    page.wait_for_url(re.compile(r".*/hub/casa-runs/[0-9]{8}T[0-9]{6}Z-sleeping$"))
    page.wait_for_function("document.querySelector('#run-output').textContent.includes('zzz')")
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

    # Another user neither sees nor stops the run.
    other = password_login(browser, hub, demo.OPERATOR)
    response = other.goto(f"{hub.url}/hub/casa-runs/{run_id}")
    assert response.status == 400
    assert other.locator("#run-error").inner_text() == f"There is no run {run_id}; " + (
        "give the id casaspawner run printed, or its directory."
    )
    other.goto(f"{hub.url}/hub/casa-runs")
    assert run_id not in other.content()

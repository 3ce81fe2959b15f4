"""The embedded hub's operator, in a real browser: the admin page, casa-sessions, a drain.

A newcomer logs in as the demo user: the form suggests the demo dataset, the progress page keeps
the build and its reason in view, and the CASA desktop starts. The operator then finds that
session with its CASA build on JupyterHub's admin page and on the casa-sessions page of the same
hub, drains its release, and the user's desktop pops the notice up. The admin page's Shutdown Hub
button works, and the session outlives the hub. Screenshots go to docs/_static/screenshots/ when
``CASASPAWNER_SCREENSHOTS`` is set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from support import SCREENSHOTS
from support.browser import password_login
from support.hub import Hub
from support.local import wait_for_display, wait_for_title, window_titles

from casaspawner.catalog.model import Release
from casaspawner.local import demo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DATASET = demo.DEMO_DATASET
MESSAGE = "CASA update until 18:00 UTC"
#: What the progress page showed, kept when it navigates into the session.
RECORD_PROGRESS = """
window.addEventListener('beforeunload', () => {
  const box = document.querySelector('#casa-session');
  const details = document.querySelector('#progress-details');
  if (box && !box.hidden) {
    sessionStorage.setItem('casa-session', box.innerText);
    sessionStorage.setItem('casa-log-open', String(!!(details && details.open)));
  }
});
"""


def shot(page: Any, name: str) -> None:
    if os.environ.get("CASASPAWNER_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def login(browser: Any, hub: Hub, user: str) -> Any:
    """A new page, logged in as ``user``, recording the progress page's events."""
    return password_login(browser, hub, user, RECORD_PROGRESS)


@pytest.fixture(scope="module")
def desktop(hub: Hub, browser: Any) -> dict[str, Any]:
    """The demo user's first visit: the form as it is offered, then Start on a CASA desktop.

    What the form and the progress page showed is kept for the tests; ``page`` is the user's
    desktop in noVNC.
    """
    hub.stop_server()
    # A user the hub has never seen: no recent datasets, no last resolution. The hub forgets a
    # deleted user's permission to log in until it starts again.
    hub.api("DELETE", f"/hub/api/users/{demo.DEMO_USER}")
    hub.stop()
    hub.start()
    page = login(browser, hub, demo.DEMO_USER)
    seen: dict[str, Any] = {"page": page, "url": page.url}
    seen["value"] = page.locator("#casa-dataset").input_value()
    seen["help"] = page.locator("#casa-dataset-help").inner_text()
    seen["suggested"] = page.locator(".casa-recent button").all_inner_texts()
    seen["label"] = page.locator("#casa-recent-label").inner_text()
    page.check("input[name=interface][value=desktop]")
    shot(page, "local-spawn-form-first")
    page.locator("form#spawn_form [type=submit]").click()
    deadline = time.monotonic() + 900
    while "/desktop/" not in urlparse(page.url).path:
        try:
            message = page.evaluate(
                "() => (document.querySelector('#progress-message') || {}).textContent || ''"
            )
        except Exception:
            # Navigating into the session.
            message = ""
        assert "Spawn failed" not in message, message
        assert time.monotonic() < deadline, page.url
        page.wait_for_timeout(200)
    seen["progress"] = page.evaluate("() => sessionStorage.getItem('casa-session') || ''")
    seen["log_open"] = page.evaluate("() => sessionStorage.getItem('casa-log-open')")
    page.wait_for_function(
        "(document.querySelector('#status') || {}).textContent === 'Connected'", timeout=60_000
    )
    return seen


def test_a_first_visit_offers_the_demo_dataset_and_the_progress_page_names_the_build(
    desktop: dict[str, Any], demo_release: Release, demo_root: Path
) -> None:
    label = demo_release.label
    assert "/hub/spawn" in desktop["url"], "after login a new user gets the form"
    # The field holds the demo dataset; the form suggests it and gives it as the example.
    assert desktop["value"] == DATASET
    assert desktop["label"] == "Suggested:" and desktop["suggested"] == [DATASET]
    assert f"e.g. {DATASET} (paths relative to" in desktop["help"], desktop["help"]
    # The example exists: the demo's ALMA product tree in the user's home.
    home = demo_root / "arc" / "home" / demo.DEMO_USER
    assert (home / demo.DEMO_PROJECT).is_dir()
    # Above the collapsed event log: the dataset, the build and why.
    assert [line for line in desktop["progress"].splitlines() if line] == [
        f"Dataset {DATASET}: {label}, the exact build.",
        f"The pipeline manifest names {label}; {label} is that build.",
    ], desktop["progress"]
    assert desktop["log_open"] == "false"


def test_the_operator_finds_the_session_drains_its_release_and_the_user_is_told(
    hub: Hub, browser: Any, desktop: dict[str, Any], demo_release: Release, demo_root: Path
) -> None:
    label = demo_release.label
    server = hub.server()
    assert server is not None and server["ready"]
    summary = f"{label} · CASA desktop · {DATASET} · exact"
    assert server["user_options"]["profile"] == summary
    operator = login(browser, hub, demo.OPERATOR)

    # JupyterHub's admin page: the Profile column holds the session's summary.
    operator.goto(f"{hub.url}/hub/admin")
    row = operator.locator("tr", has_text=demo.DEMO_USER).first
    row.wait_for()
    assert summary in row.inner_text(), row.inner_text()
    shot(operator, "local-admin")

    # casa-sessions on the same hub: the session under its CASA release.
    operator.goto(f"{hub.url}/services/casa-sessions/")
    group = operator.locator(f"section.release-group[data-release='{demo_release.id}']")
    assert label in group.locator("h3").inner_text()
    assert group.locator(f"tr.session[data-user='{demo.DEMO_USER}']").count() == 1
    shot(operator, "local-casa-sessions")

    home = demo_root / "arc" / "home" / demo.DEMO_USER
    display, xauthority = wait_for_display(hub.session_pid())
    release = operator.locator(f"tr.release[data-release='{demo_release.id}']")
    release.locator("input[name=message]").fill(MESSAGE)
    release.locator("button[value=drain]").click()
    try:
        operator.locator("#flash").wait_for()
        state = operator.locator(f"tr.release[data-release='{demo_release.id}'] td.state")
        assert "draining" in state.inner_text() and MESSAGE in state.inner_text()
        # The session hears of it from casa-sessions, writes the notice file, and the desktop
        # pops it up.
        notice = home / "CASA-NOTICES.md"
        deadline = time.monotonic() + 60
        while "is being drained" not in (notice.read_text() if notice.is_file() else ""):
            assert time.monotonic() < deadline, "no drain notice in the session's notice file"
            time.sleep(0.5)
        assert f"{label}, which this session runs, is being drained" in notice.read_text()
        assert MESSAGE in notice.read_text()
        titles = wait_for_title(display, xauthority, "CASA notices", timeout=30)
        assert "CASA notices" in titles, titles
        # noVNC catches up with the X server.
        desktop["page"].wait_for_timeout(2000)
        shot(desktop["page"], "local-desktop-notice")
    finally:
        operator.goto(f"{hub.url}/services/casa-sessions/")
        release = operator.locator(f"tr.release[data-release='{demo_release.id}']")
        release.locator("button[value=undrain]").click()
        operator.locator("#flash").wait_for()
    # Undrained: the notice goes, and its window closes.
    deadline = time.monotonic() + 60
    while "CASA notices" in window_titles(display, xauthority):
        assert time.monotonic() < deadline, "the notice window stayed after the undrain"
        time.sleep(0.5)
    operator.close()


def test_the_admin_page_shuts_the_hub_down_and_the_session_outlives_it(
    hub: Hub, browser: Any, desktop: dict[str, Any]
) -> None:
    """casa-admins have the ``shutdown`` scope: the admin page's Shutdown Hub button works."""
    assert hub.process is not None
    pid = hub.session_pid()
    operator = login(browser, hub, demo.OPERATOR)
    operator.goto(f"{hub.url}/hub/admin")
    operator.locator("#shutdown-button").click()
    assert hub.process.wait(60) == 0, hub.log()[-3000:]
    operator.close()
    # Still running without the hub, and found again by the next one.
    os.kill(pid, 0)
    hub.stop(keep_sessions=True)
    hub.start()
    deadline = time.monotonic() + 60
    while not (hub.server() or {}).get("ready"):
        assert time.monotonic() < deadline, "the restarted hub did not find the session"
        time.sleep(0.5)
    assert hub.session_pid() == pid

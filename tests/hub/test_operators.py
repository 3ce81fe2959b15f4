"""Operators in the browser: JupyterHub's admin page shows each session's CASA build, interface and
dataset; /services/casa-sessions/ groups sessions by release and dataset, drains and retires
releases; drained releases are refused at spawn with the operator's message; running users and idle
users get notices in their session."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jupyterhub
import pytest
from support.browser import oidc_login

from casaspawner.datasets.synth import write_dataset
from casaspawner.insession.notices import NOTICE_FILE

pytestmark = pytest.mark.integration
JUPYTERHUB_MAJOR = int(jupyterhub.__version__.split(".")[0])
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "_static" / "screenshots"
DRAINED = "pl-2023.1.0.124"
DRAINED_LABEL = "CASA 6.5.4-9 (pipeline 2023.1.0.124)"
OTHER_LABEL = "CASA 6.4.1-12 (pipeline 2022.2.0.64)"
MESSAGE = "Image rebuild until 18:00 UTC"


@pytest.fixture(scope="module")
def hub(hub_factory):
    # Cull after an hour, warn from 1 s of idleness on: every session shows the warning quickly,
    # none is culled.
    return hub_factory(CASA_CULL_TIMEOUT="3600", CASA_CULL_WARN_BEFORE="3599")


@pytest.fixture(scope="module")
def datasets(hub) -> dict[str, Path]:
    root = hub.workdir / "data"
    return {
        "cycle10": write_dataset(root / "a", era="cycle10"),
        "cycle9": write_dataset(root / "b", era="cycle9"),
    }


def spawn(page: Any, hub: Any, user: str, dataset: Path) -> None:
    page.goto(f"{hub.url}/hub/spawn")
    page.locator("input[name=dataset]").fill(str(dataset))
    page.locator(
        "form#spawn_form input[type=submit], form#spawn_form button[type=submit]"
    ).first.click()
    page.wait_for_url(re.compile(rf".*/user/{user}/.*"), timeout=60_000)


@pytest.fixture(scope="module")
def sessions(hub, browser, datasets) -> dict[str, Any]:
    """alice runs the cycle 10 dataset, bob the cycle 9 one, both spawned through the form."""
    pages = {}
    for user, era in (("alice", "cycle10"), ("bob", "cycle9")):
        page = oidc_login(browser, hub, user)
        spawn(page, hub, user, datasets[era])
        pages[user] = page
    return pages


@pytest.fixture(scope="module")
def operator(hub, browser, sessions) -> Any:
    return oidc_login(browser, hub, "olga")


def test_admin_page_shows_casa_build_interface_and_dataset(hub, operator, datasets):
    """JupyterHub 6 has a Profile column; JupyterHub 5 (z2jh 4.4's hub) shows user_options in the
    row's details."""
    operator.goto(f"{hub.url}/hub/admin")
    row = operator.locator("tr", has_text="alice").first
    row.wait_for()
    if JUPYTERHUB_MAJOR >= 6:
        text = row.inner_text()
        other = operator.locator("tr", has_text="bob").first.inner_text()
    else:
        for user in ("alice", "bob"):
            # Expand: the server model, user_options included.
            operator.locator("tr", has_text=user).first.locator("button").first.click()
        text = other = operator.locator("body").inner_text()
    assert f"{DRAINED_LABEL} · JupyterLab · {datasets['cycle10']}" in text
    assert OTHER_LABEL in other


def test_sessions_are_grouped_by_release_and_dataset(hub, operator, datasets):
    operator.goto(f"{hub.url}/services/casa-sessions/")
    operator.locator("#running").wait_for()
    group = operator.locator(f"section.release-group[data-release='{DRAINED}']")
    assert DRAINED_LABEL in group.locator("h3").inner_text()
    table = group.locator(f"table.dataset-group[data-dataset='{datasets['cycle10']}']")
    row = table.locator("tr.session[data-user='alice']")
    assert row.count() == 1
    assert re.fullmatch(r"\d+ (s|min)", row.locator("td.age").inner_text())
    assert re.fullmatch(r"\d+ (s|min) ago", row.locator("td.idle").inner_text())
    assert group.locator("tr.session[data-user='bob']").count() == 0
    other = operator.locator("section.release-group[data-release='pl-2022.2.0.64']")
    assert other.locator("tr.session[data-user='bob']").count() == 1


def test_non_operators_cannot_open_the_sessions_page(hub, sessions):
    page = sessions["bob"]
    response = page.goto(f"{hub.url}/services/casa-sessions/")
    assert response is not None and response.status == 403
    assert page.locator("tr.session").count() == 0


def wait_for_file(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text() if path.is_file() else ""
        if text in content:
            return content
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared in {path}: {content!r}")


def open_lab(page: Any, hub: Any, user: str) -> None:
    page.goto(f"{hub.url}/user/{user}/lab")
    page.locator("#jp-main-dock-panel").wait_for(timeout=60_000)


def toast(page: Any, text: str) -> Any:
    """The JupyterLab notification (toast) that says ``text``."""
    found = page.locator(".jp-toastContainer .Toastify__toast", has_text=text).first
    found.wait_for(timeout=30_000)
    return found


def test_idle_users_are_warned_in_their_session(hub, sessions):
    content = wait_for_file(hub.workdir / "home" / "bob" / NOTICE_FILE, "will be stopped at about")
    assert "This session has been idle since" in content
    assert "after 1 h 00 min without activity" in content
    # JupyterLab opened after the warning: it shows it as a notification straight away.
    open_lab(sessions["bob"], hub, "bob")
    text = toast(sessions["bob"], "will be stopped at about").inner_text()
    assert re.search(
        r"This idle session will be stopped at about \d\d:\d\d UTC unless you use it\.", text
    )


def test_sessions_never_ask_about_jupyter_news(hub, sessions):
    """casaspawner's JupyterLab setting defaults (overrides.d, a data file of the wheel) turn the
    news feed off, so JupyterLab does not ask "Would you like to get notified about official
    Jupyter news?" beside the notices."""
    # JupyterLab open, showing the cull warning (the test above).
    page = sessions["bob"]
    response = page.request.get(
        f"{hub.url}/user/bob/lab/api/settings/@jupyterlab/apputils-extension:notification"
    )
    assert response.ok
    assert response.json()["schema"]["properties"]["fetchNews"]["default"] == "false"
    open_lab(page, hub, "bob")
    toast(page, "will be stopped at about")
    # JupyterLab asks once its settings are loaded, by when the notices show.
    page.wait_for_timeout(3000)
    assert (
        page.locator(".jp-toastContainer .Toastify__toast", has_text="Jupyter news").count() == 0
    )
    assert "Jupyter news" not in page.locator("body").inner_text()


def test_drain_notifies_running_users_and_refuses_new_spawns(hub, operator, sessions, datasets):
    alice = sessions["alice"]
    # JupyterLab is open when the operator drains alice's release.
    open_lab(alice, hub, "alice")
    operator.goto(f"{hub.url}/services/casa-sessions/")
    row = operator.locator(f"tr.release[data-release='{DRAINED}']")
    row.locator("input[name=message]").fill(MESSAGE)
    row.locator("button[value=drain]").click()
    operator.locator("#flash").wait_for()
    row = operator.locator(f"tr.release[data-release='{DRAINED}']")
    assert "draining" in row.locator("td.state").inner_text()
    assert MESSAGE in row.locator("td.state").inner_text()
    assert "olga" in row.locator("td.state").inner_text()
    assert (
        operator.locator(f"section.release-group[data-release='{DRAINED}'] .badge.drained").count()
        == 1
    )

    # alice's open JupyterLab pops the notice up, and it is in the notice file (which the desktop
    # shows); bob's release is not drained.
    notification = toast(alice, "is being drained")
    assert f"{DRAINED_LABEL} is being drained: save your work" in notification.inner_text()
    # docs/operators.md shows it.
    if os.environ.get("CASASPAWNER_SCREENSHOTS"):
        # The notification has slid in.
        alice.wait_for_timeout(1000)
        alice.screenshot(path=str(SCREENSHOTS / "hub-notices.png"))
    # The notice file, with the full text.
    notification.get_by_role("button", name="Details").click()
    expected = (
        f"{DRAINED_LABEL}, which this session runs, is being drained by the operators: {MESSAGE}"
    )
    alice.locator(".jp-RenderedMarkdown", has_text=MESSAGE).first.wait_for()
    assert expected in alice.locator(".jp-RenderedMarkdown", has_text=MESSAGE).first.inner_text()
    notice = wait_for_file(hub.workdir / "home" / "alice" / NOTICE_FILE, "is being drained")
    assert expected in notice
    alice.goto(f"{hub.url}/user/alice/files/{NOTICE_FILE}")
    assert MESSAGE in alice.locator("body").inner_text()
    assert "drained" not in (hub.workdir / "home" / "bob" / NOTICE_FILE).read_text()

    # A new session of the drained release is refused on the form, with the operator's message.
    hub.api("DELETE", "/hub/api/users/alice/server")
    deadline = time.monotonic() + 30
    while hub.api("GET", "/hub/api/users/alice")["servers"] and time.monotonic() < deadline:
        time.sleep(0.5)
    alice.goto(f"{hub.url}/hub/spawn")
    alice.locator("input[name=dataset]").fill(str(datasets["cycle10"]))
    alice.locator(
        "form#spawn_form input[type=submit], form#spawn_form button[type=submit]"
    ).first.click()
    alice.wait_for_load_state("networkidle")
    body = alice.locator("body").inner_text()
    assert (
        f"{DRAINED_LABEL} is being drained by the operators and cannot be started now: {MESSAGE}"
        in body
    )
    assert not hub.api("GET", "/hub/api/users/alice")["servers"]

    # The other release still starts.
    spawn(alice, hub, "alice", datasets["cycle9"])


def test_retire_marks_the_release_in_the_catalog_view(hub, operator):
    operator.goto(f"{hub.url}/services/casa-sessions/")
    row = operator.locator("tr.release[data-release='pl-2020.1.0.40']")
    row.locator("button[value=retire]").click()
    operator.locator("#flash").wait_for()
    state = operator.locator("tr.release[data-release='pl-2020.1.0.40'] td.state").inner_text()
    assert "retired" in state and "draining" not in state


def test_notices_api_needs_a_user_token(hub):
    service = hub.env["CASA_SESSIONS_URL"]
    request = urllib.request.Request(f"{service}/services/casa-sessions/api/notices")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


def test_a_bad_release_action_is_one_sentence(hub, operator):
    operator.goto(f"{hub.url}/services/casa-sessions/")
    form = "tr.release[data-release='casa-4.2.2'] form"
    operator.evaluate(f"""() => {{
        const form = document.querySelector("{form}");
        const action = form.getAttribute("action");
        form.setAttribute("action", action.replace("casa-4.2.2", "casa-9.9.9"));
    }}""")
    with operator.expect_response(lambda r: "releases/casa-9.9.9" in r.url) as response:
        operator.locator(f"{form} button[value=drain]").click()
    assert response.value.status == 404
    assert "casa-9.9.9 is not a release in the catalog." in operator.locator("body").inner_text()
    assert "Traceback" not in operator.content()


def test_a_stale_form_is_refused_and_the_service_still_answers(hub, operator, sessions):
    """A form left open across a new login (its _xsrf no longer matches) is one 403 sentence.

    JupyterHub's HubOAuthenticated looked the user up again from inside its own xsrf check,
    waiting on itself: from then on the service answered nobody.
    """
    base = f"{hub.url}/services/casa-sessions"
    operator.goto(f"{base}/")
    context = operator.context
    context.clear_cookies(name="_xsrf")
    refused = context.request.post(
        f"{base}/releases/casa-4.2.2",
        form={"action": "retire", "_xsrf": "stale"},
        max_redirects=0,
        timeout=10_000,
    )
    assert refused.status == 403
    assert "This form was out of date" in refused.text()
    for path in ("/", "/api/sessions"):
        started = time.monotonic()
        answer = context.request.get(f"{base}{path}", timeout=5_000)
        assert answer.status == 200 and time.monotonic() - started < 1, path
        # Both say how old the sessions they show are (seconds since the hub was read).
        assert answer.headers.get("age", "").isdigit(), (path, answer.headers)


def test_a_script_drains_with_an_operators_token_and_no_xsrf(hub):
    made = hub.api(
        "POST",
        "/hub/api/users/olga/tokens",
        {"scopes": ["access:services!service=casa-sessions"], "note": "drain script"},
    )
    url = f"{hub.url}/services/casa-sessions/releases/casa-4.2.2"
    headers = {"Authorization": f"token {made['token']}"}
    for action in ("retire", "unretire"):
        request = urllib.request.Request(
            url, data=f"action={action}".encode(), method="POST", headers=headers
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        state = json.loads(Path(hub.env["CASASPAWNER_RELEASE_STATE"]).read_text())
        retired = state.get("releases", {}).get("casa-4.2.2", {}).get("retired", False)
        assert retired is (action == "retire")
    request = urllib.request.Request(url, data=b"action=retire", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403

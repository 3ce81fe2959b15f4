"""The whole user path on the embedded hub, in a real browser: log in, name the demo dataset, get CASA.

JupyterLab: a notebook in the CASA kernel opens the demo MeasurementSet with casatools. Desktop: the noVNC
canvas shows the CASA terminal, checked on the session's X server and on the canvas pixels. Screenshots go
to docs/_static/screenshots/ for the docs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Any

import pytest
from local_support import SCREENSHOTS, Hub, session_display, window_titles

from casaspawner import demo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DATASET = f"~/{demo.DEMO_SPEC.project}"


#: Keeps what the spawn-progress page showed (it reloads into the session when ready).
RECORD_PROGRESS = """
window.addEventListener('beforeunload', () => {
  const log = document.querySelector('#progress-log');
  if (log) sessionStorage.setItem('casa-progress', (sessionStorage.getItem('casa-progress') || '') + log.textContent);
});
"""


def login(browser: Any, hub: Hub) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.add_init_script(RECORD_PROGRESS)
    page.set_default_timeout(60_000)
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", demo.DEMO_USER)
    page.fill("#password_input", hub.password)
    page.click("#login_submit")
    page.wait_for_load_state()
    return page


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def submit_form(
    page: Any, hub: Hub, interface: str, dataset: str = DATASET, screenshot: str | None = None
) -> None:
    page.goto(f"{hub.url}/hub/spawn")
    page.fill("#casa-dataset", dataset)
    page.check(f"input[name=interface][value={interface}]")
    if screenshot:
        shot(page, screenshot)
    page.locator("form#spawn_form [type=submit]").click()


def test_lab_session_runs_casa_on_the_demo_ms(hub: Hub, browser: Any) -> None:
    hub.stop_server()
    page = login(browser, hub)
    assert "/hub/spawn" in page.url, "after login the user gets the spawn form"
    assert page.locator("#casa-local-note").is_visible()
    submit_form(page, hub, "lab", screenshot="local-spawn-form")

    # The progress page names the dataset, the build and the reason (from the pipeline manifest). With a
    # prepared environment it shows for a few seconds only; what it showed is kept when it navigates away.
    try:
        page.wait_for_function(
            "(document.querySelector('#progress-log') || {textContent: ''}).textContent.includes('manifest')",
            timeout=30_000,
        )
        page.locator("summary", has_text="Event log").click()
        shot(page, "local-progress")
    except Exception:  # already redirected to JupyterLab: the record below still has the events
        pass
    page.wait_for_url("**/lab**", timeout=900_000)
    events = page.evaluate("() => sessionStorage.getItem('casa-progress') || ''")
    assert f"Dataset {DATASET}: CASA 6.6.5-31, the exact build." in events, events
    assert "The pipeline manifest names CASA 6.6.5-31; CASA 6.6.5-31 is that build." in events, events
    page.locator(".jp-LauncherCard[title*='CASA 6.6.5-31']").first.click()
    page.wait_for_function(
        "(document.querySelector('.jp-Toolbar-kernelName') || {textContent: ''}).textContent.includes('CASA')",
        timeout=120_000,
    )
    assert page.locator(".jp-Toolbar-kernelName").first.inner_text().strip() == "CASA 6.6.5-31"
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.locator(".jp-Cell .cm-content").first.click()
    page.keyboard.type(
        "import casatools, glob, os\n"
        "ms = glob.glob(os.path.expanduser('~/2023.1.01234.S/**/*.ms'), recursive=True)[0]\n"
        "tb = casatools.table(); tb.open(ms)\n"
        "print('CASA', casatools.version_string(), 'rows', tb.nrows(), 'antennas', "
        "len(casatools.table(ms + '/ANTENNA').getcol('NAME')))"
    )
    page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-OutputArea-output").first
    output.wait_for(timeout=120_000)
    text = output.inner_text().strip()
    assert text == "CASA 6.6.5-31 rows 300 antennas 5", text
    shot(page, "local-lab-notebook")
    page.close()


def test_desktop_session_shows_a_casa_window(hub: Hub, browser: Any) -> None:
    hub.stop_server()
    page = login(browser, hub)
    # A returning user: the form resolves the last dataset and shows the build and the reason.
    page.goto(f"{hub.url}/hub/spawn")
    preview = page.locator("#casa-resolved").inner_text()
    assert preview == (
        f"{DATASET}: CASA 6.6.5-31, the exact build. The pipeline manifest names CASA 6.6.5-31; "
        "CASA 6.6.5-31 is that build."
    ), preview
    submit_form(page, hub, "desktop")
    page.wait_for_url("**/desktop/**", timeout=900_000)
    page.wait_for_function(
        "(document.querySelector('#status') || {}).textContent === 'Connected'", timeout=60_000
    )

    display, xauthority = session_display("jupyter-demo")
    deadline = time.monotonic() + 60
    titles: list[str] = []
    while time.monotonic() < deadline:
        titles = window_titles(display, xauthority)
        if "CASA 6.6.5-31" in titles and "CASA 6.6.5-31 tools" in titles:
            break
        time.sleep(1)
    assert "CASA 6.6.5-31" in titles, titles  # the CASA terminal (IPython with casatools/casatasks)
    assert "CASA 6.6.5-31 tools" in titles, titles  # the launcher for plotms, viewer and logger

    page.wait_for_timeout(6000)  # the terminal's CASA prompt comes up
    colours = page.evaluate(
        """() => {
          const c = document.querySelector('canvas');
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          const seen = new Set();
          for (let i = 0; i < d.length; i += 4 * 97) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
          return seen.size;
        }"""
    )
    assert colours > 8, f"the desktop canvas looks uniform ({colours} colours)"
    # The user starts plotms from the launcher: a click on its button on the noVNC canvas.
    _click_launcher_button(page, display, xauthority, "plotms")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and "PlotMS" not in window_titles(display, xauthority):
        time.sleep(1)
    assert "PlotMS" in window_titles(display, xauthority)
    page.wait_for_timeout(3000)
    shot(page, "local-desktop")
    page.close()


def _click_launcher_button(page: Any, display: str, xauthority: str, label: str) -> None:
    """Click a button of the "CASA … tools" window through the browser, where the X server says it is."""
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    tree = subprocess.run(
        ["xwininfo", "-tree", "-name", "CASA 6.6.5-31 tools"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    # children: "0x… (has no name): ()  61x25+134+37  +1146+67" — the buttons form the lowest row
    boxes = [
        tuple(int(v) for v in m.groups())
        for m in re.finditer(r"\(\)\s+(\d+)x(\d+)[+-]-?\d+[+-]-?\d+\s+\+(-?\d+)\+(-?\d+)", tree)
    ]
    row = max(b[3] for b in boxes)
    buttons = sorted((b for b in boxes if b[3] == row), key=lambda b: b[2])
    order = ["CASA terminal", "plotms", "viewer", "logger"]
    assert len(buttons) == len(order), tree
    width, height, x, y = buttons[order.index(label)]
    scale = page.evaluate(
        "() => { const c = document.querySelector('canvas'); return c.clientWidth / c.width; }"
    )
    box = page.locator("canvas").first.bounding_box()
    page.mouse.click(box["x"] + (x + width / 2) * scale, box["y"] + (y + height / 2) * scale)

"""The whole user path on the embedded hub, in a real browser: log in, name the demo dataset, get
CASA.

JupyterLab: a notebook in the CASA kernel opens the demo MeasurementSet with casatools. Desktop:
the noVNC canvas shows the CASA terminal once its CASA prompt is ready, checked on the session's X
server and on the canvas pixels inside that window; operator notices pop up; plotms starts from the
launcher. Screenshots go to docs/_static/screenshots/ for the docs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from support import SCREENSHOTS
from support.browser import password_login
from support.hub import Hub
from support.local import (
    argv_of,
    wait_for_display,
    wait_for_title,
    window_geometry,
    window_titles,
)

from casaspawner.catalog.model import Release
from casaspawner.local import demo
from casaspawner.local.demo import as_owner_of
from casaspawner.local.processes import descendants

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DATASET = f"~/{demo.DEMO_PROJECT}"
# xstartup's xsetroot colour.
DESKTOP_BACKGROUND = (0x24, 0x36, 0x4B)


#: Keeps what the spawn-progress page showed (it reloads into the session when ready): the event
#: log and the box above it.
RECORD_PROGRESS = """
window.addEventListener('beforeunload', () => {
  const log = document.querySelector('#progress-log');
  if (log) {
    const shown = sessionStorage.getItem('casa-progress') || '';
    sessionStorage.setItem('casa-progress', shown + log.textContent);
  }
  const box = document.querySelector('#casa-session');
  if (box && !box.hidden) {
    sessionStorage.setItem('casa-session', box.innerText);
  }
});
"""

#: What the user types into the notebook: short lines, so the screenshot shows whole lines.
NOTEBOOK_CELL = (
    "import casatools, glob, os\n"
    f"pattern = os.path.expanduser('~/{demo.DEMO_PROJECT}/**/*.ms')\n"
    "ms = glob.glob(pattern, recursive=True)[0]\n"
    "tb = casatools.table()\n"
    "tb.open(ms)\n"
    "rows = tb.nrows()\n"
    "tb.open(ms + '/ANTENNA')\n"
    "print('CASA', casatools.version_string(), 'rows', rows, 'antennas', tb.nrows())"
)


#: Typed at the desktop's CASA prompt: amplitude against uv distance of the demo MS, coloured by
#: antenna.
PLOTMS_COMMAND = (
    f"import glob; ms = glob.glob(os.path.expanduser('~/{demo.DEMO_PROJECT}/**/*.ms'), "
    "recursive=True)[0]; plotms(vis=ms, xaxis='uvdist', yaxis='amp', coloraxis='antenna1')"
)


def login(browser: Any, hub: Hub) -> Any:
    page = password_login(browser, hub, demo.DEMO_USER)
    # Recorded from the next page on: the spawn page's progress.
    page.add_init_script(RECORD_PROGRESS)
    return page


def wait_for_session(page: Any, path: str, timeout: float = 900) -> None:
    """Wait until the browser is in the session at ``path``; a failed spawn fails at once, with its
    message."""
    deadline = time.monotonic() + timeout
    while path not in urlparse(page.url).path:
        try:
            message = page.evaluate(
                "() => (document.querySelector('#progress-message') || {}).textContent || ''"
            )
        except Exception:
            # Navigating into the session.
            message = ""
        assert "Spawn failed" not in message, message
        assert time.monotonic() < deadline, f"no session after {timeout} s: {page.url}"
        page.wait_for_timeout(500)
    page.wait_for_load_state()


def shot(page: Any, name: str) -> None:
    if os.environ.get("CASASPAWNER_SCREENSHOTS"):
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


def test_lab_session_runs_casa_on_the_demo_ms(
    hub: Hub, browser: Any, demo_release: Release
) -> None:
    label = demo_release.label
    hub.stop_server()
    page = login(browser, hub)
    assert "/hub/spawn" in page.url, "after login the user gets the spawn form"
    assert page.locator("#casa-local-note").is_visible()
    assert page.locator("#casa-size").count() == 0, (
        "no session sizes: nothing limits a local session"
    )
    submit_form(page, hub, "lab")

    # The progress page names the dataset, the build and the reason (from the pipeline manifest)
    # above the event log, which stays closed. With a prepared environment it shows for a few
    # seconds only; what it showed is kept when it navigates away.
    try:
        page.locator("#casa-session:not([hidden])").wait_for(timeout=30_000)
        shot(page, "local-progress")
    except Exception:
        # Already redirected to JupyterLab: the record below still has it.
        pass
    wait_for_session(page, "/lab")
    events = page.evaluate("() => sessionStorage.getItem('casa-progress') || ''")
    assert f"Dataset {DATASET}: {label}, the exact build." in events, events
    assert f"The pipeline manifest names {label}; {label} is that build." in events, events
    box = page.evaluate("() => sessionStorage.getItem('casa-session') || ''")
    assert [line for line in box.splitlines() if line] == [
        f"Dataset {DATASET}: {label}, the exact build.",
        f"The pipeline manifest names {label}; {label} is that build.",
    ], box
    page.locator(f".jp-LauncherCard[title*='{label}']").first.click()
    page.wait_for_function(
        "(document.querySelector('.jp-Toolbar-kernelName') || {textContent: "
        "''}).textContent.includes('CASA')",
        timeout=120_000,
    )
    assert page.locator(".jp-Toolbar-kernelName").first.inner_text().strip() == label
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.locator(".jp-Cell .cm-content").first.click()
    page.keyboard.type(NOTEBOOK_CELL)
    page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-OutputArea-output").first
    output.wait_for(timeout=120_000)
    text = output.inner_text().strip()
    assert text == f"CASA {demo_release.casa} rows 300 antennas 5", text
    # JupyterLab asks whether to fetch Jupyter news a few seconds after it starts; sessions answer
    # "never".
    page.wait_for_timeout(3000)
    assert page.get_by_text("official Jupyter news").count() == 0, (
        "the Jupyter news question is shown"
    )
    names = page.locator(".jp-DirListing-itemName").all_inner_texts()
    # ~/arc: the storage root, as in a pod.
    assert demo.DEMO_PROJECT in names and "arc" in names, names
    # The cursor in the cell, not the new empty one.
    page.locator(".jp-Cell .cm-content").first.click()
    shot(page, "local-lab-notebook")
    page.close()


def test_desktop_session_shows_a_ready_casa_window(
    hub: Hub, browser: Any, demo_release: Release, demo_root: Path
) -> None:
    label = demo_release.label
    hub.stop_server()
    page = login(browser, hub)
    # A returning user: the form resolves the last dataset and shows the build and the reason.
    page.goto(f"{hub.url}/hub/spawn")
    preview = page.locator("#casa-resolved").inner_text()
    assert preview == (
        f"{DATASET}: {label}, the exact build. The pipeline manifest names {label}; {label} is "
        "that build."
    ), preview
    submit_form(page, hub, "desktop", screenshot="local-spawn-form")
    wait_for_session(page, "/desktop/")
    page.wait_for_function(
        "(document.querySelector('#status') || {}).textContent === 'Connected'", timeout=60_000
    )
    display, xauthority = wait_for_display(hub.session_pid())

    # The CASA terminal takes the build's name as its title only once casatools/casatasks are
    # loaded.
    titles = wait_for_title(display, xauthority, label)
    assert label in titles, titles
    # The launcher for plotms, viewer and logger.
    assert f"{label} tools" in titles, titles
    assert f"{label}: start-up failed" not in titles
    x, y, width, height = window_geometry(display, xauthority, label)
    # The canvas catches up with the X server.
    page.wait_for_timeout(1500)
    pixels = canvas_region(page, x, y, width, height)
    assert pixels["background"] < 0.02, (
        f"the CASA terminal's area shows the desktop background: {pixels}"
    )
    assert pixels["colours"] >= 2 and 0.005 < pixels["minority"] < 0.5, (
        f"no text in the CASA terminal: {pixels}"
    )

    # Operator notices: the file the hub keeps in the session's home pops up a window, and closing
    # follows.
    home = demo_root / "arc" / "home" / demo.DEMO_USER
    notices = home / "CASA-NOTICES.md"
    as_owner_of(
        home, notices.write_text, "CASA 6.5.4-9 is being replaced; save your work by 18:00.\n"
    )
    assert "CASA notices" in wait_for_title(display, xauthority, "CASA notices", timeout=20)
    as_owner_of(home, notices.unlink)
    deadline = time.monotonic() + 20
    while "CASA notices" in window_titles(display, xauthority) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "CASA notices" not in window_titles(display, xauthority)

    # The user types at the CASA prompt (through noVNC): plotms shows the demo MS.
    scale = page.evaluate(
        "() => { const c = document.querySelector('canvas'); return c.clientWidth / c.width; }"
    )
    box = page.locator("canvas").first.bounding_box()
    page.mouse.click(box["x"] + (x + width / 2) * scale, box["y"] + (y + height / 2) * scale)
    page.keyboard.type(PLOTMS_COMMAND + "\n", delay=5)
    assert "PlotMS" in wait_for_title(display, xauthority, "PlotMS", timeout=120)
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    subprocess.run(["wmctrl", "-r", "PlotMS", "-e", "0,575,40,700,490"], env=env, check=True)
    # plotms reads the MS and draws.
    page.wait_for_timeout(8000)
    shot(page, "local-desktop")

    # The launcher starts plotms too: a click on its button on the noVNC canvas. It opens the
    # session's MeasurementSet, and its window fits the screen, which noVNC sized to the browser.
    _click_launcher_button(page, display, xauthority, label, "plotms")
    deadline = time.monotonic() + 90
    while window_titles(display, xauthority).count("PlotMS") < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert window_titles(display, xauthority).count("PlotMS") == 2
    # The dataset's own MeasurementSet, not one a headless run of another test wrote beside it.
    ms = min(
        p for p in (home / demo.DEMO_PROJECT).rglob("*.ms") if "casaspawner-runs" not in p.parts
    )
    launched = [
        argv
        for argv in (argv_of(pid) for pid in descendants(hub.session_pid()))
        if argv and Path(argv[0]).name == "casaplotms" and f"vis={ms}" in argv
    ]
    assert len(launched) == 1, [argv_of(pid) for pid in descendants(hub.session_pid())]
    page.wait_for_timeout(2000)
    screen = _root_size(display, xauthority)
    canvas = page.evaluate(
        "() => [document.querySelector('canvas').width, document.querySelector('canvas').height]"
    )
    assert list(screen) == canvas and screen[0] <= 1400 and screen[1] <= 900, (screen, canvas)
    for x, y, width, height in _geometries(display, xauthority, "PlotMS"):
        assert min(x, y) >= 0 and x + width <= screen[0] and y + height <= screen[1], (
            (x, y, width, height),
            screen,
        )
    # CASA logs to one file in the home, however often it started there: the CASA terminal, and
    # both plotms, each plotting the demo MS's 9600 points (300 rows, 16 channels, 2 correlations).
    log = home / "casa.log"
    plotted = "PlotMS::plot\tPlotting 9600 unflagged points."
    deadline = time.monotonic() + 60
    while log.read_text(errors="replace").count(plotted) < 2:
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(1)
    assert "\tINFO\t::casa\t" in log.read_text(errors="replace")
    assert not list(home.glob("casa-*.log")), list(home.glob("casa-*.log"))
    page.close()


def _root_size(display: str, xauthority: str) -> tuple[int, int]:
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    out = subprocess.run(
        ["xwininfo", "-root"], capture_output=True, text=True, env=env, check=True
    ).stdout
    size = re.search(r"-geometry (\d+)x(\d+)", out)
    assert size is not None, out
    return int(size.group(1)), int(size.group(2))


def _geometries(display: str, xauthority: str, title: str) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) of every window the window manager lists titled ``title``."""
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    out = subprocess.run(
        ["wmctrl", "-lG"], capture_output=True, text=True, env=env, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 7)
        if len(parts) == 8 and parts[7] == title:
            found.append((int(parts[2]), int(parts[3]), int(parts[4]), int(parts[5])))
    return found


def canvas_region(page: Any, x: int, y: int, width: int, height: int) -> dict[str, float]:
    """Of the noVNC canvas pixels inside an X window: the share showing the desktop background, the
    number of distinct colours, and the share of all but the most common colour (text on the
    terminal)."""
    return page.evaluate(  # type: ignore[no-any-return]
        """([x, y, w, h, bg]) => {
          const c = document.querySelector('canvas');
          const d = c.getContext('2d').getImageData(x, y, w, h).data;
          const counts = new Map();
          let n = 0, background = 0;
          for (let i = 0; i < d.length; i += 4 * 3) {
            const rgb = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
            counts.set(rgb, (counts.get(rgb) || 0) + 1);
            if (rgb === ((bg[0] << 16) | (bg[1] << 8) | bg[2])) background++;
            n++;
          }
          const top = Math.max(...counts.values());
          return {background: background / n, colours: counts.size, minority: (n - top) / n};
        }""",
        [x, y, width, height, list(DESKTOP_BACKGROUND)],
    )


def _click_launcher_button(
    page: Any, display: str, xauthority: str, label: str, button: str
) -> None:
    """Click a button of the "CASA … tools" window through the browser.

    The button is where the X server says it is.
    """
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
    tree = subprocess.run(
        ["xwininfo", "-tree", "-name", f"{label} tools"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    # Children: "0x… (has no name): ()  61x25+134+37  +1146+67"; the buttons form the lowest
    # row.
    boxes = [
        tuple(int(v) for v in m.groups())
        for m in re.finditer(r"\(\)\s+(\d+)x(\d+)[+-]-?\d+[+-]-?\d+\s+\+(-?\d+)\+(-?\d+)", tree)
    ]
    row = max(b[3] for b in boxes)
    buttons = sorted((b for b in boxes if b[3] == row), key=lambda b: b[2])
    order = ["CASA terminal", "plotms", "viewer", "logger"]
    assert len(buttons) == len(order), tree
    width, height, x, y = buttons[order.index(button)]
    scale = page.evaluate(
        "() => { const c = document.querySelector('canvas'); return c.clientWidth / c.width; }"
    )
    box = page.locator("canvas").first.bounding_box()
    page.mouse.click(box["x"] + (x + width / 2) * scale, box["y"] + (y + height / 2) * scale)

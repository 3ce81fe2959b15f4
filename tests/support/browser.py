"""Debian's Chromium through Playwright (which never downloads a browser here), and the OIDC login.

The ``hub`` and ``local`` tiers and the login benchmark launch the same browser the same way; the
``local`` and ``k8s`` tiers choose from a CASA desktop's menu through noVNC the same way.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import SCREENSHOTS

#: Debian's Chromium; ``make deps`` installs it.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium, through Playwright's sync API; closed on leaving."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


def oidc_login(browser: Any, hub: Any, username: str) -> Any:
    """A new page logged in to the hub as ``username`` through the OIDC provider's own form."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{hub.url}/hub/login")
    page.locator("a[href*='oauth_login']").click()
    page.wait_for_url("**/oauth2/authorize**")
    page.get_by_placeholder("sub").fill(username)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_load_state("networkidle")
    return page


def password_login(browser: Any, hub: Any, username: str, init_script: str | None = None) -> Any:
    """A laptop-sized page of ``browser``, logged in to ``hub`` as ``username`` by password.

    ``init_script`` runs in every document the page loads, from the login page on.
    """
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    if init_script:
        page.add_init_script(init_script)
    page.set_default_timeout(60_000)
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", username)
    page.fill("#password_input", hub.password)
    page.click("#login_submit")
    page.wait_for_load_state()
    return page


def menu_commands(xml: str, label: str) -> dict[str, list[str]]:
    """The apps of the pipe menu's submenu ``label``: {app label: command, split}."""
    menu = ET.fromstring(xml)
    (submenu,) = [m for m in menu.findall("menu") if m.get("label") == label]
    return {
        item.get("label") or "": shlex.split(item.findtext(".//command") or "")
        for item in submenu.findall("item")
    }


def screenshot_path(name: str, tmp_path: Path) -> Path:
    """Where a screenshot goes: the docs' directory when asked (``CASASPAWNER_SCREENSHOTS``)."""
    target = SCREENSHOTS / name if os.environ.get("CASASPAWNER_SCREENSHOTS") else tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def choose_from_menu(
    page: Any,
    at: tuple[int, int],
    release_row: int,
    app_row: int,
    screenshot: Path | None = None,
) -> None:
    """Right-click the desktop at ``at`` (a free spot of the screen) through noVNC, and choose
    Other CASA releases, the release in ``release_row`` and its app in ``app_row``, by keyboard
    as a user may: ``o`` opens Other CASA releases (openbox's first-letter shortcut), arrows move.
    """
    scale = page.evaluate(
        "() => { const c = document.querySelector('canvas'); return c.clientWidth / c.width; }"
    )
    box = page.locator("canvas").first.bounding_box()
    page.mouse.click(box["x"] + at[0] * scale, box["y"] + at[1] * scale, button="right")
    page.wait_for_timeout(700)
    page.keyboard.press("o")
    page.wait_for_timeout(700)
    for _ in range(release_row):
        page.keyboard.press("ArrowDown")
        page.wait_for_timeout(300)
    page.keyboard.press("ArrowRight")
    page.wait_for_timeout(500)
    for _ in range(app_row):
        page.keyboard.press("ArrowDown")
        page.wait_for_timeout(300)
    if screenshot is not None:
        # The canvas catches up with the X server.
        page.wait_for_timeout(1000)
        page.locator("canvas").first.screenshot(path=str(screenshot))
    page.keyboard.press("Enter")

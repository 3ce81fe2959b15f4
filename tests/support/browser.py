"""Debian's Chromium through Playwright (which never downloads a browser here), and the OIDC login.

The ``hub`` and ``local`` tiers and the login benchmark launch the same browser the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

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

"""Browser helpers shared by the hub tests (imported by test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import socket
from typing import Any

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright never downloads a browser here
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def login(browser: Any, hub: Any, username: str) -> Any:
    """A new browser context logged in to the hub as ``username`` through the OIDC provider's own form."""
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

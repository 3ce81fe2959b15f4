"""Browser helpers shared by the hub tests (imported by test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import socket
from pathlib import PurePosixPath
from typing import Any

#: What a wheel install of casaspawner puts beside the package (setup.cfg data_files, relative to the
#: environment's prefix) and the sessions need; ``make hub-dev-install`` links them into the development venv.
LAB_OVERRIDES = PurePosixPath("share/jupyter/lab/settings/overrides.d/casaspawner.json")
SESSION_DATA_FILES = (
    PurePosixPath("share/jupyter/labextensions/casaspawner-notices/package.json"),
    PurePosixPath("etc/jupyter/jupyter_server_config.d/casaspawner.json"),
    LAB_OVERRIDES,
)
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

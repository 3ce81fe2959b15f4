"""Browser helpers shared by the hub tests (imported by test modules; fixtures live in conftest.py)."""

from __future__ import annotations

from typing import Any


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

"""OIDC login for real: JupyterHub + GenericOAuthenticator (hub-config/jupyterhub_config.py)
against oidc-provider-mock, through headless Chromium; then the login's auth_state through
CASASpawner."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from support.browser import oidc_login
from support.z2jh import chart_config, chart_data, load_values, merge

from casaspawner.datasets.synth import write_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hub(hub_factory):
    return hub_factory()


@pytest.fixture(scope="module")
def alice(hub, browser) -> dict[str, Any]:
    """alice logged in through the browser; her hub model with auth_state."""
    page = oidc_login(browser, hub, "alice")
    assert page.url.endswith("/hub/spawn"), page.url
    # The spawn form is casaspawner's (the dataset field), rendered for the freshly logged-in user.
    assert page.locator("input[name=dataset]").count() == 1
    page.context.close()
    return hub.api("GET", "/hub/api/users/alice")


def test_groups_become_hub_groups(hub, alice):
    assert sorted(alice["groups"]) == ["alma-users", "proj-m87"]
    assert alice["admin"] is False


def test_auth_state_carries_identity_and_token(alice):
    state = alice["auth_state"]
    user = state["oauth_user"]
    assert (user["uid"], user["gid"], user["groups"], user["gids"]) == (
        41001,
        41001,
        ["alma-users", "proj-m87"],
        [52001],
    )
    assert isinstance(state["access_token"], str) and len(state["access_token"]) > 20


def test_operators_group_gets_the_operators_role(hub, browser):
    page = oidc_login(browser, hub, "olga")
    page.context.close()
    group = hub.api("GET", "/hub/api/groups/casa-operators")
    assert "olga" in group["users"]
    assert group["roles"] == ["casa-operators"]


def test_user_outside_allowed_groups_is_refused(hub, browser):
    page = oidc_login(browser, hub, "eve")
    text = page.locator("body").inner_text()
    assert "403" in text
    assert "not in a group allowed to use this CASA hub (alma-users, hub-admins)" in text
    page.context.close()
    with pytest.raises(Exception, match="404"):
        hub.api("GET", "/hub/api/users/eve")


def test_the_token_stays_with_the_hub_until_the_session_fetches_it(hub, alice, tmp_path):
    """alice's real auth_state through CASASpawner configured by the z2jh values: identity from the
    OIDC claims in the pod, the access token kept by the hub for the session to fetch — never in
    the pod spec, its environment or the hub log."""
    kube = pytest.importorskip("casaspawner.kube.spawner")

    from casaspawner.kube.dryrun import _DryRunUser, _offline_kubernetes
    from casaspawner.session.readers import LocalDirectoryReader

    token = alice["auth_state"]["access_token"]
    _, defaults = chart_data()
    config = chart_config(
        merge(load_values(), {"custom": {"casaspawner": {"stateFile": str(tmp_path / "s.json")}}}),
        defaults,
    )
    config.CASASpawner.storage_hub_path = None
    dataset = write_dataset(tmp_path / "data", era="cycle10")

    async def build() -> tuple[Any, dict[str, Any]]:
        spawner = kube.CASASpawner(
            _mock=True, user=_DryRunUser("alice", alice["auth_state"]), config=config
        )
        spawner.dataset_reader = LocalDirectoryReader()
        spawner.user_options = {"dataset": str(dataset), "interface": "lab"}
        await spawner.prepare_session()
        return spawner, await spawner.session_manifests()

    # Playwright's sync API owns this thread's event loop: run the spawner in a thread of its own.
    with _offline_kubernetes(), ThreadPoolExecutor(1) as pool:
        spawner, pod = pool.submit(asyncio.run, build()).result()

    spec = pod["spec"]
    labels = pod["metadata"]["labels"]
    # The hub's NetworkPolicy admits it.
    assert labels["hub.jupyter.org/network-access-hub"] == "true"
    assert labels["casaspawner.io/release"] == "pl-2023.1.0.124"
    assert labels["casaspawner.io/session"] == "true"
    assert spec["securityContext"]["runAsUser"] == 41001
    assert spec["securityContext"]["runAsGroup"] == 41001
    assert 52001 in spec["securityContext"]["supplementalGroups"]
    container = next(c for c in spec["containers"] if c["name"] == "notebook")
    assert any(m["mountPath"] == "/arc/projects/proj-m87" for m in container["volumeMounts"])
    token_mount = next(
        m for m in container["volumeMounts"] if m["mountPath"] == spawner.token_mount_dir
    )
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CASASPAWNER_TOKEN_FILE"] == f"{token_mount['mountPath']}/token"
    assert env["CASASPAWNER_TOKEN_URL"].endswith("/casa-token/alice/")
    assert spawner.access_token == token
    assert env["CASASPAWNER_NOTICES_URL"] == "http://hub:10101/services/casa-sessions/api/notices"
    # Not in the spec, the environment or the annotations.
    assert token not in json.dumps(pod)
    assert all(token not in json.dumps(env) for env in container.get("env", []))
    assert token not in hub.log()
    assert alice["auth_state"]["refresh_token"] not in hub.log()


def test_admins_manage_the_hub_but_cannot_enter_sessions(hub, browser, tmp_path):
    """hub-admins get the casa-admins role: the admin page and servers, but not users' sessions or
    tokens."""
    dataset = write_dataset(tmp_path / "data", era="cycle9")
    # bob's session, started through the form.
    page = oidc_login(browser, hub, "bob")
    page.goto(f"{hub.url}/hub/spawn")
    page.locator("input[name=dataset]").fill(str(dataset))
    page.locator(
        "form#spawn_form input[type=submit], form#spawn_form button[type=submit]"
    ).first.click()
    page.wait_for_url("**/user/bob/**", timeout=60_000)
    page.context.close()

    admin = oidc_login(browser, hub, "ada")
    model = hub.api("GET", "/hub/api/users/ada")
    assert model["admin"] is False and model["groups"] == ["hub-admins"]
    assert hub.api("GET", "/hub/api/groups/hub-admins")["roles"] == ["casa-admins"]
    admin.goto(f"{hub.url}/hub/admin")
    # The admin page lists users and servers.
    admin.locator("tr", has_text="bob").first.wait_for()
    # But bob's session stays closed to admins: its API, and its pages through the hub's OAuth.
    response = admin.goto(f"{hub.url}/user/bob/api/contents")
    assert response is not None and response.status == 403
    response = admin.goto(f"{hub.url}/user/bob/lab")
    assert response is not None and response.status == 403
    assert "jp-LabShell" not in admin.content()
    hub.api("DELETE", "/hub/api/users/bob/server")
    admin.context.close()


def test_admins_cannot_touch_the_proxy(hub, browser):
    """JupyterHub's admin page never calls /hub/api/proxy, so casa-admins lack the ``proxy`` scope:
    it would let them read the routing table (every session's address) and repoint the hub's proxy
    API (PATCH), which breaks every session's route. Called from the admin page as its own requests
    are (session cookie, XSRF token)."""
    admin = oidc_login(browser, hub, "ada")
    admin.goto(f"{hub.url}/hub/admin")
    admin.locator("tr", has_text="ada").first.wait_for()

    def status(method: str, path: str) -> int:
        return int(
            admin.evaluate(
                """async ([method, url]) => (await fetch(url, {
                    method, headers: {"X-XSRFToken": window.jhdata.xsrf_token},
                })).status""",
                [method, f"{hub.url}/hub/api{path}"],
            )
        )

    # What the admin page itself asks works from here.
    assert status("GET", "/users") == 200
    assert status("GET", "/proxy") == 403
    assert status("POST", "/proxy") == 403
    # With the scope: 400, for the empty body (nothing repointed).
    assert status("PATCH", "/proxy") == 403
    admin.context.close()

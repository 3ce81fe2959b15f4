"""Idle culling for real: jupyterhub-idle-culler runs as a hub-managed service with its least-privilege role,
and the user is warned inside the session before the culler stops it."""

from __future__ import annotations

import time

import pytest
from hub_helpers import login

from casaspawner.datasets.synth import write_dataset
from casaspawner.services.session_notices import NOTICE_FILE

pytestmark = pytest.mark.integration


def test_idle_session_is_warned_then_culled(hub_factory, browser):
    hub = hub_factory(CASA_CULL_TIMEOUT="8", CASA_CULL_EVERY="2", CASA_CULL_WARN_BEFORE="6")
    page = login(browser, hub, "bob")  # auth_state (uid, gid, groups) comes from this login
    page.context.close()
    dataset = write_dataset(hub.workdir / "data", era="cycle9")
    # The options as the body: JupyterHub 5's shape, which 6 still accepts.
    hub.admin("/users/bob/server", method="POST", body={"dataset": str(dataset)})

    notice = hub.workdir / "home" / "bob" / NOTICE_FILE
    warned_at = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if warned_at is None and notice.is_file() and "will be stopped at about" in notice.read_text():
            warned_at = time.monotonic()
        if not hub.admin("/users/bob")["servers"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the idle session was never culled")
    assert warned_at is not None, "the user was not warned before the culler stopped the session"
    assert "DELETE /hub/api/users/bob/server (jupyterhub-idle-culler@127.0.0.1)" in hub.log()
    culler = hub.admin("/services/jupyterhub-idle-culler")
    assert culler["roles"] == ["jupyterhub-idle-culler"]

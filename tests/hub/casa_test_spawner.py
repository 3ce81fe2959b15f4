"""The spawner of the hub browser tests: the real CASA session logic on a plain local Jupyter server.

``CASASessionMixin`` does everything a CASA spawner decides — the form, option validation, identity from the
OIDC ``auth_state``, dataset resolution, drained-release refusal, the plan and the summary the admin pages
show. The session itself is ``jupyterhub-singleuser`` as the hub's own user (no CASA build is
installed), which is all the hub-side tests need; the token path of the real spawners is checked with
``CASASpawner``'s own pod and Secret builders in ``test_login.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jupyterhub.spawner import SimpleLocalProcessSpawner

from casaspawner.session.readers import LocalDirectoryReader
from casaspawner.spawners.mixin import CASASessionMixin


class HubTestSpawner(CASASessionMixin, SimpleLocalProcessSpawner):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dataset_reader = LocalDirectoryReader()

    async def start(self) -> Any:
        plan = await self.prepare_session()
        self.apply_plan(plan)
        self.default_url = "/tree"  # the tests open /lab or /desktop/ themselves
        xstartup = os.environ.get("CASA_TEST_XSTARTUP")
        if xstartup and "JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP" in self.environment:  # a desktop session
            self.environment["JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP"] = xstartup
        notices = self.environment.get("CASASPAWNER_NOTICES_FILE")
        if notices:  # the plan's home (/arc/home/<user>) is home_dir here
            self.environment["CASASPAWNER_NOTICES_FILE"] = str(Path(self.home_dir) / Path(notices).name)
        if os.geteuid() == 0:
            self.args = [*self.args, "--allow-root"]
        url = await super().start()
        self.record_session(plan)
        return url

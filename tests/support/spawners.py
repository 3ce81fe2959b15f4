"""The CASA spawners' shared hub side on JupyterHub's own spawners, and a refusal's one sentence.

- :class:`MixinSpawner` is ``CASASessionMixin`` on JupyterHub's base ``Spawner``: everything a
  CASA spawner decides before a session starts (options, identity, the dataset, the form, state),
  with no backend. It never starts anything.
- :class:`HubTestSpawner` is the spawner of the hub browser tests: the real session logic on a
  plain local Jupyter server. ``tests/hub/jupyterhub_config.py`` loads it into the hub process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jupyterhub.spawner import SimpleLocalProcessSpawner, Spawner

from casaspawner.session.readers import LocalDirectoryReader
from casaspawner.spawners.errors import SpawnException
from casaspawner.spawners.mixin import CASASessionMixin


class MixinSpawner(CASASessionMixin, Spawner):  # type: ignore[misc]
    """The mixin with no backend: the tests plan sessions and render forms, never start one."""

    async def start(self) -> Any:
        raise NotImplementedError("MixinSpawner plans sessions; it starts none")

    async def stop(self, now: bool = False) -> None:
        return None

    async def poll(self) -> int | None:
        return None


class HubTestSpawner(CASASessionMixin, SimpleLocalProcessSpawner):  # type: ignore[misc]
    """The real CASA session logic on a plain local Jupyter server.

    ``CASASessionMixin`` does everything a CASA spawner decides: the form, option validation,
    identity from the OIDC ``auth_state``, dataset resolution, drained-release refusal, the plan
    and the summary the admin pages show. The session itself is ``jupyterhub-singleuser`` as the
    hub's own user (no CASA build is installed), which is all the hub-side tests need; the token
    path of the real spawners is checked with ``CASASpawner``'s own pod and Secret builders in
    ``tests/hub/test_login.py``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dataset_reader = LocalDirectoryReader()

    async def start(self) -> Any:
        plan = await self.prepare_session()
        self.apply_plan(plan)
        # The tests open /lab or /desktop/ themselves.
        self.default_url = "/tree"
        xstartup = os.environ.get("CASA_TEST_XSTARTUP")
        # A desktop session: the test's own desktop start script.
        if xstartup and "JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP" in self.environment:
            self.environment["JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP"] = xstartup
        notices = self.environment.get("CASASPAWNER_NOTICES_FILE")
        # The plan's home (/arc/home/<user>) is home_dir here.
        if notices:
            self.environment["CASASPAWNER_NOTICES_FILE"] = str(
                Path(self.home_dir) / Path(notices).name
            )
        if os.geteuid() == 0:
            self.args = [*self.args, "--allow-root"]
        url = await super().start()
        self.record_session(plan)
        return url


def sentence(exc: SpawnException) -> str:
    """The one sentence a user sees (form error, progress page), after checking that it is one."""
    message: str = exc.jupyterhub_message
    assert "\n" not in message and message.endswith((".", "?")) and len(message) < 400, message
    assert exc.status_code == 400
    return message


async def refused(spawner: CASASessionMixin, options: dict[str, Any]) -> str:
    """The sentence refusing ``options`` (the test fails when they are accepted)."""
    try:
        await spawner._run_apply_user_options(options)
    except SpawnException as exc:
        return sentence(exc)
    raise AssertionError(f"{options} were accepted")

"""LocalCASASpawner's own decisions, without a hub: the plan's paths, identity, and refusing or approximating
a release this machine cannot install (the operator's ``allow_approximate``)."""

from __future__ import annotations

import asyncio
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from casaspawner import demo
from casaspawner.datasets.synth import write_dataset
from casaspawner.spawners.local import DESKTOP_DIR, LocalCASASpawner

pytestmark = pytest.mark.integration  # as root, the first use creates the local account jupyter-demo


class User:
    """The parts of JupyterHub's User a spawner reads before it starts."""

    name = "demo"
    groups: list[Any] = []
    url = "/user/demo/"
    state = None

    async def get_auth_state(self) -> None:
        return None


def spawner(storage: Path, **traits: Any) -> LocalCASASpawner:
    traits = {
        "storage_root": str(storage),
        "tarball_mirror": "http://127.0.0.1:9/",
        "probe_timeout": 2,
        **traits,
    }
    return LocalCASASpawner(user=User(), **traits)


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    home = tmp_path / "arc" / "home" / "demo"
    write_dataset(home, era="cycle10")  # CASA 6.5.4-9, pipeline 2023.1.0.124: a tarball-only build
    return tmp_path / "arc"


def test_unreachable_exact_build_is_refused_with_the_reason(storage: Path) -> None:
    local = spawner(storage)
    with pytest.raises(Exception) as caught:
        asyncio.run(local.prepare_session({"dataset": "~/2023.1.00026.S", "interface": "desktop"}))
    message = getattr(caught.value, "jupyterhub_message", str(caught.value))
    assert message.startswith(
        "CASA 6.5.4-9 (pipeline 2023.1.0.124) cannot be installed on this hub: its tarball "
        "http://127.0.0.1:9/casa-6.5.4-9-pipeline-2023.1.0.124-py3.8.tar.xz is unreachable ("
    ), message
    assert message.endswith(".") and "\n" not in message


def test_approximation_when_allowed_is_marked_everywhere(storage: Path) -> None:
    local = spawner(storage, allow_approximate=True)
    plan = asyncio.run(local.prepare_session({"dataset": "~/2023.1.00026.S", "interface": "desktop"}))
    assert plan.approximate and not plan.exact
    assert plan.release.role == "modular"
    assert plan.kernel_name.endswith(" (approximate)")
    assert plan.reason.endswith("(the dataset calls for CASA 6.5.4-9 (pipeline 2023.1.0.124)).")
    assert local.user_options["profile"].endswith("approximate")
    assert local.environment["CASASPAWNER_APPROXIMATE"] == "true"
    assert local.environment["CASASPAWNER_REASON"] == plan.reason
    assert local.environment["JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP"] == str(DESKTOP_DIR / "xstartup")
    assert local.default_url == "/desktop/"
    assert "approximate" in local.render_options_form()


def test_plan_paths_are_local_paths_and_identity_is_never_root(storage: Path) -> None:
    local = spawner(storage)
    write_dataset(storage / "home" / "demo", spec=demo.DEMO_SPEC)  # modular CASA 6.6.5-31: installable here
    plan = asyncio.run(local.prepare_session({"dataset": f"{storage}/home/demo/{demo.DEMO_SPEC.project}"}))
    assert plan.exact and not plan.approximate
    assert plan.home == str(storage / "home" / "demo")
    assert local.environment["HOME"] == plan.home and local.notebook_dir == plan.home
    assert plan.identity.uid != 0
    if os.geteuid() == 0:
        account = pwd.getpwnam("jupyter-demo")
        assert (plan.identity.uid, plan.identity.gid) == (account.pw_uid, account.pw_gid)
    else:
        assert plan.identity.uid == os.getuid()


def test_form_previews_the_last_dataset_and_says_it_will_be_approximate(storage: Path) -> None:
    local = spawner(storage, allow_approximate=True)
    assert asyncio.run(local.resolution_preview()) == ""  # nothing to preview on a first visit
    local.user_options = {"dataset": "~/2023.1.00026.S"}
    preview = asyncio.run(local.resolution_preview())
    assert preview.startswith(
        '<p class="casa-help" id="casa-resolved" role="status">~/2023.1.00026.S: CASA 6.5.4-9'
    )
    assert "cannot be installed on this hub" in preview
    assert preview.rstrip().endswith(
        "The session will run the nearest installable release, marked approximate.</p>"
    )

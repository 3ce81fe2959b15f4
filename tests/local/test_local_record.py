"""Every local session writes its reproducibility record into the user's home, as the user.

Driven through the test hub's REST API (conftest.py): the demo dataset in a real session, whose
Jupyter server writes the record when it starts and completes it when it stops; a session killed
outright has its record completed by the hub, as the user.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jupyterhub
import pytest
from support.hub import Hub

import casaspawner
from casaspawner.catalog.model import Release
from casaspawner.insession import record as insession
from casaspawner.insession.record import local_path
from casaspawner.local import demo
from casaspawner.local.environments import CasaEnvironment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def records(home: Path) -> set[Path]:
    return set((home / ".casaspawner" / "sessions").glob("*/ro-crate-metadata.json"))


def entities(path: Path) -> dict[str, dict[str, Any]]:
    return {item["@id"]: item for item in json.loads(path.read_text())["@graph"]}


def wait_for(path_set: Any, check: Any, timeout: float = 60) -> Any:
    """The first value of ``path_set()`` that passes ``check``, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = path_set()
        if found is not None and check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing passed the check in {timeout} s: {found}")
        time.sleep(0.5)


def new_record(home: Path, before: set[Path]) -> Path:
    def one() -> Path | None:
        fresh = records(home) - before
        return next(iter(fresh)) if len(fresh) == 1 else None

    # Written first, then the evidence's sha256 and the measures' version are added.
    return wait_for(
        one, lambda p: "sha256" in entities(p)["#evidence"] and entities(p)["#measures"]
    )


@pytest.fixture
def home(demo_root: Path) -> Path:
    return demo_root / "arc" / "home" / demo.DEMO_USER


def test_a_session_writes_its_record_and_completes_it_when_stopped(
    hub: Hub, home: Path, demo_env: CasaEnvironment, demo_release: Release
) -> None:
    hub.stop_server()
    before = records(home)
    hub.spawn({"dataset": f"~/{demo.DEMO_PROJECT}", "interface": "lab"})
    path = new_record(home, before)
    # Written by the session, as the session's user.
    owner = path.stat().st_uid
    assert owner == home.stat().st_uid and (owner != 0 or os.geteuid() != 0)
    assert path.parent.parent == home / ".casaspawner" / "sessions"
    assert path.parent.name.endswith(f"-{demo.DEMO_PROJECT}")
    graph = entities(path)
    action = graph["#session"]
    assert action["@type"] == "CreateAction" and "endTime" not in action
    assert action["actionStatus"]["@id"].endswith("ActiveActionStatus")
    assert graph["#casa"]["softwareVersion"] == demo_release.casa
    assert graph["#dataset"]["identifier"] == f"~/{demo.DEMO_PROJECT}"
    evidence = graph["#evidence"]
    evidence_file = local_path(evidence["contentUrl"])
    assert evidence_file is not None and evidence_file.is_relative_to(home / demo.DEMO_PROJECT)
    assert evidence["sha256"] == hashlib.sha256(evidence_file.read_bytes()).hexdigest()
    # The environment by the content hash of its package list, as the hub computed it.
    assert {"@id": "#runtime"} in action["instrument"]
    assert graph["#runtime"]["sha256"] == demo_env.content_digest()
    assert graph["#runtime"]["identifier"] == str(demo_env.root)
    version = graph["#measures"]["version"]
    infos = sorted(demo_env.measures.parent.parent.glob("casadata-*.dist-info"))
    if infos:
        assert version == "casadata " + infos[-1].name[len("casadata-") : -len(".dist-info")]
    else:
        assert version
    assert graph["#jupyterhub"]["softwareVersion"] == jupyterhub.__version__
    assert graph["#casaspawner"]["softwareVersion"] == casaspawner.__version__

    # The session's own token reads its server's model (where a pod's image digest is noted).
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{hub.session_pid()}/environ").read_text().split("\0")
        if "=" in item
    )
    request = urllib.request.Request(
        f"{environ['JUPYTERHUB_API_URL']}/users/{demo.DEMO_USER}",
        headers={"Authorization": f"token {environ['JUPYTERHUB_API_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        model = json.loads(response.read())
    assert model["servers"][""]["user_options"]["casaspawner"]["release"] == demo_release.id
    # No digest on one machine: the session asks and finds none.
    assert insession.hub_image_digest(environ) is None

    hub.stop_server()
    action = wait_for(lambda: entities(path)["#session"], lambda a: "endTime" in a, 30)
    assert action["actionStatus"]["@id"].endswith("CompletedActionStatus")
    assert action["endTime"] >= action["startTime"]
    assert path.stat().st_uid == owner


def test_a_killed_session_has_its_record_completed_by_the_hub_as_the_user(
    hub: Hub, home: Path
) -> None:
    hub.stop_server()
    before = records(home)
    hub.spawn({"dataset": f"~/{demo.DEMO_PROJECT}", "interface": "lab"})
    path = new_record(home, before)
    owner = path.stat().st_uid
    os.kill(hub.session_pid(), signal.SIGKILL)
    hub.stop_server()
    try:
        action = wait_for(lambda: entities(path)["#session"], lambda a: "endTime" in a, 30)
    except AssertionError:
        raise AssertionError(hub.log()[-4000:]) from None
    assert action["actionStatus"]["@id"].endswith("CompletedActionStatus")
    assert path.stat().st_uid == owner


def test_a_past_session_is_relaunched_with_the_same_environment(
    hub: Hub, home: Path, demo_env: CasaEnvironment
) -> None:
    """The hub keeps the session it ran; relaunching it runs the same dataset and options in the
    environment of the same content hash, whatever else the request names."""
    hub.stop_server()
    before = records(home)
    hub.spawn({"dataset": f"~/{demo.DEMO_PROJECT}", "interface": "lab"})
    first = new_record(home, before)
    hub.stop_server()
    before = records(home)
    name = first.parent.name
    server = hub.spawn({"relaunch": name, "dataset": "~/elsewhere", "interface": "desktop"})
    again = new_record(home, before)
    output = server["user_options"]["casaspawner"]
    assert (output["dataset"], output["interface"]) == (f"~/{demo.DEMO_PROJECT}", "lab")
    assert server["user_options"]["relaunch"] == name
    runtime = entities(again)["#runtime"]["sha256"]
    assert runtime == entities(first)["#runtime"]["sha256"] == demo_env.content_digest()
    hub.stop_server()
    # A past session this server never ran is one sentence, and starts nothing.
    with pytest.raises(urllib.error.HTTPError) as refused:
        hub.api(
            "POST",
            f"/hub/api/users/{demo.DEMO_USER}/server",
            {"user_options": {"relaunch": "gone"}},
        )
    assert refused.value.code == 400
    message = json.loads(refused.value.read())["message"]
    assert message.startswith("There is no past session 'gone' of yours to relaunch")
    assert hub.server() is None

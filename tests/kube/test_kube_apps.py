"""An app of another release on a Kubernetes desktop (kube/apps.py, casa_releases.py), pure.

The app's pod for alice's desktop, checked against the Kubernetes schema and the restricted Pod
Security Standard (the independent checker and casaspawner's), and for what it carries; the
two NetworkPolicies and whom they select; the tools each release's image has; the desktop's
side of a launch: the cookie it shares and the hub's refusal it shows. The real pods on the
real cluster, drawing on a real desktop, are tests/k8s/test_browser.py's.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from support.pss import restricted_violations
from support.servers import serving

from casaspawner.catalog import Catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import write_dataset
from casaspawner.insession.desktop import casa_releases
from casaspawner.kube import apps
from casaspawner.kube.desktopapps import last_line
from casaspawner.kube.objects import PodSettings, security_contexts
from casaspawner.kube.podsecurity import pod_security_violations
from casaspawner.plan import Identity, SessionOptions, SessionPlan, make_plan

K8S_VERSION = kubernetes_validate.latest_version()
SESSION = apps.SessionPod(
    "jupyter-alice",
    "0b7c6a51-1c1f-4f57-9a3e-2f0d1c2b3a4d",
    "10.244.0.17",
    {
        "hub.jupyter.org/username": "alice",
        "hub.jupyter.org/servername": "",
        "component": "singleuser-server",
        "app.kubernetes.io/component": "singleuser-server",
        "casaspawner.io/release": "casa-6.6.5-31",
    },
    image="ghcr.io/casaspawner/casa:6.6.5-31",
)


@pytest.fixture
def plan(tmp_path: Path, catalog: Catalog) -> SessionPlan:
    """Alice's cycle 10 dataset planned with CASA 6.7.0-31, as the hub plans an app."""
    resolution = resolve_path(write_dataset(tmp_path, "cycle10"), catalog, label="~/x")
    identity = Identity("alice", 41001, 41002, supplemental_gids=(2000,))
    options = SessionOptions("~/x", release="casa-6.7.0-31", size="small")
    return make_plan(identity, options, catalog, resolution)


def app_pod(plan: SessionPlan, app: str = "plotms", display: int = 21) -> dict[str, Any]:
    return apps.app_pod(
        plan,
        PodSettings(token_url="http://hub:8081/hub/api/casa-token/alice/"),
        name=apps.app_pod_name(SESSION.name, plan.release.id, app, "n1"),
        app=app,
        session=SESSION,
        display=display,
        own_label="CASA 6.6.5-31",
        desktop_dir="/opt/casaspawner/desktop",
        labels={"hub.jupyter.org/username": "alice", "component": "singleuser-server"},
    )


def test_the_app_is_a_restricted_pod_of_alice_owned_by_her_session(plan: SessionPlan) -> None:
    pod = app_pod(plan)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert restricted_violations(pod) == {}
    assert pod_security_violations(pod, "restricted") == []

    assert pod["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": SESSION.name, "uid": SESSION.uid}
    ]
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsUser"] == 41001
    assert spec["securityContext"]["runAsGroup"] == 41002
    assert spec["securityContext"]["supplementalGroups"] == [2000]
    (container,) = spec["containers"]
    assert container["image"] == plan.image and plan.image.endswith(":6.7.0-31")
    # casa-app comes from the session's image, copied by an init container: the app's image
    # needs none of the desktop stack.
    assert container["args"] == ["/bin/sh", "/opt/casa-app/casa-app", "plotms"]
    (copy,) = spec["initContainers"]
    assert copy["image"] == SESSION.image
    assert copy["command"] == ["cp", "-R", "/opt/casaspawner/desktop/.", "/opt/casa-app"]
    assert copy["securityContext"] == security_contexts(plan.identity)[1]
    assert copy["resources"] == container["resources"]
    assert copy["resources"] is not container["resources"]
    tools = {"name": "casa-app-tools", "mountPath": "/opt/casa-app"}
    assert copy["volumeMounts"] == [tools]
    assert {**tools, "readOnly": True} in container["volumeMounts"]
    assert {"name": "casa-app-tools", "emptyDir": {"sizeLimit": "16Mi"}} in spec["volumes"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # No token: neither the Secret's volume nor any Jupyter variable.
    assert all("secret" not in volume for volume in spec["volumes"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert not [name for name in env if name.startswith("JUPYTER")]
    assert env["DISPLAY"] == "10.244.0.17:21"
    assert env["XAUTHORITY"] == "/arc/home/alice/.casaspawner/desktop/jupyter-alice.xauthority"
    assert env["HOME"] == "/arc/home/alice"
    assert env["CASASPAWNER_RELEASE"] == "casa-6.7.0-31"
    assert env["CASASPAWNER_REASON"] == (
        "CASA 6.7.0-31, added from the desktop menu beside this session's CASA 6.6.5-31."
    )
    assert env["CASASPAWNER_TERMINAL_GEOMETRY"] == "110x32"
    # Little asked of the scheduler (the session holds the size), the size's limits kept.
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["resources"]["limits"]["cpu"] == "2"
    assert container["resources"]["limits"]["memory"] == "4G"
    # The session's storage, where the cookie and the dataset are.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/arc/home/alice" in mounts


def test_the_app_carries_the_session_labels_and_names_its_desktop(plan: SessionPlan) -> None:
    labels = app_pod(plan)["metadata"]["labels"]
    assert labels["hub.jupyter.org/username"] == "alice"
    assert labels["app.kubernetes.io/component"] == "casa-app"
    assert labels["casaspawner.io/app-of"] == SESSION.name
    # Two launches of one app are two pods.
    first = apps.app_pod_name(SESSION.name, "casa-6.7.0-31", "plotms", "a")
    second = apps.app_pod_name(SESSION.name, "casa-6.7.0-31", "plotms", "b")
    assert first != second and len(first) <= 63 and first.startswith("jupyter-alice-plotms-")


def test_the_cookie_is_looked_for_under_the_host_name_the_desktop_has() -> None:
    """``$HOSTNAME`` in a pod: its ``spec.hostname``, else its name cut to 63 characters."""
    long = dataclasses.replace(SESSION, name="jupyter-" + "a" * 54 + "-b-c")
    assert long.host() == "jupyter-" + "a" * 54 and len(long.name) > 63
    assert SESSION.host() == "jupyter-alice"
    assert dataclasses.replace(SESSION, hostname="desk").host() == "desk"
    assert apps.cookie_path("/arc/home/alice", long.host()).endswith(f"/{long.host()}.xauthority")


def test_a_display_out_of_range_is_refused(plan: SessionPlan) -> None:
    with pytest.raises(ValueError, match="X display 400"):
        app_pod(plan, display=400)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_the_policies_admit_the_sessions_own_app_pods_alone(plan: SessionPlan) -> None:
    into, out = apps.desktop_policies(SESSION, "casaspawner.io")
    for policy in (into, out):
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
        assert policy["metadata"]["ownerReferences"] == [SESSION.owner()]
    app = app_pod(plan)["metadata"]["labels"]
    other_app = {**app, "casaspawner.io/app-of": "jupyter-bob"}
    run = {**SESSION.labels, "app.kubernetes.io/component": "casa-run"}
    bob = {**SESSION.labels, "hub.jupyter.org/username": "bob"}

    # The session pod, and no run, app or other user's pod, is guarded ...
    assert selects(into["spec"]["podSelector"], dict(SESSION.labels))
    assert not any(selects(into["spec"]["podSelector"], x) for x in (app, run, bob))
    # ... and admits its own apps to the X ports alone.
    (rule,) = into["spec"]["ingress"]
    (source,) = rule["from"]
    assert selects(source["podSelector"], app) and not selects(source["podSelector"], other_app)
    assert rule["ports"] == [{"protocol": "TCP", "port": 6000, "endPort": 6399}]
    # Its apps may reach it there.
    assert selects(out["spec"]["podSelector"], app)
    assert not selects(out["spec"]["podSelector"], other_app)
    (rule,) = out["spec"]["egress"]
    assert rule["to"] == [{"podSelector": into["spec"]["podSelector"]}]


def test_each_image_has_the_tools_its_release_ships(catalog: Catalog) -> None:
    assert apps.image_apps(catalog.get("casa-6.7.0-31")) == ["terminal", "plotms", "viewer"]
    tarball = next(r for r in catalog.available() if r.tarball is not None)
    assert apps.image_apps(tarball) == ["terminal", "plotms", "viewer", "browser", "logger"]


# The desktop's side (insession/desktop/casa_releases.py): where it asks, and what it shows.
def test_the_desktop_asks_its_own_servers_api_only_when_its_apps_run_in_pods() -> None:
    session = {
        "JUPYTERHUB_API_URL": "http://hub:8081/hub/api",
        "JUPYTERHUB_USER": "alice@example.org",
        "JUPYTERHUB_SERVER_NAME": "big one",
    }
    assert casa_releases.hub_apps_url(session) == ""
    url = casa_releases.hub_apps_url({**session, "CASASPAWNER_DESKTOP_APPS": "hub"})
    assert url == "http://hub:8081/hub/api/casa-apps/alice%40example.org/big%20one"
    assert casa_releases.display_number(":21.0") == 21
    with pytest.raises(ValueError, match="not a local display"):
        casa_releases.display_number("10.0.0.1:21")


@pytest.fixture
def hub_answering() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An HTTP server on 127.0.0.1 refusing every request as the hub's API does."""
    asked: list[dict[str, Any]] = []

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            asked.append(
                {"auth": self.headers["Authorization"], **json.loads(self.rfile.read(length))}
            )
            body = json.dumps({"status": 400, "message": "CASA 6.7.0-31 is drained."}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    with serving(Refusing) as url:
        yield url, asked


def test_a_launch_shares_the_cookie_then_says_the_hubs_refusal(
    tmp_path: Path, hub_answering: tuple[str, list[dict[str, Any]]]
) -> None:
    url, asked = hub_answering
    xauthority = tmp_path / ".Xauthority"
    # The desktop's own entry, as TigerVNC's vncserver writes it: FamilyLocal, host, display 21.
    fields = [b"jupyter-alice", b"21", b"MIT-MAGIC-COOKIE-1", bytes(range(16))]
    xauthority.write_bytes(b"\x01\x00" + b"".join(len(f).to_bytes(2, "big") + f for f in fields))
    environ = {
        "CASASPAWNER_DESKTOP_APPS": "hub",
        "JUPYTERHUB_API_URL": f"{url}/hub/api",
        "JUPYTERHUB_USER": "alice",
        "JUPYTERHUB_SERVER_NAME": "",
        "JUPYTERHUB_API_TOKEN": "session-token",
        "HOME": str(tmp_path),
        "HOSTNAME": "jupyter-alice",
        "DISPLAY": ":21",
    }
    with pytest.raises(casa_releases.Refused, match=r"^CASA 6\.7\.0-31 is drained\.$"):
        casa_releases.hub_launch("casa-6.7.0-31", "plotms", environ)
    assert asked == [
        {"auth": "token session-token", "release": "casa-6.7.0-31", "app": "plotms", "display": 21}
    ]
    # The cookie, for any address, readable by alice alone.
    shared = tmp_path / ".casaspawner" / "desktop" / "jupyter-alice.xauthority"
    assert shared.stat().st_mode & 0o777 == 0o600
    wild = [b"", b"21", b"MIT-MAGIC-COOKIE-1", bytes(range(16))]
    assert shared.read_bytes() == b"\xff\xff" + b"".join(
        len(f).to_bytes(2, "big") + f for f in wild
    )


def test_a_menu_the_hub_cannot_answer_is_one_item_saying_so() -> None:
    environ = {
        "CASASPAWNER_DESKTOP_APPS": "hub",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",
        "JUPYTERHUB_USER": "alice",
    }
    menu = ET.fromstring(casa_releases.hub_menu(environ, "/opt/casaspawner/desktop/casa-app"))
    (item,) = menu.findall("item")
    assert (item.get("label") or "").startswith("The hub could not list the other releases: ")


def test_an_app_that_ends_at_once_is_told_by_its_logs_last_line() -> None:
    """The hub's sentence takes the last line that says something, not the whole log tail."""
    tail = "casaspawner: HOME is not writable\n\nCASA 6.7.0-31 has no xterm.\n  \n"
    assert last_line(tail) == "CASA 6.7.0-31 has no xterm."
    assert last_line(None) == "" and last_line("\n \n") == ""
    long = last_line("x " * 400)
    assert len(long) == 300 and long.endswith("…")


def test_an_app_needs_the_sessions_image_for_casa_app(plan: SessionPlan) -> None:
    with pytest.raises(ValueError, match="names no image to copy casa-app from"):
        apps.app_pod(
            plan,
            PodSettings(),
            name="x",
            app="plotms",
            session=dataclasses.replace(SESSION, image=""),
            display=1,
            own_label="CASA",
            desktop_dir="/opt/casaspawner/desktop",
            labels={},
        )

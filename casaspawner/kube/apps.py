"""Pure builders: an app of another CASA release on a session's desktop, as its own pod.

Nothing here talks to Kubernetes. :func:`app_pod` is a session's pod without a server: the
other release's image, the restricted Pod Security profile, the user's uid and gid, the session's
Cavern mounts and read-only measures, no token, running one ``casa-app`` tool whose windows go
to the session's X server (``DISPLAY`` is the session pod's address) with the X cookie the
desktop left in the user's home. The session pod owns it, so it goes when the session goes.
:func:`desktop_policies` are the two NetworkPolicies that let the session's own app pods, and
no other pod, reach its X server: ingress to the session pod, egress from its app pods.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from casaspawner.catalog.model import Release
from casaspawner.insession.desktop.casa_releases import APPS, COOKIE_DIR
from casaspawner.kube.jobs import container_resources, one_shot_spec
from casaspawner.kube.objects import PodSettings, security_contexts, session_volumes
from casaspawner.plan import SessionPlan

#: The labels every app pod carries (beside the session pods' own).
COMPONENT = {
    "app.kubernetes.io/component": "casa-app",
    "app.kubernetes.io/managed-by": "casaspawner",
}
#: The label (after the plan's prefix) naming the session pod an app pod draws on.
APP_OF = "app-of"
#: KubeSpawner's component label of a session's pod.
SESSION_COMPONENT = "singleuser-server"
#: The app's container.
CONTAINER = "casa-app"
#: Where the app's pod has the desktop's ``casa-app``, copied there from the session's image by
#: an init container: the app's own image needs no desktop stack, only CASA (and X clients).
TOOLS_DIR = "/opt/casa-app"
TOOLS_VOLUME = "casa-app-tools"
#: X displays the desktop may use (``bin/vncserver`` picks one of them); X listens on 6000 + n.
DISPLAYS = range(0, 400)
X_PORT = 6000
#: What an app's pod asks the scheduler for (a GUI beside a session that holds the size).
APP_REQUESTS = {"cpu": "100m", "memory": "256Mi"}
#: Seconds between SIGTERM and SIGKILL: a GUI closes at once.
GRACE_SECONDS = 5
#: What the hub's Role needs beyond Zero to JupyterHub's for apps (two policies per desktop).
APP_RULES: list[dict[str, list[str]]] = [
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["create", "get", "delete"],
    },
]
#: The session's variables an app of another release does not take: they speak of the session's
#: own build.
SESSION_ONLY = ("CASASPAWNER_PIPELINE", "CASASPAWNER_EXACT")
#: What a desktop session gets when its apps of other releases run in pods: the desktop's menu
#: asks the hub for them, and its X server listens on TCP too (``bin/vncserver``).
SESSION_ENVIRONMENT = {"CASASPAWNER_DESKTOP_APPS": "hub", "CASASPAWNER_DESKTOP_X_TCP": "1"}

_DNS = re.compile(r"[^a-z0-9-]+")


@dataclasses.dataclass(frozen=True)
class SessionPod:
    """The running session pod an app draws on, as the API server has it."""

    name: str
    uid: str
    ip: str
    labels: Mapping[str, str]
    #: The pod's ``spec.hostname``, when it has one.
    hostname: str = ""
    #: The measures version's directory the session mounted, when measures are kept by version.
    measures: str = ""
    #: The session container's image, which holds the desktop's ``casa-app``.
    image: str = ""

    def host(self) -> str:
        """The pod's host name (``$HOSTNAME`` in it), as the kubelet gives it.

        ``spec.hostname``, else the pod's name cut to 63 characters without a trailing ``-``
        or ``.``. The desktop names its X cookie's file after it.
        """
        return self.hostname or self.name[:63].rstrip("-.")

    def owner(self) -> dict[str, Any]:
        """An owner reference to this pod: what it owns is deleted with it."""
        return {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}

    def selector(self) -> dict[str, str]:
        """Labels that select this session's pod and no other pod."""
        keys = ("hub.jupyter.org/username", "hub.jupyter.org/servername")
        found = {k: self.labels[k] for k in keys if k in self.labels}
        return {**found, "app.kubernetes.io/component": SESSION_COMPONENT}


def image_apps(release: Release) -> list[str]:
    """The ``casa-app`` tools a CASA image of ``release`` has, in menu order.

    Images leave casalogger out (:data:`casaspawner.images.matrix.IMAGE_OMITS`); a tarball
    build has casabrowser and its logger in ``bin/``.
    """
    if release.tarball is not None:
        return list(APPS)
    apps = ["terminal"]
    if release.wheels is not None and release.wheels.casaplotms:
        apps.append("plotms")
    if release.wheels is not None and release.wheels.casaviewer:
        apps.append("viewer")
    return apps


def cookie_path(home: str, host: str) -> str:
    """Where the desktop on ``host`` leaves its X cookie for its app pods (mode 0600)."""
    return str(PurePosixPath(home) / COOKIE_DIR / f"{host}.xauthority")


def app_pod_name(session: str, release_id: str, app: str, nonce: str) -> str:
    """A pod name for an app of ``release_id`` on ``session``'s desktop: a DNS label."""
    digest = hashlib.sha256(f"{session}\n{release_id}\n{app}\n{nonce}".encode()).hexdigest()[:8]
    stem = _DNS.sub("-", f"{session}-{app}".lower()).strip("-")
    return f"{stem[:54].rstrip('-')}-{digest}"


def app_pod(
    plan: SessionPlan,
    settings: PodSettings,
    *,
    name: str,
    app: str,
    session: SessionPod,
    display: int,
    own_label: str,
    desktop_dir: str,
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """The pod running ``casa-app APP`` of ``plan``'s release on ``session``'s desktop.

    ``plan`` is the session's plan with the other release; ``own_label`` names the session's
    own release in the app's windows; ``desktop_dir`` holds ``casa-app`` in the session's
    image, from which an init container copies it for the app's image to run.
    """
    if display not in DISPLAYS:
        raise ValueError(f"X display {display} is outside {DISPLAYS}")
    if not session.image:
        raise ValueError(f"the session pod {session.name} names no image to copy casa-app from")
    pod_sc, container_sc = security_contexts(plan.identity)
    bare = dataclasses.replace(settings, token_url=None)
    volumes, mounts = session_volumes(plan, bare)
    prefix = next(iter(plan.labels)).split("/", 1)[0]
    environment = {
        **{
            k: v
            for k, v in plan.environment.items()
            if not k.startswith("JUPYTER")
            and k not in ("CASASPAWNER_PIPELINE", "CASASPAWNER_EXACT")
        },
        "HOME": plan.home,
        "DISPLAY": f"{session.ip}:{display}",
        "XAUTHORITY": cookie_path(plan.home, session.host()),
        "CASASPAWNER_APPROXIMATE": "false",
        # Placed by openbox where it covers nothing, not on the session's own terminal.
        "CASASPAWNER_TERMINAL_GEOMETRY": "110x32",
        "CASASPAWNER_REASON": (
            f"{plan.release.label}, added from the desktop menu beside this session's {own_label}."
        ),
    }
    # The session's pod holds the session's share of the node: an app asks for little, and may
    # use up to the size's limits.
    resources = {**container_resources(plan, settings), "requests": dict(APP_REQUESTS)}
    tools = {"name": TOOLS_VOLUME, "mountPath": TOOLS_DIR}
    copier: dict[str, Any] = {
        "name": TOOLS_VOLUME,
        "image": session.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["cp", "-R", f"{PurePosixPath(desktop_dir)}/.", TOOLS_DIR],
        "securityContext": container_sc,
        "volumeMounts": [tools],
        "resources": copy.deepcopy(resources),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["/bin/sh", f"{TOOLS_DIR}/casa-app", app],
        "env": [{"name": k, "value": v} for k, v in environment.items()],
        "securityContext": container_sc,
        "volumeMounts": [*mounts.values(), {**tools, "readOnly": True}],
        "resources": resources,
        # What casa-app says when it cannot start the tool reaches the desktop's menu.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    volumes[TOOLS_VOLUME] = {"name": TOOLS_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}}
    spec = one_shot_spec(pod_sc, volumes, container, GRACE_SECONDS)
    spec["initContainers"] = [copier]
    pod_labels = {
        **plan.labels,
        **labels,
        **COMPONENT,
        f"{prefix}/{APP_OF}": session.name,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": pod_labels,
            "annotations": dict(plan.annotations),
            "ownerReferences": [session.owner()],
        },
        "spec": spec,
    }


def app_selector(session: SessionPod, prefix: str) -> dict[str, str]:
    """Labels that select the app pods of ``session``'s desktop."""
    return {**COMPONENT, f"{prefix}/{APP_OF}": session.name}


def desktop_policies(session: SessionPod, prefix: str) -> list[dict[str, Any]]:
    """The NetworkPolicies letting ``session``'s app pods, and them alone, reach its X server.

    The first admits them to the session pod's X ports; the second lets them out to there
    (Zero to JupyterHub's policy for user pods keeps them from private addresses otherwise).
    Both belong to the session pod.
    """
    ports = [{"protocol": "TCP", "port": X_PORT + DISPLAYS[0], "endPort": X_PORT + DISPLAYS[-1]}]
    apps = {"matchLabels": app_selector(session, prefix)}
    desktop = {"matchLabels": session.selector()}

    def metadata(suffix: str) -> dict[str, Any]:
        return {
            "name": f"{session.name}-{suffix}",
            "labels": {"app.kubernetes.io/managed-by": "casaspawner"},
            "ownerReferences": [session.owner()],
        }

    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata("x-in"),
            "spec": {
                "podSelector": desktop,
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": apps}], "ports": ports}],
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata("x-out"),
            "spec": {
                "podSelector": apps,
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": desktop}], "ports": ports}],
            },
        },
    ]

"""The hub's side of the k8s tier: its ServiceAccount, its storage, its spawners.

The hub talks to the API server as the ServiceAccount ``hub`` of its namespace, holding exactly the
hub Role of Zero to JupyterHub (``jupyterhub/templates/hub/rbac.yaml``: pods, PVCs, secrets and
services get, watch, list, create and delete; events get, watch and list), through a kubeconfig
with a token from the TokenRequest API: never as the cluster's admin. Cavern and the measures are
PersistentVolumes (``hostPath``, on this machine) bound to the claims ``cavern`` and
``casa-measures``, as an operator binds a CephFS share.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from casaspawner.datasets.synth import ERAS, write_dataset

#: Zero to JupyterHub's hub Role, rule for rule.
Z2JH_HUB_RULES = [
    {
        "apiGroups": [""],
        "resources": ["pods", "persistentvolumeclaims", "secrets", "services"],
        "verbs": ["get", "watch", "list", "create", "delete"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "watch", "list"]},
]
HUB_ACCOUNT = "hub"
#: The test user, as an OIDC login would describe her.
ALICE = {
    "preferred_username": "alice",
    "uid": 41001,
    "gid": 41001,
    "groups": ["alma-users", "proj-m87"],
    "gids": [52001],
}
PROJECT = "proj-m87"
PROJECT_GID = 52001
#: A release whose image the images tier builds (``localhost/casaspawner/casa:6.6.5-31``).
RELEASE = "casa-6.6.5-31"


@dataclass
class User:
    """What a spawner needs of JupyterHub's ``User``: name, id, url, groups, auth_state."""

    name: str
    auth_state: dict[str, Any]
    id: int = 7
    groups: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"/user/{self.name}/"

    async def get_auth_state(self) -> dict[str, Any]:
        return self.auth_state


def alice(token: str) -> User:
    """Alice as GenericOAuthenticator keeps her: her claims under ``oauth_user``, her token."""
    return User("alice", {"oauth_user": dict(ALICE), "access_token": token})


# Storage
def write_cavern(root: Path) -> Path:
    """A Cavern tree: alice's home (a dataset of every era under ``data/``) and her project.

    Owned as on a real share: her home is hers alone, the project her group's.
    """
    home = root / "home" / "alice"
    for era in ERAS:
        write_dataset(home / "data" / era, era)
    project = root / "projects" / PROJECT
    project.mkdir(parents=True)
    for path in (home, *home.rglob("*")):
        os.chown(path, ALICE["uid"], ALICE["gid"], follow_symlinks=False)
    home.chmod(0o700)
    os.chown(project, ALICE["uid"], PROJECT_GID)
    project.chmod(0o2770)
    root.chmod(0o755)
    return root


def dataset_of(root: Path, era: str) -> str:
    """Alice's dataset of ``era``, checked to exist under the Cavern ``root``."""
    home = root / "home" / "alice"
    (member,) = (home / "data" / era).glob("*/science_goal.*/group.*/member.*")
    return str(member.relative_to(home))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# The hub's account
@dataclass
class HubAccount:
    """The hub's namespace, and a kubeconfig acting as its ServiceAccount."""

    namespace: str
    kubeconfig: Path
    token: str


def cluster_entry(kubeconfig: Path) -> dict[str, Any]:
    """The server and CA of the current context of ``kubeconfig``."""
    config = yaml.safe_load(kubeconfig.read_text())
    context_name = config.get("current-context")
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = dict(
        next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    )
    authority = cluster.pop("certificate-authority", None)
    if authority and "certificate-authority-data" not in cluster:
        data = (kubeconfig.parent / authority).read_bytes()
        cluster["certificate-authority-data"] = base64.b64encode(data).decode("ascii")
    return cluster


def token_kubeconfig(admin: Path, token: str, path: Path) -> Path:
    """A kubeconfig for the admin's cluster that authenticates with ``token`` alone."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "k8s-tier", "cluster": cluster_entry(admin)}],
        "users": [{"name": "hub", "user": {"token": token}}],
        "contexts": [{"name": "hub", "context": {"cluster": "k8s-tier", "user": "hub"}}],
        "current-context": "hub",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


async def create_hub_account(
    api: Any,
    namespace: str,
    admin: Path,
    directory: Path,
    rules: list[dict[str, Any]] = Z2JH_HUB_RULES,
    name: str = HUB_ACCOUNT,
) -> HubAccount:
    """ServiceAccount ``name`` bound to Zero to JupyterHub's hub Role, and its kubeconfig.

    ``rules`` replace the Role's, for a hub whose operator got them wrong.
    """
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    await core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    await rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
    binding = {
        "metadata": {"name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        "roleRef": {"kind": "Role", "name": name, "apiGroup": "rbac.authorization.k8s.io"},
    }
    await rbac.create_namespaced_role_binding(namespace, binding)
    request = {"spec": {"expirationSeconds": 4 * 3600}}
    answer = await core.create_namespaced_service_account_token(name, namespace, request)
    token = answer.status.token
    kubeconfig = token_kubeconfig(admin, token, directory / f"{namespace}-{name}.kubeconfig")
    return HubAccount(namespace, kubeconfig, token)


async def bind_storage(api: Any, namespace: str, cavern: Path, measures: Path) -> list[str]:
    """PersistentVolumes for Cavern and the measures, bound to the claims the spawner names.

    Returns the volumes' names (they belong to no namespace: delete them afterwards).
    """
    core = client.CoreV1Api(api)
    volumes = []
    for claim, path, mode in (
        ("cavern", cavern, "ReadWriteMany"),
        ("casa-measures", measures, "ReadOnlyMany"),
    ):
        name = f"{namespace}-{claim}"
        volume = {
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": [mode],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
        await core.create_persistent_volume(volume)
        volumes.append(name)
        request = {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": [mode],
                "storageClassName": "",
                "volumeName": name,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        await core.create_namespaced_persistent_volume_claim(namespace, request)

    async def bound() -> bool:
        claims = await core.list_namespaced_persistent_volume_claim(namespace)
        return all(c.status.phase == "Bound" for c in claims.items) and len(claims.items) == 2

    await eventually(bound, 60, "the storage claims were not bound")
    return volumes


async def delete_volumes(api: Any, names: list[str]) -> None:
    core = client.CoreV1Api(api)
    for name in names:
        with contextlib.suppress(ApiException):
            await core.delete_persistent_volume(name)


# Spawners
#: The session command of the API-level tests: busybox idles, whatever arguments follow.
IDLE = ["/bin/busybox", "sh", "-c", "exec /bin/busybox sleep 3600", "--"]


@dataclass
class Hub:
    """The hub's namespace and account on the cluster, and its spawners."""

    cluster: Any
    account: HubAccount
    cavern: Path
    busybox: str
    token: str = field(default_factory=lambda: "k8s-tier-" + secrets.token_urlsafe(16))

    @property
    def namespace(self) -> str:
        return self.account.namespace

    def spawner(self, user: Any = None, **config: Any) -> Any:
        """A ``CASASpawner`` as the hub builds one, talking to the API as the hub's account.

        Sessions run the busybox image idling, unless ``config`` says otherwise.
        """
        from casaspawner.hubconfig import CLAIMS
        from casaspawner.kube.spawner import CASASpawner

        settings: dict[str, Any] = {
            **CLAIMS,
            "namespace": self.namespace,
            "storage_hub_path": str(self.cavern),
            "project_group_pattern": "proj-.*",
            "image_template": self.busybox,
            "cmd": IDLE,
            "start_timeout": 120,
            # JupyterHub's, for the server: the one token the hub hands the access token to.
            "api_token": "server-" + secrets.token_hex(8),
            **config,
        }
        with acting_as(self.account):
            return CASASpawner(_mock=True, user=user or alice(self.token), **settings)


@contextlib.contextmanager
def acting_as(account: HubAccount) -> Iterator[None]:
    """KubeSpawner's clients, made while inside, talk to the API as the hub's ServiceAccount."""
    from kubernetes_asyncio.config import kube_config
    from kubespawner.clients import load_config

    previous = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(account.kubeconfig)
    load_config.cache_clear()
    try:
        yield
    finally:
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = previous
        load_config.cache_clear()


async def spawn(spawner: Any, options: dict[str, Any], timeout: float = 240) -> Any:
    """Start ``spawner`` as the hub does, reading its progress as the spawn page does.

    Returns (url or the exception the start raised, progress messages).
    """
    spawner.user_options = options
    await spawner._run_apply_user_options(options)
    future = spawner.start()
    messages: list[str] = []

    async def read_progress() -> None:
        async for event in spawner.progress():
            messages.append(event["message"])

    reader = asyncio.ensure_future(read_progress())
    try:
        outcome: Any = await asyncio.wait_for(asyncio.shield(future), timeout)
    # The test's own limit, not the spawn's outcome.
    except asyncio.TimeoutError:
        raise
    except Exception as exc:
        outcome = exc
    await asyncio.wait_for(reader, 30)
    return outcome, messages


async def leftovers(api: Any, namespace: str) -> dict[str, list[str]]:
    """The pods, Secrets and Services in ``namespace``, by name."""
    core = client.CoreV1Api(api)
    return {
        "pods": [p.metadata.name for p in (await core.list_namespaced_pod(namespace)).items],
        "secrets": [s.metadata.name for s in (await core.list_namespaced_secret(namespace)).items],
        "services": [
            s.metadata.name for s in (await core.list_namespaced_service(namespace)).items
        ],
    }


async def nothing_left(api: Any, namespace: str, timeout: float = 60) -> None:
    """Wait until ``namespace`` holds no pod, Secret or Service; fail naming what is left."""
    empty = {"pods": [], "secrets": [], "services": []}
    deadline = time.monotonic() + timeout
    left = await leftovers(api, namespace)
    while left != empty and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        left = await leftovers(api, namespace)
    assert left == empty, f"left behind in {namespace}: {left}"


async def namespace_events(api: Any, namespace: str, reason: str | None = None) -> list[Any]:
    """The events of ``namespace`` (with ``reason`` only), oldest first."""
    core = client.CoreV1Api(api)
    selector = f"reason={reason}" if reason else None
    found = await core.list_namespaced_event(namespace, field_selector=selector)
    return sorted(found.items, key=lambda e: e.metadata.resource_version.zfill(20))


async def assert_no_failed_mount(api: Any, namespace: str, api_server_down: bool = False) -> None:
    """No kubelet in ``namespace`` ever failed to mount a volume.

    With ``api_server_down`` (a test that stopped the API server), a kubelet that could not reach
    it is allowed (it tries again); a volume whose object was not there yet (``… not found``) is
    not.
    """
    failed = await namespace_events(api, namespace, "FailedMount")
    if api_server_down:
        failed = [
            e
            for e in failed
            if "not found" in e.message
            or not ("from API server" in e.message and "connection refused" in e.message)
        ]
    assert not failed, [f"{e.involved_object.name}: {e.message}" for e in failed]


async def eventually(check: Any, timeout: float, what: str) -> Any:
    """Await ``check()`` every 0.5 s until it is truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        await asyncio.sleep(0.5)


def one_sentence(message: str) -> bool:
    """Whether ``message`` is one line ending with a full stop, with no traceback in it."""
    return (
        "\n" not in message
        and message.endswith(".")
        and "Traceback" not in message
        and "HTTP response headers" not in message
    )


#: What the restricted Pod Security level asks of every container, and of the pod.
HARDENED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
HARDENED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def hardened_pod(
    name: str,
    image: str,
    command: list[str],
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A one-container pod running ``command`` as the restricted level wants; ``spec`` adds."""
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": HARDENED_POD,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": command,
                    "securityContext": HARDENED_CONTAINER,
                }
            ],
            **spec,
        },
    }


async def run_in_pod(
    cluster: Any, namespace: str, pod: str, command: list[str], container: str = "notebook"
) -> str:
    """What ``command`` prints (stdout and stderr) in the pod's ``container``, stripped.

    The websocket client runs the output through its JSON reader, so compare stripped text.
    """
    async with await cluster.ws_api_client() as ws:
        output = await client.CoreV1Api(ws).connect_get_namespaced_pod_exec(
            pod,
            namespace,
            container=container,
            command=command,
            stdout=True,
            stderr=True,
            stdin=False,
            tty=False,
        )
    return str(output).strip()


@dataclass
class Change:
    """One watch event of a pod or Secret, in the order the API server wrote them."""

    kind: str
    type: str
    name: str
    resource_version: int
    owners: list[str]
    # Whether the object is a pod running with every container ready, as KubeSpawner asks.
    running: bool = False
    # When this watch saw it (perf_counter seconds).
    seen: float = 0.0


class Recorder:
    """Watches the pods and Secrets of a namespace as its admin, to see their order."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.changes: list[Change] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Recorder:
        core = client.CoreV1Api(self.api)
        ready = []
        for kind, method in (
            ("Pod", core.list_namespaced_pod),
            ("Secret", core.list_namespaced_secret),
        ):
            listed = await method(self.namespace)
            version = listed.metadata.resource_version
            started = asyncio.Event()
            ready.append(started)
            self._tasks.append(asyncio.ensure_future(self._watch(kind, method, version, started)))
        for started in ready:
            await started.wait()
        return self

    async def _watch(self, kind: str, method: Any, version: str, started: asyncio.Event) -> None:
        from kubernetes_asyncio import watch

        watcher = watch.Watch()
        started.set()
        async with watcher.stream(
            method, self.namespace, resource_version=version, allow_watch_bookmarks=False
        ) as stream:
            async for event in stream:
                raw = event["raw_object"]
                owners = [o["uid"] for o in raw["metadata"].get("ownerReferences") or []]
                status = raw.get("status") or {}
                statuses = status.get("containerStatuses") or []
                running = status.get("phase") == "Running" and all(c["ready"] for c in statuses)
                self.changes.append(
                    Change(
                        kind,
                        event["type"],
                        raw["metadata"]["name"],
                        int(raw["metadata"]["resourceVersion"]),
                        owners,
                        running and bool(statuses),
                        time.perf_counter(),
                    )
                )

    def first_running(self, name: str) -> float:
        """When this watch first saw the pod ``name`` running (perf_counter seconds)."""
        return next(c.seen for c in self.changes if c.name == name and c.running)

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def first(self, kind: str, type_: str, name: str) -> Change:
        return next(c for c in self.changes if (c.kind, c.type, c.name) == (kind, type_, name))

"""Spawn cost of CASASpawner against a plain KubeSpawner on the repository's real cluster.

Run with ``make bench-kube`` (root; it starts the cluster with a fake node for kwok, or reuses a
running one). The benchmark itself runs inside the cluster's network namespace, where pod IPs
answer. Results: ``benchmarks/results/kube-spawn.json`` and ``kube-spawn.png``.

**Spawn overhead.** One process plays the hub: it runs the spawners as JupyterHub does (the user's
options, ``apply_user_options``, ``start``, then JupyterHub's own ``wait_for_http_server`` on the
URL), as the hub's ServiceAccount holding Zero to JupyterHub's hub Role, against the real API
server. Per spawn it times start → pod Running (``start`` returned) → server answering; per round
it measures its own CPU time (``getrusage``, all its threads; the resolution workers, its children,
apart), the CPU time of the cluster's processes while the spawns ran (API server, etcd, scheduler,
controller-manager, kubelet, containerd, kube-router, kwok, the registry; from /proc) and a second
after, above their rate at rest in the second before (compared on the fake nodes only: on the real
node the previous round's clean-up runs into that second), and counts its requests to the API
server (every request the Kubernetes client sends, by verb and resource). A CASA session fetches
the user's access token from the hub as it starts: the hub's side of that request is counted too
(:class:`TokenDesk`). The spawners run the same busybox image (``httpd`` on port 8888) with the
same resources, in the same restricted namespace, alternately, round by round: a plain KubeSpawner
(``kube``), a plain KubeSpawner mounting what a CASA session mounts (``storage``: the home from the
shared claim by subPath, the measures, /tmp) and CASASpawner; 1, 20 and 100 concurrent spawns, on

* ``fake``: fake nodes registered for the benchmark and played by kwok (pods go Running without
  running anything; their addresses answer through one ``busybox httpd`` in the namespace), so
  the hub's own cost is what differs;
* ``node``: the real node, the image already in containerd (``present``), or pulled from a
  registry on 127.0.0.1 in the namespace (Debian's ``docker-registry``) after it was removed from
  containerd before each round (``pulled``).

Every CASA user has their own dataset (a Cycle 10 project directory in their home). The first
round of each concurrency resolves every dataset anew (``cold``: the resolution cache emptied);
the others find the resolution cached, as a user coming back to a dataset does (``warm``).

**Scale** is ``kube_scale.py``'s: 1,000 sessions under a real hub.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import os
import platform
import pstats
import random
import re
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _code_path() -> None:
    """Import casaspawner from ``--code DIR`` when given (a baseline tree), else this checkout."""
    code = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--code=")), None)
    sys.path[:0] = [str(Path(code).resolve())] if code else [str(REPO)]
    sys.path[1:1] = [str(REPO / "tests" / "k8s"), str(REPO / "tests")]


_code_path()

from k8s_hub import (  # noqa: E402
    ALICE,
    User,
    acting_as,
    bind_storage,
    create_hub_account,
    delete_volumes,
    remove_tree,
)
from kubernetes_asyncio import client  # noqa: E402
from kubernetes_asyncio.client import rest  # noqa: E402
from kubernetes_asyncio.client.rest import ApiException  # noqa: E402

from casaspawner import __version__  # noqa: E402
from casaspawner.datasets.synth import write_dataset  # noqa: E402
from cluster import (  # noqa: E402
    BUSYBOX_IMAGE,
    CLUSTER_DIR,
    NETNS,
    Cluster,
    build_busybox_image,
    push,
    registry,
)

KUBECONFIG = REPO / ".cache" / "k8s" / "kubeconfig"
CONTAINERD_SOCKET = REPO / ".cache" / "k8s" / "containerd" / "containerd.sock"
#: Where kwok gives fake pods their addresses (cluster/fake-nodes: 10.245.128.0/17).
FAKE_POD_NET = "10.245.128.0/17"
#: The port sessions listen on (KubeSpawner's default).
PORT = 8888
#: The session: busybox serving /www on the port, whatever arguments KubeSpawner appends.
SERVE = ["/bin/busybox", "sh", "-c", f"exec /bin/busybox httpd -f -p {PORT} -h /www", "--"]
#: Fake nodes the benchmark registers (kwok plays them): room for 1,000 sessions and more.
BENCH_NODES = 4
BENCH_NODE_PODS = 330
#: The same small resources for both spawners, so 100 sessions fit the real node.
CPU_GUARANTEE, CPU_LIMIT, MEM_GUARANTEE, MEM_LIMIT = 0.01, 0.5, "16M", "64M"
#: The label of those nodes; sessions on fake nodes select it.
BENCH_LABEL = "kube-bench.casaspawner.io/node"
FIRST_UID = 41001
PROJECT_GID = 52001
ERA = "cycle10"
CONCURRENCY = (1, 20, 100)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# Counting the hub's requests to the API server
class RequestCounter:
    """Counts every request the Kubernetes client sends, by verb and resource.

    It wraps ``RESTClientObject.request``, through which each API call of kubernetes_asyncio
    goes; a watch counts once, when it is opened.
    """

    PATH = re.compile(r"/api/v1/(?:namespaces/[^/]+/)?([a-z]+)")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._original: Any = None

    def install(self) -> None:
        original = self._original = rest.RESTClientObject.request
        counts = self.counts
        pattern = self.PATH

        async def request(self_: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            found = pattern.search(url)
            query = kwargs.get("query_params") or []
            watch = any(k == "watch" and v for k, v in query)
            kind = found.group(1) if found else "other"
            counts[f"{'WATCH' if watch else method} {kind}"] += 1
            return await original(self_, method, url, *args, **kwargs)

        rest.RESTClientObject.request = request

    def uninstall(self) -> None:
        if self._original is not None:
            rest.RESTClientObject.request = self._original

    def take(self) -> Counter[str]:
        """The counts since the last call."""
        taken = Counter(self.counts)
        self.counts.clear()
        return taken


COUNTER = RequestCounter()


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


#: The cluster's processes a round's CPU time is measured for, by the start of their name in
#: /proc (cut there to 15 characters): the component each belongs to.
CLUSTER_PROCESSES = {
    "kube-apiserver": "kube-apiserver",
    "etcd": "etcd",
    "kube-scheduler": "kube-scheduler",
    "kube-controller": "kube-controller-manager",
    "kubelet": "kubelet",
    # containerd and each pod's shim (containerd-shim-runc-v2).
    "containerd": "containerd",
    "kube-router": "kube-router",
    "kwok": "kwok",
    "docker-registry": "registry",
}
TICKS = os.sysconf("SC_CLK_TCK")
#: Seconds after a round's spawns answered that still count as the cluster's work for them.
CLUSTER_SETTLE = 1.0


def cluster_processes() -> dict[int, tuple[str, float]]:
    """The cluster's running processes: pid → (component, CPU seconds so far)."""
    found: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        # pid (comm) state ...: comm may hold spaces; utime and stime are fields 14 and 15.
        name = text[text.index("(") + 1 : text.rindex(")")]
        component = next((c for p, c in CLUSTER_PROCESSES.items() if name.startswith(p)), None)
        if component is not None:
            fields = text[text.rindex(")") + 2 :].split()
            found[int(entry.name)] = (component, (int(fields[11]) + int(fields[12])) / TICKS)
    return found


def cluster_cpu_between(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds each component used between two looks (processes that ended are missed)."""
    used: Counter[str] = Counter()
    for pid, (component, seconds) in after.items():
        earlier = before.get(pid)
        used[component] += seconds - (earlier[1] if earlier else 0.0)
    return dict(used)


# The cluster's side
def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def ctr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", "--address", str(CONTAINERD_SOCKET), "-n", "k8s.io", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def in_cluster_namespace() -> bool:
    """Whether this process runs in the cluster's network namespace."""
    try:
        return os.stat(f"/run/netns/{NETNS}").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


@dataclass
class Environment:
    """What the benchmark made on the cluster and on this machine, to remove at the end."""

    api: Any
    namespace: str = ""
    account: Any = None
    volumes: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    cavern: Path | None = None
    measures: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    route: bool = False
    registry_image: str = ""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kube-bench-")))
    #: What stops with the benchmark: the registry.
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


async def create_namespace(api: Any) -> str:
    """A fresh namespace enforcing the restricted Pod Security level."""
    cluster = Cluster(kubeconfig=KUBECONFIG, netns=NETNS)
    return await cluster.create_namespace(api, prefix="kube-bench")


async def register_fake_nodes(api: Any, env: Environment) -> None:
    """Fake nodes for the benchmark's sessions, tainted and labelled like cluster/fake-nodes'."""
    core = client.CoreV1Api(api)
    for index in range(BENCH_NODES):
        name = f"kwok-bench-{index}"
        capacity = {
            "cpu": "64",
            "memory": "512Gi",
            "ephemeral-storage": "4Ti",
            "pods": str(BENCH_NODE_PODS),
        }
        body = {
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "type": "kwok",
                    BENCH_LABEL: "true",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": {
                "taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]
            },
            "status": {"allocatable": capacity, "capacity": capacity},
        }
        with contextlib.suppress(ApiException):
            await core.delete_node(name)
        await core.create_node(body)
        env.nodes.append(name)
    deadline = time.monotonic() + 60
    while True:
        nodes = await core.list_node(label_selector="type=kwok")
        ready = {
            n.metadata.name
            for n in nodes.items
            if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
        }
        if set(env.nodes) <= ready:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                "kwok did not make the benchmark's fake nodes Ready (is it running?)"
            )
        await asyncio.sleep(0.5)


def answer_on_fake_addresses(env: Environment) -> None:
    """Make kwok's pod addresses answer on the session port: one busybox httpd for all of them.

    The addresses become local to the namespace (a ``local`` route on ``lo``), and one httpd
    listens on every address of the namespace.
    """
    www = env.workdir / "www"
    www.mkdir()
    (www / "index.html").write_text("fake session\n")
    run(["ip", "route", "replace", "local", FAKE_POD_NET, "dev", "lo"])
    env.route = True
    httpd = subprocess.Popen(
        ["busybox", "httpd", "-f", "-p", f"0.0.0.0:{PORT}", "-h", str(www)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env.processes.append(httpd)


def start_registry(env: Environment) -> str:
    """Debian's docker-registry on 127.0.0.1 in the namespace, holding the busybox image."""
    cluster = Cluster(kubeconfig=KUBECONFIG, netns=NETNS)
    address = env.stack.enter_context(registry(cluster, env.workdir))
    image = f"{address}/bench/busybox:{secrets.token_hex(4)}"
    push(cluster, BUSYBOX_IMAGE, image)
    env.registry_image = image
    return image


def forget_image(image: str) -> None:
    """Remove ``image`` from containerd, so the next pod using it pulls it."""
    ctr("images", "rm", "--sync", image)


async def cleanup(env: Environment) -> None:
    core = client.CoreV1Api(env.api)
    if env.namespace:
        with contextlib.suppress(ApiException):
            await core.delete_namespace(env.namespace)
    await delete_volumes(env.api, env.volumes)
    for name in env.nodes:
        with contextlib.suppress(ApiException):
            await core.delete_node(name)
    for process in env.processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    env.stack.close()
    if env.route:
        subprocess.run(["ip", "route", "del", "local", FAKE_POD_NET, "dev", "lo"], check=False)
    if env.registry_image:
        forget_image(env.registry_image)
    for path in (env.cavern, env.measures, env.workdir):
        if path is not None:
            remove_tree(path)


# Users and their storage
def username(index: int) -> str:
    return f"bench-{index:04d}"


def write_homes(root: Path, count: int) -> dict[str, str]:
    """Each user's home with one dataset; returns each user's dataset as they name it."""
    datasets = {}
    (root / "projects" / "proj-bench").mkdir(parents=True)
    for index in range(count):
        name = username(index)
        home = root / "home" / name
        member = write_dataset(home / "data", ERA)
        project = member.parents[2]
        for path in (home, *home.rglob("*")):
            os.chown(path, FIRST_UID + index, FIRST_UID + index, follow_symlinks=False)
        home.chmod(0o700)
        datasets[name] = str(project.relative_to(home))
    root.chmod(0o755)
    return datasets


def bench_user(index: int, token: str) -> User:
    claims = {
        **ALICE,
        "preferred_username": username(index),
        "uid": FIRST_UID + index,
        "gid": FIRST_UID + index,
        "groups": ["alma-users", "proj-bench"],
        "gids": [PROJECT_GID],
    }
    return User(username(index), {"oauth_user": claims, "access_token": token}, id=index + 1)


# The two spawners
FLAVOURS = tuple(os.environ.get("KUBE_BENCH_FLAVOURS", "kube storage casa").split())
#: The flavours played by a plain KubeSpawner: bare, and with the CASA session's storage.
PLAIN = ("kube", "storage")


@dataclass
class Setting:
    """Where sessions run and which image they use."""

    placement: str  # "fake" or "node"
    image: str  # "present" or "pulled"
    image_ref: str

    @property
    def name(self) -> str:
        return self.placement if self.placement == "fake" else f"node-{self.image}"


def spawner_settings(flavour: str, env: Environment, setting: Setting) -> dict[str, Any]:
    common: dict[str, Any] = {
        "namespace": env.namespace,
        "cmd": SERVE,
        "start_timeout": 600,
        "http_timeout": 120,
        "k8s_api_request_retry_timeout": 120,
    }
    if setting.placement == "fake":
        common["node_selector"] = {BENCH_LABEL: "true"}
        common["tolerations"] = [
            {"key": "kwok.x-k8s.io/node", "operator": "Equal", "value": "fake"}
        ]
    if flavour in PLAIN:
        # A plain KubeSpawner of a hardened deployment: the namespace enforces the restricted
        # Pod Security level for both. "storage" also mounts what a CASA session mounts: the
        # user's home from the shared claim (by subPath), the measures read-only, and /tmp.
        storage = {
            "volumes": [
                {"name": "home", "persistentVolumeClaim": {"claimName": "cavern"}},
                {
                    "name": "measures",
                    "persistentVolumeClaim": {"claimName": "casa-measures", "readOnly": True},
                },
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            ],
            "volume_mounts": [
                {"name": "home", "mountPath": "/home/jovyan", "subPath": "home/{username}"},
                {"name": "measures", "mountPath": "/opt/casa/measures", "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
        return {
            **common,
            **(storage if flavour == "storage" else {}),
            "image": setting.image_ref,
            "uid": 1000,
            "gid": 1000,
            "cpu_guarantee": CPU_GUARANTEE,
            "cpu_limit": CPU_LIMIT,
            "mem_guarantee": MEM_GUARANTEE,
            "mem_limit": MEM_LIMIT,
            "automount_service_account_token": False,
            "container_security_context": {
                "runAsNonRoot": True,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        }
    from casaspawner.hubconfig import CLAIMS

    return {
        **common,
        **CLAIMS,
        "storage_hub_path": str(env.cavern),
        "project_group_pattern": "proj-.*",
        "image_template": setting.image_ref,
        "session_sizes": {
            "bench": {
                "cpu_guarantee": CPU_GUARANTEE,
                "cpu_limit": CPU_LIMIT,
                "mem_guarantee": MEM_GUARANTEE,
                "mem_limit": MEM_LIMIT,
                "description": "the benchmark's",
            }
        },
        "default_size": "bench",
        "scratch_size_limit": "16Mi",
        "tmp_size_limit": "16Mi",
    }


@dataclass
class Users:
    """The hub's users and their spawners, one per user, reused across rounds as the hub does."""

    env: Environment
    datasets: dict[str, str]
    token: str = field(default_factory=lambda: "bench-" + secrets.token_urlsafe(16))
    spawners: dict[tuple[str, str, int], Any] = field(default_factory=dict)

    def spawner(self, flavour: str, setting: Setting, index: int) -> Any:
        key = (flavour, setting.name, index)
        if key not in self.spawners:
            from kubespawner import KubeSpawner

            from casaspawner.kube.spawner import CASASpawner

            cls = CASASpawner if flavour == "casa" else KubeSpawner
            settings = spawner_settings(flavour, self.env, setting)
            with acting_as(self.env.account):
                self.spawners[key] = cls(
                    _mock=True, user=bench_user(index, self.token), **settings
                )
        return self.spawners[key]

    def options(self, flavour: str, index: int) -> dict[str, Any]:
        if flavour in PLAIN:
            return {}
        return {"dataset": self.datasets[username(index)], "interface": "lab"}


# One spawn, one round
@dataclass
class Spawn:
    running: float
    answering: float


async def spawn(spawner: Any, options: dict[str, Any]) -> Spawn:
    """What JupyterHub does to start a server, timed: options, start, then the URL answering."""
    from jupyterhub.utils import maybe_future, wait_for_http_server

    began = time.perf_counter()
    # JupyterHub's new token for the server (a CASA session fetches its access token with it).
    spawner.api_token = secrets.token_hex(16)
    spawner.user_options = options
    await spawner._run_apply_user_options(options)
    await maybe_future(spawner.run_pre_spawn_hook())
    url = await spawner.start()
    running = time.perf_counter()
    await wait_for_http_server(url, timeout=120)
    answering = time.perf_counter()
    # A CASA session fetches the user's access token while it comes up: counted here.
    if getattr(spawner, "token_url", None):
        await TOKEN_DESK.fetch(spawner)
    return Spawn(running - began, answering - began)


#: The session's side of fetching its token, in a process of its own as it is in the pod. Each
#: input line ``<id> <port> <pod> <token>`` is one request, answered by ``<id> <answer in hex>``.
SESSION_SIDE = r"""
import socket, sys, threading
lock = threading.Lock()
def fetch(ident, port, name, token):
    request = (
        f"POST /casa-token/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: token {token}\r\nContent-Length: 2\r\n"
        "Connection: close\r\n\r\n{}"
    )
    with socket.create_connection(("127.0.0.1", int(port))) as conn:
        conn.sendall(request.encode())
        answer = b"".join(iter(lambda: conn.recv(65536), b""))
    with lock:
        sys.stdout.write(f"{ident} {answer.hex()}\n")
        sys.stdout.flush()
for line in sys.stdin:
    threading.Thread(target=fetch, args=line.split()).start()
"""


class TokenDesk:
    """The hub's side of a session fetching its access token, over HTTP, in this process.

    kwok's pods run nothing, so the benchmark asks for each session, as its extension would,
    at a tornado handler of its own on 127.0.0.1. The handler does what the hub's does (the
    pod's address from the pod watch, the spawner's checks and hand-out) but JupyterHub's own
    token lookup; the request's address is the pod's, which the benchmark's requests cannot
    come from. The session's side (connecting, sending, reading) runs in a process of its own,
    as it runs in the pod: the hub's CPU counted is the handler's, and a line each way on a pipe.
    """

    def __init__(self) -> None:
        self.spawners: dict[str, Any] = {}
        self.port = 0
        self.session_side: asyncio.subprocess.Process | None = None
        self.waiting: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        from tornado import web

        desk = self

        class Handler(web.RequestHandler):
            def post(self, name: str) -> None:
                from casaspawner.kube import objects

                spawner = desk.spawners[name]
                token = self.request.headers["Authorization"].split(" ", 1)[1]
                pod = spawner.pod_reflector.pods[f"{spawner.namespace}/{spawner.pod_name}"]
                address = next(iter(objects.pod_addresses(pod)))
                self.write({"token": spawner.hand_out_access_token(token, address)})

        app = web.Application([(r"/casa-token/([^/]+)", Handler)], log_function=lambda _: None)
        server = app.listen(0, "127.0.0.1")
        self.port = next(iter(server._sockets.values())).getsockname()[1]
        self.session_side = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SESSION_SIDE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        asyncio.get_running_loop().create_task(self._answers())

    async def _answers(self) -> None:
        assert self.session_side is not None and self.session_side.stdout is not None
        async for line in self.session_side.stdout:
            ident, answer = line.split()
            self.waiting.pop(ident.decode()).set_result(bytes.fromhex(answer.decode()))

    async def fetch(self, spawner: Any) -> None:
        self.spawners[spawner.pod_name] = spawner
        if not self.port:
            await self.start()
        assert self.session_side is not None and self.session_side.stdin is not None
        ident = secrets.token_hex(8)
        answered = self.waiting[ident] = asyncio.get_running_loop().create_future()
        line = f"{ident} {self.port} {spawner.pod_name} {spawner.api_token}\n"
        self.session_side.stdin.write(line.encode())
        answer = await asyncio.wait_for(answered, 60)
        head, body = answer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{spawner.pod_name}: the token was not handed out: {answer!r}")
        assert json.loads(body)["token"] == spawner.access_token, answer

    async def close(self) -> None:
        """End the session side's process."""
        if self.session_side is not None and self.session_side.stdin is not None:
            self.session_side.stdin.close()
            await self.session_side.wait()
            self.session_side = None


TOKEN_DESK = TokenDesk()


async def stop(spawner: Any) -> None:
    await spawner.stop(now=True)
    spawner.clear_state()


async def wait_empty(env: Environment, timeout: float = 180) -> None:
    """Until the namespace holds no pod and no Secret."""
    core = client.CoreV1Api(env.api)
    deadline = time.monotonic() + timeout
    while True:
        pods = await core.list_namespaced_pod(env.namespace)
        secrets_ = await core.list_namespaced_secret(env.namespace)
        if not pods.items and not secrets_.items:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"left in {env.namespace}: {len(pods.items)} pods, {len(secrets_.items)} Secrets"
            )
        await asyncio.sleep(0.5)


@dataclass
class Round:
    flavour: str
    setting: str
    concurrency: int
    cache: str  # "cold" or "warm" (CASA); "-" for KubeSpawner
    spawns: list[Spawn]
    hub_cpu: float
    worker_cpu: float
    stop_cpu: float
    requests: dict[str, int]
    stop_requests: dict[str, int]
    elapsed: float
    #: The round's block: each block runs every flavour once, one after the other.
    block: int = 0
    #: CPU seconds of the cluster's processes while the round's spawns ran and a second after,
    #: above their rate at rest in the second before, by component.
    cluster_cpu: dict[str, float] = field(default_factory=dict)


async def one_round(
    users: Users, flavour: str, setting: Setting, concurrency: int, cache: str, block: int = 0
) -> Round:
    spawners = [users.spawner(flavour, setting, i) for i in range(concurrency)]
    options = [users.options(flavour, i) for i in range(concurrency)]
    if setting.image == "pulled":
        forget_image(setting.image_ref)
    if cache == "cold":
        clear_resolution_cache()
    gc.collect()
    # The cluster's CPU at rest, in the second before the round, is taken off the round's.
    idle0, idle_began = cluster_processes(), time.perf_counter()
    await asyncio.sleep(1)
    cluster0 = cluster_processes()
    idle_rate = {
        component: seconds / (time.perf_counter() - idle_began)
        for component, seconds in cluster_cpu_between(idle0, cluster0).items()
    }
    COUNTER.take()
    self0, children0, began = (
        cpu_seconds(resource.RUSAGE_SELF),
        cpu_seconds(resource.RUSAGE_CHILDREN),
        time.perf_counter(),
    )
    results = await asyncio.gather(*(spawn(s, o) for s, o in zip(spawners, options, strict=True)))
    elapsed = time.perf_counter() - began
    self1, children1 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    # The cluster goes on with the pods a moment after they answer (a kubelet's status, a
    # watcher's turn): a second more, also less its rate at rest, is counted.
    await asyncio.sleep(CLUSTER_SETTLE)
    cluster = {
        component: seconds - idle_rate.get(component, 0.0) * (elapsed + CLUSTER_SETTLE)
        for component, seconds in cluster_cpu_between(cluster0, cluster_processes()).items()
    }
    requests = COUNTER.take()
    await asyncio.gather(*(stop(s) for s in spawners))
    self2 = cpu_seconds(resource.RUSAGE_SELF)
    stop_requests = COUNTER.take()
    await wait_empty(users.env)
    return Round(
        flavour,
        setting.name,
        concurrency,
        cache,
        list(results),
        self1 - self0,
        children1 - children0,
        self2 - self1,
        dict(requests),
        dict(stop_requests),
        elapsed,
        block,
        cluster,
    )


def clear_resolution_cache() -> None:
    """Empty the hub's resolution cache, where this casaspawner has one."""
    try:
        from casaspawner.datasets import cache
    except ImportError:
        return
    cache.RESOLUTIONS.clear()


#: Rounds per flavour and concurrency, after the first (cold) one.
WARM_ROUNDS = {1: 12, 20: 6, 100: 3}


async def overhead(users: Users, settings: list[Setting], levels: tuple[int, ...]) -> list[Round]:
    rounds: list[Round] = []
    if "casa" in FLAVOURS:
        # The pod reflector is CASASpawner's, as in a hub of CASASpawners (it wakes a CASA start
        # when its pod runs). KubeSpawner's spawners share it and look at it as they always do.
        with acting_as(users.env.account):
            await users.spawner("casa", settings[0], 0)._start_watching_pods()
    for setting in settings:
        for concurrency in levels:
            # Both spawners once, untimed: the shared reflectors, connections, imports.
            for flavour in FLAVOURS:
                await one_round(users, flavour, setting, 1, "warm" if flavour == "casa" else "-")
            for index in range(1 + WARM_ROUNDS[concurrency]):
                cache = "cold" if index == 0 else "warm"
                for flavour in FLAVOURS if index % 2 == 0 else reversed(FLAVOURS):
                    state = cache if flavour == "casa" else "-"
                    done = await one_round(users, flavour, setting, concurrency, state, index)
                    rounds.append(done)
                    median = statistics.median(s.answering for s in done.spawns)
                    log(
                        f"{setting.name} x{concurrency} {flavour} {done.cache}: median "
                        f"{median:.3f} s, hub CPU {done.hub_cpu / concurrency * 1e3:.1f} ms/spawn"
                        f", worker {done.worker_cpu / concurrency * 1e3:.1f} ms/spawn, cluster "
                        f"{sum(done.cluster_cpu.values()) / concurrency * 1e3:.1f} ms/spawn, "
                        f"{sum(done.requests.values()) / concurrency:.1f} requests/spawn"
                    )
    return rounds


#: The summary's rows: flavour and cache state.
FLAVOUR_ROWS = (("kube", "-"), ("storage", "-"), ("casa", "warm"), ("casa", "cold"))


def summarise(rounds: list[Round]) -> list[dict[str, Any]]:
    """Medians per setting, concurrency, flavour and cache state; the ratios CASA ÷ plain."""
    table: list[dict[str, Any]] = []
    keys = sorted({(r.setting, r.concurrency) for r in rounds}, key=lambda k: (k[0], k[1]))
    for setting, concurrency in keys:
        rows: dict[str, Any] = {"setting": setting, "concurrency": concurrency}
        chosen_by_label: dict[str, list[Round]] = {}
        for flavour, cache in FLAVOUR_ROWS:
            chosen = [
                r
                for r in rounds
                if (r.setting, r.concurrency, r.flavour, r.cache)
                == (setting, concurrency, flavour, cache)
            ]
            if not chosen:
                continue
            spawns = [s for r in chosen for s in r.spawns]
            count = len(spawns)
            requests: Counter[str] = Counter()
            for r in chosen:
                requests.update(r.requests)
            label = flavour if flavour in PLAIN else f"casa_{cache}"
            chosen_by_label[label] = chosen
            # The cluster's CPU compares only on the fake nodes: on the real node the previous
            # round's containers and the image removal are still being cleaned up in the second
            # taken as its rate at rest, and whatever round follows carries it.
            cluster: Counter[str] = Counter()
            for r in chosen:
                cluster.update(r.cluster_cpu if setting == "fake" else {})
            rows[label] = {
                "spawns": count,
                "rounds": len(chosen),
                "running_median_s": statistics.median(s.running for s in spawns),
                "answering_median_s": _median_answering(chosen),
                "answering_p90_s": _quantile([s.answering for s in spawns], 0.9),
                "hub_cpu_ms_per_spawn": _cpu_per_spawn(chosen) * 1e3,
                "worker_cpu_ms_per_spawn": sum(r.worker_cpu for r in chosen) / count * 1e3,
                "stop_hub_cpu_ms_per_spawn": sum(r.stop_cpu for r in chosen) / count * 1e3,
                **(
                    {
                        "cluster_cpu_ms_per_spawn": sum(cluster.values()) / count * 1e3,
                        "cluster_cpu_ms_per_spawn_by_component": {
                            k: round(v / count * 1e3, 2) for k, v in sorted(cluster.items())
                        },
                    }
                    if cluster
                    else {}
                ),
                "requests_per_spawn": sum(requests.values()) / count,
                "requests_by_kind_per_spawn": {
                    k: round(v / count, 2) for k, v in sorted(requests.items())
                },
            }
        pairs = [("casa_warm", "kube", ""), ("casa_cold", "kube", ""), ("storage", "kube", "")]
        pairs.append(("casa_warm", "storage", "_to_storage"))
        for label, base, suffix in pairs:
            if label in rows and base in rows:
                casa, kube = rows[label], rows[base]
                rows[f"ratio_{label}{suffix}"] = {
                    "wall_answering": casa["answering_median_s"] / kube["answering_median_s"],
                    "wall_running": casa["running_median_s"] / kube["running_median_s"],
                    "hub_cpu": casa["hub_cpu_ms_per_spawn"] / kube["hub_cpu_ms_per_spawn"],
                    "hub_and_worker_cpu": (
                        casa["hub_cpu_ms_per_spawn"] + casa["worker_cpu_ms_per_spawn"]
                    )
                    / (kube["hub_cpu_ms_per_spawn"] + kube["worker_cpu_ms_per_spawn"]),
                    "requests": casa["requests_per_spawn"] / kube["requests_per_spawn"],
                    **(
                        {
                            "cluster_cpu": casa["cluster_cpu_ms_per_spawn"]
                            / kube["cluster_cpu_ms_per_spawn"]
                        }
                        if "cluster_cpu_ms_per_spawn" in casa
                        else {}
                    ),
                    **_intervals(chosen_by_label[label], chosen_by_label[base]),
                }
        table.append(rows)
    return table


#: Resamples of the blocks behind each ratio's interval, and the interval's coverage.
RESAMPLES, COVERAGE = 2000, 0.95


def _intervals(rounds: list[Round], base: list[Round]) -> dict[str, Any]:
    """The wall and CPU ratios over the blocks both ran in, with intervals from resampling them.

    Rounds of one block ran one after the other, so they shared the cluster's state; the blocks
    differ much more (the machine's other load, etcd's compactions). A resample draws blocks with
    replacement and keeps each drawn block's rounds of both flavours together. Empty with fewer
    than two such blocks.
    """
    mine = {r.block: r for r in rounds}
    theirs = {r.block: r for r in base}
    blocks = sorted(mine.keys() & theirs.keys())
    if len(blocks) < 2:
        return {}

    def ratios(drawn: list[int]) -> tuple[float, float]:
        a, b = [mine[k] for k in drawn], [theirs[k] for k in drawn]
        wall = _median_answering(a) / _median_answering(b)
        return wall, _cpu_per_spawn(a) / _cpu_per_spawn(b)

    draw = random.Random(0)
    resampled = [ratios([draw.choice(blocks) for _ in blocks]) for _ in range(RESAMPLES)]
    walls, cpus = [w for w, _ in resampled], [c for _, c in resampled]
    tail = (1 - COVERAGE) / 2
    wall, cpu = ratios(blocks)
    return {
        "blocks": len(blocks),
        "wall_answering_paired": wall,
        "wall_answering_interval": [_quantile(walls, tail), _quantile(walls, 1 - tail)],
        "hub_cpu_paired": cpu,
        "hub_cpu_interval": [_quantile(cpus, tail), _quantile(cpus, 1 - tail)],
    }


def _median_answering(rounds: list[Round]) -> float:
    return statistics.median(s.answering for r in rounds for s in r.spawns)


def _cpu_per_spawn(rounds: list[Round]) -> float:
    return sum(r.hub_cpu for r in rounds) / sum(len(r.spawns) for r in rounds)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# Setup
async def prepare(api: Any, users_count: int) -> tuple[Environment, Users]:
    env = Environment(api)
    env.namespace = await create_namespace(api)
    env.account = await create_hub_account(api, env.namespace, KUBECONFIG, env.workdir)
    env.cavern = Path(tempfile.mkdtemp(prefix="kube-bench-cavern-"))
    env.measures = Path(tempfile.mkdtemp(prefix="kube-bench-measures-"))
    env.measures.chmod(0o755)
    datasets = write_homes(env.cavern, users_count)
    env.volumes = await bind_storage(api, env.namespace, env.cavern, env.measures)
    return env, Users(env, datasets)


def ensure_busybox() -> None:
    present = subprocess.run(["buildah", "inspect", BUSYBOX_IMAGE], capture_output=True)
    if present.returncode != 0:
        build_busybox_image()
    run([str(CLUSTER_DIR / "import-image"), BUSYBOX_IMAGE])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from kubernetes_asyncio import config

    api = await config.new_client_from_config(config_file=str(KUBECONFIG), persist_config=False)
    COUNTER.install()
    env = None
    try:
        ensure_busybox()
        env, users = await prepare(api, max(args.levels))
        await register_fake_nodes(api, env)
        answer_on_fake_addresses(env)
        settings = []
        for name in args.settings:
            if name == "fake":
                settings.append(Setting("fake", "present", BUSYBOX_IMAGE))
            elif name == "node-present":
                settings.append(Setting("node", "present", BUSYBOX_IMAGE))
            elif name == "node-pulled":
                settings.append(Setting("node", "pulled", start_registry(env)))
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        rounds = await overhead(users, settings, tuple(args.levels))
        if profiler:
            profiler.disable()
            stats = pstats.Stats(profiler)
            stats.sort_stats("cumulative").print_stats(80)
            stats.sort_stats("tottime").print_stats(40)
        from kubespawner import KubeSpawner

        await KubeSpawner._stop_all_reflectors()
        await TOKEN_DESK.close()
        return {"rounds": [asdict(r) for r in rounds], "summary": summarise(rounds)}
    finally:
        COUNTER.uninstall()
        if env is not None:
            await cleanup(env)
        await api.close()


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Median wall time and hub CPU per spawn, KubeSpawner beside CASASpawner, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{row['setting'].replace('-', chr(10))}\n{row['concurrency']} at once" for row in summary
    ]
    series = (
        ("kube", "KubeSpawner"),
        ("storage", "KubeSpawner, CASA's storage"),
        ("casa_warm", "CASASpawner"),
        ("casa_cold", "CASA, cold"),
    )
    figure, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.2
    for offset, (key, name) in enumerate(series):
        positions = [i + (offset - 1.5) * width for i in range(len(summary))]
        walls = [row.get(key, {}).get("answering_median_s", 0) for row in summary]
        cpus = [row.get(key, {}).get("hub_cpu_ms_per_spawn", 0) for row in summary]
        clusters = [row.get(key, {}).get("cluster_cpu_ms_per_spawn", 0) for row in summary]
        axes[0].bar(positions, walls, width, label=name)
        axes[1].bar(positions, cpus, width, label=name)
        axes[2].bar(positions, clusters, width, label=name)
    titles = (
        "start to answering, median (s)",
        "hub CPU per spawn (ms)",
        "the cluster's CPU per spawn, fake nodes (ms)",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_xticks(range(len(summary)), labels, fontsize=7)
        axis.set_title(title)
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", help="import casaspawner from this tree (a baseline)")
    parser.add_argument("--levels", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["fake", "node-present", "node-pulled"],
        choices=["fake", "node-present", "node-pulled"],
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "kube-spawn.json")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 or not in_cluster_namespace():
        sys.exit("run inside the cluster's network namespace as root: make bench-kube")
    began = time.monotonic()
    results = asyncio.run(main_async(args))
    results = {
        "casaspawner": __version__,
        "code": args.code or str(REPO),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seconds": round(time.monotonic() - began, 1),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results["summary"], args.out.with_suffix(".png"))
    for row in results["summary"]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

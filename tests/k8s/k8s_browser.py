"""A real hub, proxy, OIDC provider and browser inside the cluster's network namespace.

There pod IPs answer, pods reach the hub at the node's address (10.244.0.1) and the API server
answers on 127.0.0.1 as on the host. The hub runs ``hub-config/k8s-test/jupyterhub_config.py``
(the shipped configuration, placed in the namespace); the tests talk to it with ``curl`` run in
the namespace, and drive Debian's Chromium through Playwright, whose driver (and so the browser)
starts in the namespace too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.browser import CHROMIUM, CHROMIUM_ARGS
from support.hub import stop_tree

from cluster import REPO, Cluster

HUB_CONFIG = REPO / "hub-config" / "k8s-test" / "jupyterhub_config.py"
NPM_BIN = REPO / ".cache" / "npm" / "node_modules" / ".bin"
#: Ports the tests' processes take in the namespace: below the ephemeral range, where nothing
#: of the cluster listens.
PORT_BASE = 18000


def free_ports(cluster: Cluster, count: int) -> list[int]:
    """``count`` ports no process in the namespace listens on."""
    taken = cluster.run_in_netns(["ss", "-Htln"]).stdout
    used = {int(line.split()[3].rsplit(":", 1)[1]) for line in taken.splitlines() if line.strip()}
    start = PORT_BASE + secrets.randbelow(1000) * 4
    ports = [port for port in range(start, start + 100) if port not in used]
    return ports[:count]


@dataclass
class Process:
    """A process started in the namespace, and the file its output goes to."""

    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """Stop it and everything it started (the hub's proxy and services)."""
        stop_tree(self.process, timeout=15)


def start_in_netns(
    cluster: Cluster, argv: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> Process:
    with log.open("wb") as out:
        process = subprocess.Popen(
            cluster.netns_argv(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(process, log)


def wait_for_output(process: Process, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.output():
        if process.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} from {process.process.args}:\n{process.output()}")
        time.sleep(0.2)


def start_oidc_provider(
    cluster: Cluster, users: dict[str, Any], workdir: Path
) -> tuple[Process, str]:
    """oidc-provider-mock in the namespace, with ``users``; returns it and its URL."""
    (port,) = free_ports(cluster, 1)
    script = Path(__file__).resolve().parent / "oidc_provider.py"
    provider = start_in_netns(
        cluster,
        [sys.executable, str(script), str(port), json.dumps(users)],
        workdir / "oidc-provider.log",
        dict(os.environ),
    )
    wait_for_output(provider, "ready")
    return provider, f"http://127.0.0.1:{port}"


@dataclass
class HubProcess:
    """JupyterHub with CASASpawner in the namespace, and the tests' token for its API."""

    cluster: Cluster
    process: Process
    url: str
    token: str
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.process.output()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the hub's REST API (``/hub/api`` + ``path``) from inside the namespace."""
        argv = ["curl", "-sS", "--max-time", "30", "-X", method, "-w", "\n%{http_code}"]
        argv += ["-H", f"Authorization: token {self.token}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
        answer = self.cluster.run_in_netns([*argv, f"{self.url}/hub/api{path}"])
        text, _, status = answer.stdout.rpartition("\n")
        if not status.startswith("2"):
            raise RuntimeError(f"{method} {path}: {status} {text} {answer.stderr}")
        return json.loads(text) if text.strip() else None

    def server(self, user: str) -> dict[str, Any] | None:
        servers: dict[str, Any] = self.api("GET", f"/users/{user}")["servers"]
        return servers.get("")

    def stop_server(self, user: str, timeout: float = 180) -> None:
        if self.server(user) is None:
            return
        self.api("DELETE", f"/users/{user}/server")
        deadline = time.monotonic() + timeout
        while self.server(user) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server of {user} did not stop:\n{self.log()[-3000:]}")
            time.sleep(1)

    def stop(self) -> None:
        self.process.stop()


def start_hub(
    cluster: Cluster,
    workdir: Path,
    namespace: str,
    kubeconfig: Path,
    issuer: str,
    env: dict[str, str],
    config: Path = HUB_CONFIG,
) -> HubProcess:
    """The hub of ``hub-config/k8s-test`` (or ``config``), ready to answer."""
    port, hub_port, proxy_port, sessions_port = free_ports(cluster, 4)
    url = f"http://127.0.0.1:{port}"
    token = secrets.token_hex(16)
    environment = {
        **os.environ,
        "PATH": os.pathsep.join(
            [str(Path(sys.executable).parent), str(NPM_BIN), os.environ.get("PATH", "")]
        ),
        "KUBECONFIG": str(kubeconfig),
        "OIDC_ISSUER": issuer,
        "OAUTH_CLIENT_ID": "casaspawner-hub",
        "OAUTH_CLIENT_SECRET": "k8s-tier-" + secrets.token_hex(8),
        "OAUTH_CALLBACK_URL": f"{url}/hub/oauth_callback",
        "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
        "CASASPAWNER_RELEASE_STATE": str(workdir / "casa-release-state.json"),
        "CASA_SESSIONS_URL": f"http://10.244.0.1:{sessions_port}",
        "CASA_CULL_TIMEOUT": "0",
        "CASA_K8S_WORKDIR": str(workdir),
        "CASA_K8S_PORT": str(port),
        "CASA_K8S_HUB_PORT": str(hub_port),
        "CASA_K8S_PROXY_PORT": str(proxy_port),
        "CASA_K8S_NAMESPACE": namespace,
        "CASA_K8S_ADMIN_TOKEN": token,
        **env,
    }
    process = start_in_netns(
        cluster,
        [sys.executable, "-m", "jupyterhub", "-f", str(config)],
        workdir / "jupyterhub.log",
        environment,
        cwd=workdir,
    )
    hub = HubProcess(cluster, process, url, token, environment)
    deadline = time.monotonic() + 90
    while True:
        try:
            hub.api("GET", "/")
            return hub
        except RuntimeError:
            if process.process.poll() is not None or time.monotonic() > deadline:
                hub.stop()
                raise RuntimeError(f"the hub did not start:\n{hub.log()[-4000:]}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def browser_in_netns(cluster: Cluster, workdir: Path) -> Iterator[Any]:
    """Chromium (Debian's), launched by a Playwright driver that runs in the namespace."""
    import playwright
    from playwright.sync_api import sync_playwright

    node = Path(playwright.__file__).parent / "driver" / "node"
    wrapper = workdir / "node-in-netns"
    wrapper.write_text("#!/bin/sh\n" + " ".join(cluster.netns_argv([str(node)])) + ' "$@"\n')
    wrapper.chmod(0o755)
    previous = os.environ.get("PLAYWRIGHT_NODEJS_PATH")
    os.environ["PLAYWRIGHT_NODEJS_PATH"] = str(wrapper)
    try:
        with sync_playwright() as playwright_api:
            chromium = playwright_api.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                yield chromium
            finally:
                chromium.close()
    finally:
        if previous is None:
            os.environ.pop("PLAYWRIGHT_NODEJS_PATH", None)
        else:
            os.environ["PLAYWRIGHT_NODEJS_PATH"] = previous

"""A real JupyterHub keeping 1,000 CASA sessions on kwok's fake nodes: pages and memory.

Run by ``make bench-kube`` after ``kube_bench.py``, inside the cluster's network namespace, as
root. The hub is ``hub-config/k8s-test`` (the shipped configuration, casa-sessions included) with
``benchmarks/kube_scale_config.py`` on top: users and their auth_state are made through the hub's
API, and each user's session (their own Cycle 10 dataset, resolved by the hub) is started
through it, at most ``--parallel`` at a time. The pods go Running on fake nodes that kwok plays;
their addresses answer through one ``busybox httpd``. With every session running, the
casa-sessions page and its API, and the hub's ``/hub/api/users``, are timed (as the operator's
browser would ask, with a token that opens casa-sessions), and the resident memory of the hub
and of casa-sessions is compared with what it was before the first session (per session).
Results: ``benchmarks/results/kube-scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import kube_bench as kb  # the overhead benchmark's cluster side and users
from k8s_browser import HubProcess, start_hub

from casaspawner import __version__
from cluster import NETNS, Cluster

CONFIG = Path(__file__).resolve().parent / "kube_scale_config.py"
#: How often each page is asked for, once every session runs.
ASKS = 10


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def service_pid(hub_pid: int) -> int:
    """The pid of casa-sessions, a child of the hub."""
    from casaspawner.local.processes import descendants

    for pid in descendants(hub_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"casaspawner.services" in part for part in argv):
            return pid
    raise RuntimeError("casa-sessions is not running under the hub")


class HubAPI:
    """The hub's REST API and pages, with the benchmark's token."""

    def __init__(self, hub: HubProcess, session: aiohttp.ClientSession) -> None:
        self.hub = hub
        self.session = session
        self.headers = {"Authorization": f"token {hub.token}"}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(
            method, f"{self.hub.url}/hub/api{path}", json=body, headers=self.headers
        ) as response:
            text = await response.text()
            return response.status, json.loads(text) if text.strip() else None

    async def timed_get(self, path: str) -> tuple[float, int, int, int | None]:
        """Seconds to the whole answer of ``path``, its status, its size and its Age header."""
        began = time.perf_counter()
        async with self.session.get(f"{self.hub.url}{path}", headers=self.headers) as response:
            body = await response.read()
        age = response.headers.get("Age")
        return time.perf_counter() - began, response.status, len(body), int(age) if age else None


async def make_users(api: HubAPI, users: kb.Users, count: int) -> None:
    names = [kb.username(i) for i in range(count)]
    status, answer = await api.call("POST", "/users", {"usernames": names})
    if status != 201:
        raise RuntimeError(f"creating users: {status} {answer}")
    limit = asyncio.Semaphore(20)

    async def auth_state(index: int) -> None:
        state = kb.bench_user(index, users.token).auth_state
        async with limit:
            status, answer = await api.call(
                "PATCH", f"/users/{kb.username(index)}", {"auth_state": state}
            )
        if status != 200:
            raise RuntimeError(f"auth_state of {kb.username(index)}: {status} {answer}")

    await asyncio.gather(*(auth_state(i) for i in range(count)))


async def start_sessions(api: HubAPI, users: kb.Users, count: int, parallel: int) -> list[float]:
    """Start every user's session through the hub; seconds from request to ready, each."""
    limit = asyncio.Semaphore(parallel)

    async def start(index: int) -> float:
        name = kb.username(index)
        async with limit:
            began = time.perf_counter()
            status, answer = await api.call(
                "POST", f"/users/{name}/server", users.options("casa", index)
            )
            if status not in (201, 202):
                raise RuntimeError(f"starting {name}: {status} {answer}")
            deadline = time.monotonic() + 600
            while status != 201:
                await asyncio.sleep(1)
                _, model = await api.call("GET", f"/users/{name}")
                server = (model.get("servers") or {}).get("")
                if server and server.get("ready"):
                    break
                if not server or time.monotonic() > deadline:
                    raise RuntimeError(f"the session of {name} did not start: {server}")
            return time.perf_counter() - began

    return list(await asyncio.gather(*(start(i) for i in range(count))))


async def ask_pages(api: HubAPI, count: int) -> dict[str, Any]:
    """Each page ``ASKS`` times, one after another: first, median and worst, status, size.

    The first answer of casa-sessions is apart: it waits at most a quarter of a second for a
    read of the hub's servers, else shows the service's last background read (``first_age_s``
    says how old); later answers share that read (the service's snapshot).
    """
    pages = {
        "casa-sessions page": "/services/casa-sessions/",
        "casa-sessions API": "/services/casa-sessions/api/sessions",
        "hub API /users": "/hub/api/users",
        f"hub API /users?limit={count}": f"/hub/api/users?limit={count}",
    }
    timings: dict[str, Any] = {}
    for label, path in pages.items():
        answers = [await api.timed_get(path) for _ in range(ASKS)]
        statuses = {status for _, status, _, _ in answers}
        if statuses != {200}:
            raise RuntimeError(f"{path} answered {statuses}")
        seconds = [t for t, _, _, _ in answers]
        timings[label] = {
            "path": path,
            "first_s": seconds[0],
            "median_s": statistics.median(seconds),
            "max_s": max(seconds),
            "bytes": answers[-1][2],
            # casa-sessions': how old the first answer's sessions were, in seconds.
            "first_age_s": answers[0][3],
        }
    return timings


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from kubernetes_asyncio import config

    api_client = await config.new_client_from_config(
        config_file=str(kb.KUBECONFIG), persist_config=False
    )
    env = None
    hub = None
    try:
        kb.ensure_busybox()
        env, users = await kb.prepare(api_client, args.sessions)
        await kb.register_fake_nodes(api_client, env)
        kb.answer_on_fake_addresses(env)
        setting = kb.Setting("fake", "present", kb.BUSYBOX_IMAGE)
        spawner = kb.spawner_settings("casa", env, setting)
        spawner.pop("namespace")
        cluster = Cluster(kubeconfig=kb.KUBECONFIG, netns=NETNS)
        hub = start_hub(
            cluster,
            env.workdir,
            env.namespace,
            env.account.kubeconfig,
            "http://127.0.0.1:9",
            {
                "CASA_STORAGE_HUB_PATH": str(env.cavern),
                "KUBE_SCALE_SPAWNER": json.dumps(spawner),
            },
            config=CONFIG,
        )
        pid = hub.process.process.pid
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            api = HubAPI(hub, session)
            await make_users(api, users, args.sessions)
            kb.log(f"{args.sessions} users with auth_state")
            await asyncio.sleep(2)
            before = {"hub": rss_mib(pid), "casa-sessions": rss_mib(service_pid(pid))}
            empty = await ask_pages(api, args.sessions)
            began = time.perf_counter()
            starts = await start_sessions(api, users, args.sessions, args.parallel)
            elapsed = time.perf_counter() - began
            kb.log(f"{args.sessions} sessions running after {elapsed:.0f} s")
            await asyncio.sleep(5)
            after = {"hub": rss_mib(pid), "casa-sessions": rss_mib(service_pid(pid))}
            full = await ask_pages(api, args.sessions)
        for label, timing in full.items():
            kb.log(
                f"{label}: first {timing['first_s']:.3f} s, median {timing['median_s']:.3f} s, "
                f"worst {timing['max_s']:.3f} s, first answer's age {timing['first_age_s']} s"
            )
        return {
            "sessions": args.sessions,
            "parallel": args.parallel,
            "start_all_s": elapsed,
            "start_median_s": statistics.median(starts),
            "start_p90_s": kb._quantile(starts, 0.9),
            "memory_mib_before": before,
            "memory_mib_after": after,
            "memory_kib_per_session": {
                name: (after[name] - before[name]) * 1024 / args.sessions for name in before
            },
            "pages_with_no_session": empty,
            "pages_with_all_sessions": full,
        }
    finally:
        if hub is not None:
            hub.stop()
        if env is not None:
            await kb.cleanup(env)
        await api_client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", help="import casaspawner from this tree (a baseline)")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--out", type=Path, default=kb.RESULTS / "kube-scale.json")
    args = parser.parse_args()
    if os.geteuid() != 0 or not kb.in_cluster_namespace():
        sys.exit("run inside the cluster's network namespace as root: make bench-kube")
    results = {
        "casaspawner": __version__,
        "machine": f"{os.cpu_count()} cores",
        **asyncio.run(main_async(args)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The real KubeSpawner start → poll → stop lifecycle against kmock on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

from conftest import dataset_in
from kube_support import FakeKubelet, stored


async def test_start_poll_stop(cluster, make_spawner, storage):
    emulator, server = cluster
    spawner = make_spawner(start_timeout=15, k8s_api_request_retry_timeout=10)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10"), "interface": "lab"}
    t0 = time.perf_counter()
    async with FakeKubelet(server).running():
        await spawner._run_apply_user_options(spawner.user_options)
        url = await asyncio.wait_for(spawner.start(), 20)
        print("start", time.perf_counter() - t0)
        assert url == "http://127.0.0.1:8888"
        assert await spawner.poll() is None
        secrets = stored(emulator, "secrets")
        print(secrets)
        await spawner.stop(now=True)
        print("stop", time.perf_counter() - t0)
        assert await spawner.poll() == 1

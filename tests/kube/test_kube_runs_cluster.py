"""``casaspawner run --kubernetes --stop/--follow`` against kmock: refusals are one sentence.

A Job that is not a run is left alone; a delete or a pod list the API server refuses is said
so, never taken for a stopped run or shown as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kmock", reason="the emulated API server is kmock's")

from support.kube import emulated_cluster, stored

from casaspawner.errors import InvalidInput
from casaspawner.kube import runs

JOBS = "/apis/batch/v1/namespaces/test/jobs"
FORBIDDEN = {
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "message": "the operator may not do that here",
    "reason": "Forbidden",
    "code": 403,
}


def a_job(name: str, labels: dict[str, str]) -> dict[str, Any]:
    pod = {"containers": [{"name": "casa", "image": "casa"}], "restartPolicy": "Never"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {"template": {"metadata": {"labels": labels}, "spec": pod}},
    }


@contextlib.asynccontextmanager
async def kube(tmp_path: Path, *jobs: dict[str, Any]) -> AsyncIterator[tuple[Any, runs.Cluster]]:
    """The emulator holding ``jobs``, and a ``Cluster`` of its namespace ``test``."""
    async with emulated_cluster(tmp_path / "kubeconfig") as (emulator, server):
        for job in jobs:
            async with server.client.post(JOBS, json=job) as response:
                assert response.status < 300, await response.text()
        args = argparse.Namespace(
            kubeconfig=str(tmp_path / "kubeconfig"), namespace="test", storage_path=None
        )
        async with runs.cluster(args) as cluster:
            yield emulator, cluster


async def test_a_job_that_is_not_a_run_is_neither_stopped_nor_followed(tmp_path: Path) -> None:
    other = a_job("web", {"app": "web"})
    async with kube(tmp_path, other) as (emulator, cluster):
        for action in (cluster.stop, cluster.follow):
            with pytest.raises(InvalidInput, match=r"^Job web in namespace test is not a casa"):
                await action("web")
        assert "web" in stored(emulator, "jobs")


async def test_a_refused_delete_is_said_so_not_stopped(tmp_path: Path) -> None:
    job = a_job("casa-run-alice-x", dict(runs.COMPONENT))
    async with kube(tmp_path, job) as (emulator, cluster):
        emulator[f"delete {JOBS}/casa-run-alice-x"] << 403 << FORBIDDEN
        with pytest.raises(InvalidInput) as refused:
            await cluster.stop("casa-run-alice-x")
        assert str(refused.value) == (
            "Kubernetes refused to delete Job casa-run-alice-x: the operator may not do that here."
        )


async def test_a_refused_pod_list_while_following_is_one_sentence(tmp_path: Path) -> None:
    job = a_job("casa-run-alice-x", dict(runs.COMPONENT))
    async with kube(tmp_path, job) as (emulator, cluster):
        emulator["get /api/v1/namespaces/test/pods"] << 403 << FORBIDDEN
        with pytest.raises(InvalidInput, match=r"^Kubernetes refused to list the pods of Job"):
            await cluster.follow("casa-run-alice-x")


async def test_a_stopped_run_whose_job_is_gone_ends_with_status_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = a_job("casa-run-alice-x", dict(runs.COMPONENT))
    async with kube(tmp_path, job) as (emulator, cluster):
        assert await cluster.stop("casa-run-alice-x") == 0
        assert "casa-run-alice-x" not in stored(emulator, "jobs")
    assert "run Job casa-run-alice-x ended: stopped." in capsys.readouterr().err


def test_an_image_pull_error_is_tried_again_only_its_back_off_is_hopeless() -> None:
    assert "ErrImagePull" not in runs.HOPELESS and "ImagePullBackOff" in runs.HOPELESS

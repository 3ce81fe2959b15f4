"""The same lifecycle on a real cluster (``KUBECONFIG`` set): admission under the restricted Pod Security level.

Setup the test makes itself (needs rights to create namespaces and PVCs): namespace ``$CASASPAWNER_K8S_NAMESPACE``
(default ``casaspawner-test``) labelled ``pod-security.kubernetes.io/enforce=restricted``, and 1 Gi claims
``cavern`` and ``casa-measures`` from the default storage class. Session image: ``$CASASPAWNER_K8S_IMAGE``
(default ``quay.io/jupyterhub/singleuser:5``), run with ``sleep`` since no hub answers the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from conftest import dataset_in
from kubernetes_asyncio.client.rest import ApiException

from casaspawner.spawners.errors import SpawnException

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="needs a real Kubernetes cluster: set KUBECONFIG"
    ),
]
NAMESPACE = os.environ.get("CASASPAWNER_K8S_NAMESPACE", "casaspawner-test")
IMAGE = os.environ.get("CASASPAWNER_K8S_IMAGE", "quay.io/jupyterhub/singleuser:5")


async def ensure_namespace_and_claims(api) -> None:
    namespace = {
        "metadata": {"name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
    }
    with contextlib.suppress(ApiException):
        await api.create_namespace(namespace)
    for claim in ("cavern", "casa-measures"):
        body = {
            "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        try:
            await api.create_namespaced_persistent_volume_claim(NAMESPACE, body)
        except ApiException as exc:
            if exc.status != 409:
                raise


def real_spawner(make_spawner, **config):
    config = {
        "namespace": NAMESPACE,
        "image_template": IMAGE,
        "cmd": ["sleep", "3600"],
        "start_timeout": 300,
        "unschedulable_is_fatal": False,  # claims may bind late on fresh clusters
        "session_sizes": {"small": {"cpu_guarantee": 0.05, "mem_guarantee": "64M", "mem_limit": "256M"}},
        "default_size": "small",
        **config,
    }
    return make_spawner(**config)


async def test_lifecycle_on_a_real_cluster(make_spawner, storage):
    from kubespawner import KubeSpawner

    spawner = real_spawner(make_spawner, pod_name_template="casa-k8s-{username}")
    try:
        await ensure_namespace_and_claims(spawner.api)
        spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
        await spawner._run_apply_user_options(spawner.user_options)
        await asyncio.wait_for(spawner.start(), 330)  # admitted under enforce=restricted
        assert await spawner.poll() is None
        secret = await spawner.api.read_namespaced_secret(spawner.token_secret_name, NAMESPACE)
        assert secret.metadata.owner_references[0].uid == spawner.pod_id
        state = spawner.get_state()
        restored = real_spawner(make_spawner)
        restored.load_state(state)
        assert await restored.poll() is None
        await restored.stop(now=True)
        assert await restored.poll() == 1
    finally:
        with contextlib.suppress(Exception):
            await spawner.stop(now=True)
        await KubeSpawner._stop_all_reflectors()


async def test_image_pull_failure_on_a_real_cluster(make_spawner, storage):
    from kubespawner import KubeSpawner

    spawner = real_spawner(
        make_spawner, image_template="registry.invalid/casa:{tag}", pod_name_template="casa-k8s-pull"
    )
    try:
        await ensure_namespace_and_claims(spawner.api)
        spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
        await spawner._run_apply_user_options(spawner.user_options)
        with pytest.raises(SpawnException) as info:
            await asyncio.wait_for(spawner.start(), 330)
        assert info.value.jupyterhub_message.startswith("The session image registry.invalid/casa:")
    finally:
        with contextlib.suppress(Exception):
            await spawner.stop(now=True)
        await KubeSpawner._stop_all_reflectors()

"""The real admission controller of a restricted namespace admits every pod CASASpawner builds.

And it refuses one an operator's hook made unsafe, which the user then reads as one sentence.
The hub acts as Zero to JupyterHub's hub ServiceAccount, never as the cluster's admin.
"""

from __future__ import annotations

from typing import Any

import pytest
from k8s_hub import (
    RELEASE,
    Z2JH_HUB_RULES,
    Hub,
    assert_no_failed_mount,
    create_hub_account,
    dataset_of,
    nothing_left,
    one_sentence,
    spawn,
)
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from casaspawner.datasets.synth import ERAS
from casaspawner.plan import DEFAULT_SIZES
from casaspawner.spawners.errors import SpawnException

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(600)]

#: Eras whose datasets tell no version: the user chooses a release, as the spawn form lets her.
CHOSEN = {"no-evidence": RELEASE}


async def test_every_session_pod_is_admitted_under_the_restricted_level(hub, api):
    """Every era's dataset, in lab and desktop, at every size: a server-side dry-run create."""
    from casaspawner.kube.spawner import CASASpawner

    spawner = hub.spawner(image_template="{registry}/casa:{tag}", cmd=["jupyterhub-singleuser"])
    assert isinstance(spawner, CASASpawner)
    admitted: list[tuple[str, str, str, str]] = []
    images = set()
    async with await hub_client(hub) as as_hub:
        core = client.CoreV1Api(as_hub)
        for era in ERAS:
            for interface in ("lab", "desktop"):
                for size in DEFAULT_SIZES:
                    options = {"dataset": dataset_of(hub.cavern, era), "interface": interface}
                    options["size"] = size
                    if era in CHOSEN:
                        options["release"] = CHOSEN[era]
                    await spawner._run_apply_user_options(options)
                    pod = await spawner.session_manifests()
                    # What the real admission controller (PodSecurity, enforce=restricted) says.
                    created = await core.create_namespaced_pod(hub.namespace, pod, dry_run="All")
                    container = created.spec.containers[0]
                    admitted.append((era, interface, size, container.image))
                    images.add(container.image)
                    assert created.spec.security_context.run_as_user == 41001
                    assert container.security_context.read_only_root_filesystem is True
    assert len(admitted) == len(ERAS) * 2 * len(DEFAULT_SIZES)
    assert len(images) > 10, images
    # A dry run stores nothing.
    await nothing_left(api, hub.namespace, timeout=1)


#: What an operator's modify_pod_hook changes (KubeSpawner keeps security contexts as dicts).
UNSAFE_HOOKS = {
    "root": lambda pod: pod.spec.containers[0].security_context.update(runAsUser=0),
    # The API refuses a privileged container that may not escalate privileges (422).
    "privileged": lambda pod: pod.spec.containers[0].security_context.update(
        privileged=True, allowPrivilegeEscalation=True
    ),
    "hostPath": lambda pod: pod.spec.volumes.append(
        client.V1Volume(name="host", host_path=client.V1HostPathVolumeSource(path="/etc"))
    ),
}
#: What the restricted level's admission says of each.
REFUSED_FOR = {
    "root": ['runAsUser=0 (container "notebook" must not set runAsUser=0)'],
    "privileged": [
        'privileged (container "notebook" must not set securityContext.privileged=true)',
        'allowPrivilegeEscalation != false (container "notebook" must set '
        "securityContext.allowPrivilegeEscalation=false)",
    ],
    "hostPath": ['restricted volume types (volume "host" uses restricted volume type "hostPath")'],
}


@pytest.mark.parametrize("unsafe", sorted(UNSAFE_HOOKS))
async def test_a_pod_an_operators_hook_made_unsafe_is_refused_in_one_sentence(hub, api, unsafe):
    """pod_security_level lowered, so only the cluster's admission stands in the way."""

    def hook(spawner: Any, pod: Any) -> Any:
        UNSAFE_HOOKS[unsafe](pod)
        return pod

    spawner = hub.spawner(pod_security_level="privileged", modify_pod_hook=hook)
    outcome, _messages = await spawn(spawner, {"dataset": dataset_of(hub.cavern, "cycle10")})
    assert isinstance(outcome, SpawnException), outcome
    message = outcome.jupyterhub_message
    assert one_sentence(message), message
    assert message.startswith(
        'The cluster refused the session pod: it violates PodSecurity "restricted:latest": '
    )
    assert all(reason in message for reason in REFUSED_FOR[unsafe]), message
    assert message.endswith(
        "change the hub's configuration (init containers, extra containers, volumes, "
        "extra_*_config, modify_pod_hook) or CASASpawner.pod_security_level."
    )
    assert outcome.status_code == 500
    # Nothing was created.
    await nothing_left(api, hub.namespace, timeout=10)
    await assert_no_failed_mount(api, hub.namespace)


async def test_the_hub_account_holds_only_zero_to_jupyterhubs_hub_role(hub):
    """What the spawner needs works as the hub's account; a cluster admin's work does not."""
    async with await hub_client(hub) as as_hub:
        core = client.CoreV1Api(as_hub)
        rbac = client.RbacAuthorizationV1Api(as_hub)
        await core.list_namespaced_pod(hub.namespace)
        await core.list_namespaced_event(hub.namespace)
        await core.list_namespaced_secret(hub.namespace)
        refused = [
            core.list_node(),
            core.list_namespaced_pod("default"),
            core.create_namespace({"metadata": {"name": "not-the-hubs"}}),
            core.list_namespaced_config_map(hub.namespace),
            core.patch_namespaced_secret(
                "any", hub.namespace, {"metadata": {"labels": {"a": "b"}}}
            ),
            rbac.list_namespaced_role(hub.namespace),
        ]
        for call in refused:
            with pytest.raises(ApiException) as forbidden:
                await call
            assert forbidden.value.status == 403, forbidden.value


async def hub_client(hub: Any) -> Any:
    """An API client with the hub ServiceAccount's kubeconfig."""
    from kubernetes_asyncio import config

    return await config.new_client_from_config(
        config_file=str(hub.account.kubeconfig), persist_config=False
    )


async def test_a_hub_whose_role_lacks_a_rule_gets_one_sentence(hub, api, cluster, tmp_path):
    """The same hub with a Role that forgot the events: the API refuses, the user reads why."""
    pods_only = [rule for rule in Z2JH_HUB_RULES if "events" not in rule["resources"]]
    account = await create_hub_account(
        api, hub.namespace, cluster.kubeconfig, tmp_path, rules=pods_only, name="hub-no-events"
    )
    spawner = Hub(cluster, account, hub.cavern, hub.busybox).spawner(
        k8s_api_request_retry_timeout=5
    )
    outcome, _ = await spawn(spawner, {"dataset": dataset_of(hub.cavern, "cycle10")})
    assert isinstance(outcome, SpawnException), outcome
    message = outcome.jupyterhub_message
    assert one_sentence(message), message
    assert message == (
        "The Kubernetes API refused the hub's request to list events in namespace "
        f"{hub.namespace} (403 Forbidden); the hub's Role must allow it."
    )
    await nothing_left(api, hub.namespace, timeout=10)

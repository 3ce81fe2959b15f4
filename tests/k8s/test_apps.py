"""The hub's side of a desktop's apps of other releases, on the real API server.

A desktop session (busybox idling, as the API-level tests run) spawned as Zero to JupyterHub's
hub account with ``desktop_apps``: its environment turns the desktop's TCP listener and menu on;
the two NetworkPolicies that guard its X server are refused to the chart's Role alone, in one
sentence, and created, owned by the session's pod and selecting it alone, once
``hub-config/z2jh/casa-apps-rbac.yaml`` is applied; the garbage collector removes them with the
pod. The session's pod tells the measures version its apps mount (measures kept by version).
The whole path, with a real desktop and a real app, is tests/k8s/test_browser.py's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_hub import create_hub_account, dataset_of, eventually, nothing_left, spawn
from kubernetes_asyncio import client, config

from casaspawner.errors import ConfigurationError, InvalidInput
from casaspawner.kube.apps import APP_RULES, SESSION_ENVIRONMENT
from casaspawner.kube.desktopapps import RBAC_SENTENCE, KubeApps
from casaspawner.kube.runs import Cluster
from cluster import REPO

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(600)]

APPS_RBAC = REPO / "hub-config" / "z2jh" / "casa-apps-rbac.yaml"


async def test_the_desktops_policies_need_casa_apps_rbac_and_go_with_its_pod(
    hub: Any, api: Any, cluster: Any, tmp_path: Path, no_measures: Path
) -> None:
    # Measures kept by version: the apps read the version the desktop mounted.
    kept = no_measures / "2026-11-01"
    (kept / "geodetic").mkdir(parents=True)
    try:
        await desktop_with_apps(hub, api, cluster, tmp_path, kept)
    finally:
        shutil.rmtree(kept, ignore_errors=True)


async def desktop_with_apps(hub: Any, api: Any, cluster: Any, tmp_path: Path, kept: Path) -> None:
    """The test itself, on a hub keeping the measures version ``kept``."""
    spawner = hub.spawner(desktop_apps=True, measures_versions_hub_path=str(kept.parent))
    dataset = dataset_of(hub.cavern, "cycle10")
    url, _ = await spawn(spawner, {"dataset": dataset, "interface": "desktop"})
    assert isinstance(url, str), url
    core, networking = client.CoreV1Api(api), client.NetworkingV1Api(api)
    pod = await core.read_namespaced_pod(spawner.pod_name, hub.namespace)
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert {k: env.get(k) for k in SESSION_ENVIRONMENT} == SESSION_ENVIRONMENT
    apps = KubeApps(spawner)
    session = await apps.session_pod()
    assert (session.name, session.uid, session.ip, session.measures) == (
        pod.metadata.name,
        pod.metadata.uid,
        pod.status.pod_ip,
        kept.name,
    )
    # Its apps copy casa-app from the image the session runs.
    assert session.image == pod.spec.containers[0].image

    # Zero to JupyterHub's hub Role alone may not create NetworkPolicies: one sentence.
    plain = await create_hub_account(
        api, hub.namespace, cluster.kubeconfig, tmp_path, name="plain-hub"
    )
    async with await config.new_client_from_config(
        config_file=str(plain.kubeconfig), persist_config=False
    ) as plain_api:
        refused = KubeApps(spawner)
        refused.cluster = Cluster(plain_api, hub.namespace)
        with pytest.raises(ConfigurationError) as error:
            await refused.guard(session)
        assert str(error.value) == str(ConfigurationError(RBAC_SENTENCE))
    assert (await networking.list_namespaced_network_policy(hub.namespace)).items == []

    # With the file the operator applies, bound to the chart's "hub" account: both policies,
    # once however often asked, owned by the session's pod, which alone they guard.
    role, binding = yaml.safe_load_all(APPS_RBAC.read_text())
    assert role["rules"] == APP_RULES
    rbac = client.RbacAuthorizationV1Api(api)
    await rbac.create_namespaced_role(hub.namespace, role)
    await rbac.create_namespaced_role_binding(hub.namespace, binding)

    async def guarded() -> bool:
        try:
            await apps.guard(session)
        # The authorizer takes the new binding in within moments.
        except ConfigurationError as exc:
            assert str(exc) == str(ConfigurationError(RBAC_SENTENCE))
            return False
        return True

    await eventually(guarded, 20, "the hub guarded the desktop")
    await apps.guard(session)
    policies = (await networking.list_namespaced_network_policy(hub.namespace)).items
    names = sorted(p.metadata.name for p in policies)
    assert names == [f"{session.name}-x-in", f"{session.name}-x-out"]
    for policy in policies:
        assert [o.uid for o in policy.metadata.owner_references] == [session.uid]
    (into,) = [p for p in policies if p.metadata.name.endswith("-x-in")]
    chosen = ",".join(f"{k}={v}" for k, v in into.spec.pod_selector.match_labels.items())
    selected = await core.list_namespaced_pod(hub.namespace, label_selector=chosen)
    assert [p.metadata.name for p in selected.items] == [session.name]

    # A policy of that name left by someone else (no owner, say) is replaced by the session's.
    await networking.delete_namespaced_network_policy(into.metadata.name, hub.namespace)
    stale = client.V1NetworkPolicy(
        metadata=client.V1ObjectMeta(name=into.metadata.name),
        spec=client.V1NetworkPolicySpec(pod_selector=client.V1LabelSelector()),
    )
    await networking.create_namespaced_network_policy(hub.namespace, stale)
    await apps.guard(session)
    replaced = await networking.read_namespaced_network_policy(into.metadata.name, hub.namespace)
    assert [o.uid for o in replaced.metadata.owner_references] == [session.uid]
    assert replaced.spec.pod_selector.match_labels == into.spec.pod_selector.match_labels

    # The operators remove the version the desktop reads: its apps are refused in one sentence,
    # before any pod (an app's pod would find no such directory to mount).
    shutil.rmtree(kept)
    with pytest.raises(InvalidInput) as refused:
        await apps.launch("casa-6.7.0-31", "terminal", 21)
    assert str(refused.value) == (
        f"The measures data your desktop reads ({kept.name}) is no longer kept on this hub, so "
        "apps of other releases cannot read it; start a new session for them."
    )
    listed = await core.list_namespaced_pod(hub.namespace)
    assert [p.metadata.name for p in listed.items] == [session.name]

    await spawner.stop(now=True)

    async def policies_gone() -> bool:
        found = await networking.list_namespaced_network_policy(hub.namespace)
        return not found.items

    await eventually(policies_gone, 60, "the garbage collector removed the policies")
    await nothing_left(api, hub.namespace)

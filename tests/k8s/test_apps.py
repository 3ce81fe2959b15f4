"""The hub's side of a desktop's apps of other releases, on the real API server.

A desktop session (busybox idling, as the API-level tests run) spawned as Zero to JupyterHub's
hub account with ``desktop_apps``: its environment turns the desktop's TCP listener and menu on;
the two NetworkPolicies that guard its X server are refused to the chart's Role alone, in one
sentence, and created, owned by the session's pod and selecting it alone, once
``hub-config/z2jh/casa-apps-rbac.yaml`` is applied; the garbage collector removes them with the
pod. The session's pod tells the measures version its apps mount (measures kept by version).
On a pod network that enforces NetworkPolicies (the repository's cluster: kube-router's
controller), the desktop's own apps reach its X port and nothing else, and no other pod reaches
it. The whole path, with a real desktop and a real app, is tests/k8s/test_browser.py's.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_hub import (
    create_hub_account,
    dataset_of,
    eventually,
    hardened_pod,
    nothing_left,
    spawn,
)
from kubernetes_asyncio import client, config

from casaspawner.errors import ConfigurationError, InvalidInput
from casaspawner.kube.apps import APP_RULES, SESSION_ENVIRONMENT, X_PORT, app_selector
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
    await guard_with_casa_apps_rbac(api, hub.namespace, apps, session)
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


async def guard_with_casa_apps_rbac(
    api: Any, namespace: str, apps: KubeApps, session: Any
) -> None:
    """Apply the operator's casa-apps-rbac.yaml, then have the hub guard ``session``'s desktop."""
    role, binding = yaml.safe_load_all(APPS_RBAC.read_text())
    assert role["rules"] == APP_RULES
    rbac = client.RbacAuthorizationV1Api(api)
    await rbac.create_namespaced_role(namespace, role)
    await rbac.create_namespaced_role_binding(namespace, binding)

    async def guarded() -> bool:
        try:
            await apps.guard(session)
        # The authorizer takes the new binding in within moments.
        except ConfigurationError as exc:
            assert str(exc) == str(ConfigurationError(RBAC_SENTENCE))
            return False
        return True

    await eventually(guarded, 20, "the hub guarded the desktop")


#: busybox's shell, running the script that follows.
SHELL = ["/bin/busybox", "sh", "-c"]
#: The session's own server port (the desktop's first X display's is X_PORT).
SERVER_PORT = 8888
#: A session, and a bystander, that answer on both ports (busybox's httpd, twice).
LISTEN = (
    f"/bin/busybox httpd -p {X_PORT} -h /www; exec /bin/busybox httpd -f -p {SERVER_PORT} -h /www"
)
#: What a probe pod prints each second: "open" or "closed" for each address of $TARGETS.
PROBE = (
    "while true; do line=; for t in $TARGETS; do "
    "if /bin/busybox nc -w 3 ${t%:*} ${t#*:} </dev/null >/dev/null 2>&1; "
    'then line="$line open"; else line="$line closed"; fi; done; '
    'echo "${line# }"; /bin/busybox sleep 1; done'
)


async def test_the_desktops_policies_are_enforced_on_the_pod_network(
    hub: Any, api: Any, cluster: Any
) -> None:
    # A desktop whose session answers on its X port and its server port.
    spawner = hub.spawner(desktop_apps=True, cmd=[*SHELL, LISTEN, "--"])
    url, _ = await spawn(
        spawner, {"dataset": dataset_of(hub.cavern, "cycle10"), "interface": "desktop"}
    )
    assert isinstance(url, str), url
    apps = KubeApps(spawner)
    session = await apps.session_pod()
    await guard_with_casa_apps_rbac(api, hub.namespace, apps, session)

    core = client.CoreV1Api(api)
    prefix = spawner.label_prefix
    user = {k: v for k, v in session.labels.items() if k.startswith("hub.jupyter.org/")}
    bystander = hardened_pod("bystander", hub.busybox, [*SHELL, LISTEN], {"role": "bystander"})
    await core.create_namespaced_pod(hub.namespace, bystander)

    async def bystander_ip() -> str:
        pod = await core.read_namespaced_pod("bystander", hub.namespace)
        return pod.status.pod_ip if pod.status.phase == "Running" else ""

    other_ip = await eventually(bystander_ip, 60, "the bystander pod runs")
    targets = [
        f"{session.ip}:{X_PORT}",
        f"{session.ip}:{SERVER_PORT}",
        f"{other_ip}:{X_PORT}",
    ]
    someone_else = dataclasses.replace(session, name="someone-elses-desktop")
    probes = {
        # One of this desktop's apps: its X port only, and nowhere else (egress).
        "own-app": ({**user, **app_selector(session, prefix)}, "open closed closed"),
        # Another desktop's app, and the same user's pod that is no app: not the desktop at all.
        "other-app": (app_selector(someone_else, prefix), "closed closed open"),
        "users-pod": ({**user, "app.kubernetes.io/component": "casa-run"}, "closed closed open"),
    }
    for name, (labels, _) in probes.items():
        pod = hardened_pod(
            name, hub.busybox, [*SHELL, PROBE], labels, terminationGracePeriodSeconds=0
        )
        pod["spec"]["containers"][0]["env"] = [{"name": "TARGETS", "value": " ".join(targets)}]
        await core.create_namespaced_pod(hub.namespace, pod)

    async def seen() -> dict[str, str]:
        lines = {}
        for name in probes:
            try:
                log = await core.read_namespaced_pod_log(name, hub.namespace, tail_lines=1)
            except client.ApiException:
                log = ""
            lines[name] = log.strip()
        return lines

    expected = {name: line for name, (_, line) in probes.items()}

    async def enforced() -> bool:
        return await seen() == expected

    # Policies take effect once the controller has seen the pods (each probe takes up to 9 s).
    try:
        await eventually(enforced, 120, "the policies enforced")
    except AssertionError:
        raise AssertionError(f"{targets}: {await seen()} (expected {expected})") from None

    # The hub, on the node, still reaches its session's server (and so does its proxy).
    if cluster.own:
        for port in (SERVER_PORT, X_PORT):
            argv = ["busybox", "nc", "-w", "3", session.ip, str(port)]
            done = subprocess.run(cluster.netns_argv(argv), stdin=subprocess.DEVNULL, check=False)
            assert done.returncode == 0, f"the node could not reach {session.ip}:{port}"

    for name in [*probes, "bystander"]:
        await core.delete_namespaced_pod(name, hub.namespace, grace_period_seconds=0)
    await spawner.stop(now=True)
    await nothing_left(api, hub.namespace)

"""The whole user path on the real cluster, in a real browser: log in, name a dataset, get CASA.

As ``tests/local/test_local_browser.py`` does on one machine, here with ``CASASpawner`` on the
repository's Kubernetes: the hub (``hub-config/jupyterhub_config.py`` with OIDC login through
oidc-provider-mock), its proxy, the provider and Chromium run inside the cluster's network
namespace; the hub acts as Zero to JupyterHub's hub ServiceAccount; the session runs the CASA
image ``casaspawner images build`` made, imported into containerd; Cavern and the measures are
PersistentVolumes on this machine. JupyterLab: a notebook in the CASA kernel opens a
MeasurementSet in the user's Cavern home. Desktop: the noVNC canvas shows the CASA terminal once
its CASA prompt is ready. Inside the running pod: the user's uid and gid, a read-only root, a
token file only the user reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from k8s_browser import HubProcess, browser_in_netns, start_hub, start_oidc_provider
from k8s_hub import (
    ALICE,
    PROJECT_GID,
    RELEASE,
    HubAccount,
    assert_no_failed_mount,
    bind_storage,
    create_hub_account,
    delete_volumes,
    nothing_left,
    run_in_pod,
)
from kubernetes_asyncio import client
from support.browser import choose_from_menu, menu_commands, screenshot_path

from casaspawner.catalog import load_catalog
from casaspawner.datasets.synth import SIMULATE_MS, DatasetSpec, write_dataset
from casaspawner.plan import PlanConfig, image_for
from casaspawner.runtime import (
    RECORD_FILE,
    RECORD_RUNTIME_ID,
    RUN_IMAGE_KEY_ENV,
    RUN_IMAGE_KEY_HEADER,
)
from casaspawner.services.state import DEFAULT_STATE_FILE, ReleaseStateStore, drain_message
from casaspawner.session.record import RECORDS_DIR
from cluster import REPO, Cluster

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(1800)]

REGISTRY = "localhost/casaspawner"
PROJECT = "2023.1.01234.S"
DATASET = f"~/{PROJECT}"
MS = "uid___A002_X10d5a8a_X3c21.ms"
#: The form's headless run: a script in the dataset, run as alice in the dataset's CASA.
HELLO = (
    "import os, casatools\nprint('run as', os.getuid(), 'in CASA', casatools.version_string())\n"
)
RUNS_RBAC = REPO / "hub-config" / "z2jh" / "casa-runs-rbac.yaml"
APPS_RBAC = REPO / "hub-config" / "z2jh" / "casa-apps-rbac.yaml"
#: The release whose apps the desktop adds (mk/cluster.mk's K8S_APP_RELEASE).
APP_RELEASE = "casa-6.7.0-31"
#: A release whose image is in no registry the node reaches.
UNPULLABLE = "pl-2024.1.0.8"
#: xstartup's xsetroot colour.
DESKTOP_BACKGROUND = (0x24, 0x36, 0x4B)
#: Keeps what the spawn-progress page showed (it reloads into the session when ready).
RECORD_PROGRESS = """
window.addEventListener('beforeunload', () => {
  const log = document.querySelector('#progress-log');
  if (log) sessionStorage.setItem('casa-progress',
    (sessionStorage.getItem('casa-progress') || '') + log.textContent);
});
"""
#: What the user types into the notebook.
NOTEBOOK_CELL = (
    "import casatools, glob, os\n"
    f"pattern = os.path.expanduser('~/{PROJECT}/**/*.ms')\n"
    "ms = glob.glob(pattern, recursive=True)[0]\n"
    "tb = casatools.table()\n"
    "tb.open(ms)\n"
    "rows = tb.nrows()\n"
    "tb.open(ms + '/ANTENNA')\n"
    "print('CASA', casatools.version_string(), 'rows', rows, 'antennas', tb.nrows())"
)


@pytest.fixture(scope="module")
def release() -> Any:
    return load_catalog().get(RELEASE)


def imported(cluster: Cluster, release: Any) -> str:
    """The CASA image of ``release`` that `make k8s-images` builds, put into containerd."""
    image = image_for(release, PlanConfig(image_registry=REGISTRY))
    if not cluster.own:
        pytest.skip("the end-to-end test imports its image into the repository's own cluster")
    found = subprocess.run(["podman", "image", "exists", image], check=False)
    assert found.returncode == 0, (
        f"{image} is not built: `make k8s-images` builds it (casaspawner images build)"
    )
    cluster.import_image(image)
    return image


@pytest.fixture(scope="module")
def casa_image(cluster: Cluster, release: Any) -> str:
    """The CASA image of ``RELEASE``, in the cluster's containerd."""
    return imported(cluster, release)


@pytest.fixture(scope="module")
def app_release() -> Any:
    return load_catalog().get(APP_RELEASE)


@dataclass
class Site:
    """The hub's namespace, account and storage for the end-to-end test."""

    account: HubAccount
    cavern: Path
    volumes: list[str]


async def _admin(cluster: Cluster, work: Any) -> Any:
    async with await cluster.api_client() as api:
        return await work(api)


def run_async(coroutine: Any) -> Any:
    """Run ``coroutine`` in a thread of its own: Playwright's sync API owns this thread's loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


#: The session asking the hub for its token once more, printing the answer.
FETCH_AGAIN = """
import os, urllib.error, urllib.request
token = os.environ["JUPYTERHUB_API_TOKEN"]
request = urllib.request.Request(
    os.environ["CASASPAWNER_TOKEN_URL"], data=b"{}", headers={"Authorization": "token " + token}
)
try:
    print(urllib.request.urlopen(request).read().decode())
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode())
"""


def admin(cluster: Cluster, work: Any) -> Any:
    """Run ``work(api)`` with a fresh admin client (these tests are synchronous)."""
    return run_async(_admin(cluster, work))


def write_home(root: Path, release: Any) -> Path:
    """Alice's Cavern home: a dataset whose pipeline manifest names ``release``'s CASA."""
    home = root / "home" / "alice"
    spec = DatasetSpec(
        project=PROJECT,
        mous="uid___A001_X3621_X4d1b",
        casa=release.casa.replace("-", "."),
        pipeline=None,
        evidence=("manifest",),
        eb="uid___A002_X10d5a8a_X3c21",
    )
    write_dataset(home / PROJECT, spec=spec)
    project = root / "projects" / "proj-m87"
    project.mkdir(parents=True)
    for path in (home, *home.rglob("*")):
        os.chown(path, ALICE["uid"], ALICE["gid"], follow_symlinks=False)
    home.chmod(0o700)
    os.chown(project, ALICE["uid"], PROJECT_GID)
    root.chmod(0o755)
    return home


@pytest.fixture(scope="module")
def site(cluster: Cluster, measures: Path, release: Any) -> Iterator[Site]:
    cavern = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-e2e-"))
    work = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-hub-"))
    write_home(cavern, release)

    async def setup(api: Any) -> Site:
        namespace = await cluster.create_namespace(api, "casaspawner-e2e")
        account = await create_hub_account(api, namespace, cluster.kubeconfig, work)
        # What the operator applies for the form's runs, beside the chart's hub Role.
        rbac = client.RbacAuthorizationV1Api(api)
        # And for the desktops' apps of other releases.
        for path in (RUNS_RBAC, APPS_RBAC):
            role, binding = yaml.safe_load_all(path.read_text())
            await rbac.create_namespaced_role(namespace, role)
            await rbac.create_namespaced_role_binding(namespace, binding)
        volumes = await bind_storage(api, namespace, cavern, measures)
        return Site(account, cavern, volumes)

    made = admin(cluster, setup)
    try:
        yield made
    finally:

        async def teardown(api: Any) -> None:
            await delete_volumes(api, made.volumes)
            await client.CoreV1Api(api).delete_namespace(made.account.namespace)

        admin(cluster, teardown)
        shutil.rmtree(cavern, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="casaspawner-k8s-e2e-hub-"))
    try:
        yield path
    finally:
        if not os.environ.get("CASASPAWNER_KEEP_TEST_ROOT"):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def hub(cluster: Cluster, site: Site, casa_image: str, workdir: Path) -> Iterator[HubProcess]:
    """The OIDC provider and the hub, in the cluster's network namespace."""
    users = {"alice": {"preferred_username": "alice", **ALICE}}
    provider, issuer = start_oidc_provider(cluster, users, workdir)
    try:
        started = start_hub(
            cluster,
            workdir,
            site.account.namespace,
            site.account.kubeconfig,
            issuer,
            {
                "CASASPAWNER_IMAGE_REGISTRY": REGISTRY,
                "CASA_STORAGE_HUB_PATH": str(site.cavern),
                "CASA_START_TIMEOUT": "600",
                "CASA_HEADLESS_RUNS": "true",
                "CASA_DESKTOP_APPS": "true",
            },
        )
        try:
            yield started
        finally:
            try:
                started.stop_server("alice")
            finally:
                started.stop()
    finally:
        provider.stop()


@pytest.fixture(scope="module")
def browser(cluster: Cluster, workdir: Path) -> Iterator[Any]:
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Debian's chromium is not installed (make deps installs it)")
    with browser_in_netns(cluster, workdir) as chromium:
        yield chromium


def login(browser: Any, hub: HubProcess) -> Any:
    """Alice logs in through the OIDC provider; returns her page, on the spawn form."""
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.add_init_script(RECORD_PROGRESS)
    page.set_default_timeout(60_000)
    page.goto(f"{hub.url}/hub/login")
    page.locator("a[href*='oauth_login']").click()
    page.wait_for_url("**/oauth2/authorize**")
    page.get_by_placeholder("sub").fill("alice")
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url("**/hub/spawn**")
    return page


def submit_form(page: Any, hub: HubProcess, interface: str) -> None:
    page.goto(f"{hub.url}/hub/spawn")
    page.fill("#casa-dataset", DATASET)
    page.check(f"input[name=interface][value={interface}]")
    page.locator("form#spawn_form [type=submit]").click()


def wait_for_session(page: Any, hub: HubProcess, path: str, timeout: float = 900) -> None:
    """Wait until the browser is in the session at ``path``; a failed spawn fails at once."""
    deadline = time.monotonic() + timeout
    while path not in urlparse(page.url).path:
        try:
            message = page.evaluate(
                "() => (document.querySelector('#progress-message') || {}).textContent || ''"
            )
        # Navigating into the session.
        except Exception:
            message = ""
        assert "Spawn failed" not in message, message + hub.log()[-3000:]
        assert time.monotonic() < deadline, f"no session after {timeout} s: {page.url}"
        page.wait_for_timeout(500)
    page.wait_for_load_state()


def pod_of(hub: HubProcess) -> tuple[str, str]:
    """The namespace and name of alice's session pod, from the hub's saved state."""
    state = hub.api("GET", "/users/alice?include_stopped_servers")["servers"][""]["state"]
    return state["namespace"], state["pod_name"]


def in_pod(cluster: Cluster, hub: HubProcess, command: list[str]) -> str:
    namespace, pod = pod_of(hub)
    return run_async(run_in_pod(cluster, namespace, pod, command))


def test_lab_session_opens_a_measurementset_on_cavern(
    cluster: Cluster, hub: HubProcess, browser: Any, release: Any, casa_image: str, site: Site
) -> None:
    label = release.label
    page = login(browser, hub)
    submit_form(page, hub, "lab")
    wait_for_session(page, hub, "/lab")
    events = page.evaluate("() => sessionStorage.getItem('casa-progress') || ''")
    assert f"Dataset {DATASET}: {label}, the exact build." in events, events
    assert "The session is scheduled on a node." in events, events
    assert f"The session image {casa_image} is ready." in events, events

    # A MeasurementSet in alice's Cavern home, simulated with the session's own casatools.
    target = f"/arc/home/alice/{PROJECT}/{MS}"
    simulated = in_pod(
        cluster,
        hub,
        ["sh", "-c", 'cd /tmp && "$CASASPAWNER_CASA_PYTHON" -c "$0" "$1"', SIMULATE_MS, target],
    )
    assert "300" in simulated, simulated

    page.locator(f".jp-LauncherCard[title*='{label}']").first.click()
    page.wait_for_function(
        "(document.querySelector('.jp-Toolbar-kernelName') || {textContent: ''})"
        ".textContent.includes('CASA')",
        timeout=180_000,
    )
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=180_000)
    page.locator(".jp-Cell .cm-content").first.click()
    page.keyboard.type(NOTEBOOK_CELL)
    page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-OutputArea-output").first
    output.wait_for(timeout=180_000)
    text = output.inner_text().strip()
    assert text == f"CASA {release.casa} rows 300 antennas 5", text
    page.close()

    # The session's reproducibility record, in her Cavern home, names the digest the kubelet ran
    # (the pod's status), which the session asked the hub for.
    namespace, pod = pod_of(hub)
    status = admin(
        cluster, lambda api: client.CoreV1Api(api).read_namespaced_pod(pod, namespace)
    ).status
    (notebook,) = [s for s in status.container_statuses if s.name == "notebook"]
    digest = notebook.image_id.rsplit("sha256:", 1)[1]
    deadline = time.monotonic() + 60
    image: dict[str, Any] = {}
    while time.monotonic() < deadline and not image.get("sha256"):
        records = sorted((site.cavern / "home" / "alice" / RECORDS_DIR).glob(f"*/{RECORD_FILE}"))
        record = json.loads(records[-1].read_text()) if records else {"@graph": []}
        image = next((e for e in record["@graph"] if e["@id"] == RECORD_RUNTIME_ID), {})
        time.sleep(1)
    assert image.get("@type") == "ContainerImage" and image.get("sha256") == digest, image


def test_inside_the_pod_the_user_is_herself_on_a_read_only_root(
    cluster: Cluster, hub: HubProcess
) -> None:
    """Checked in the lab session of the test before, through exec."""
    assert in_pod(cluster, hub, ["id", "-u"]) == str(ALICE["uid"])
    assert in_pod(cluster, hub, ["id", "-g"]) == str(ALICE["gid"])
    assert str(PROJECT_GID) in in_pod(cluster, hub, ["id", "-G"]).split()
    # Every process of the session runs as her.
    uids = in_pod(cluster, hub, ["ps", "-eo", "uid="]).split()
    assert uids and set(uids) == {str(ALICE["uid"])}, uids
    # The image's root file system is read-only; her home and /tmp are not.
    refused = in_pod(cluster, hub, ["sh", "-c", "touch /opt/casa/x 2>&1; echo $?"])
    assert "Read-only file system" in refused, refused
    root = in_pod(cluster, hub, ["sh", "-c", "awk '$2 == \"/\" {print $4}' /proc/mounts"])
    assert root.split(",")[0] == "ro", root
    assert in_pod(cluster, hub, ["sh", "-c", "touch ~/written /tmp/written && echo ok"]) == "ok"

    # The token file: the login's access token, which the session fetched from the hub once,
    # into the pod's memory; only she reads it. The hub refuses anyone fetching it again.
    model = hub.api("GET", "/users/alice")
    token = model["auth_state"]["access_token"]
    path = "/var/run/secrets/casaspawner/token"
    read = [
        "sh",
        "-c",
        'for i in $(seq 60); do [ -s "$CASASPAWNER_TOKEN_FILE" ] && break; '
        'sleep 1; done; cat "$CASASPAWNER_TOKEN_FILE"',
    ]
    assert in_pod(cluster, hub, read) == token
    assert in_pod(cluster, hub, ["sh", "-c", "echo $CASASPAWNER_TOKEN_FILE"]) == path
    owner = f"600 {ALICE['uid']}"
    assert in_pod(cluster, hub, ["stat", "-c", "%a %u", path]) == owner
    kind = in_pod(cluster, hub, ["stat", "-f", "-c", "%T", path.rsplit("/", 1)[0]])
    assert kind == "tmpfs", kind
    assert token not in in_pod(cluster, hub, ["sh", "-c", "env; cat /proc/1/cmdline"])
    again = in_pod(cluster, hub, ["python3", "-c", FETCH_AGAIN])
    assert "This session fetched its access token already." in again, again
    # On the node, the pod's memory volume is under a directory only root enters: no other
    # account of the machine, hers included, reads it.
    namespace, pod = pod_of(hub)
    uid = admin(
        cluster,
        lambda api: client.CoreV1Api(api).read_namespaced_pod(pod, namespace),
    ).metadata.uid
    volumes = REPO / ".cache" / "k8s" / "kubelet" / "pods" / uid / "volumes"
    copy = volumes / "kubernetes.io~empty-dir" / "casa-token" / "token"
    assert copy.read_text() == token
    for account in (ALICE["uid"], 41002, 65534):
        as_account = [f"--reuid={account}", f"--regid={account}", "--clear-groups"]
        read = subprocess.run(
            ["setpriv", *as_account, "cat", str(copy)], capture_output=True, text=True, check=False
        )
        assert read.returncode != 0 and "Permission denied" in read.stderr, (account, read)


def test_desktop_session_shows_a_ready_casa_window(
    cluster: Cluster, hub: HubProcess, browser: Any, release: Any
) -> None:
    label = release.label
    hub.stop_server("alice")
    page = login(browser, hub)
    submit_form(page, hub, "desktop")
    wait_for_session(page, hub, "/desktop/")
    page.wait_for_function(
        "(document.querySelector('#status') || {}).textContent === 'Connected'", timeout=120_000
    )
    x11 = desktop_x11(cluster, hub)
    # The CASA terminal takes the build's name as its title only once casatools is loaded.
    tree = wait_for_windows(cluster, hub, x11, f'"{label}"', f'"{label} tools"')
    assert f'"{label}"' in tree, tree[-3000:]
    assert f'"{label} tools"' in tree, tree[-3000:]
    assert f"{label}: start-up failed" not in tree
    x, y, width, height = window_box(cluster, hub, x11, label)
    # The canvas catches up with the X server.
    page.wait_for_timeout(1500)
    pixels = canvas_region(page, x, y, width, height)
    assert pixels["background"] < 0.02, f"the CASA terminal's area shows the background: {pixels}"
    assert pixels["colours"] >= 2 and 0.005 < pixels["minority"] < 0.5, (
        f"no text in the CASA terminal: {pixels}"
    )
    page.close()


def desktop_x11(cluster: Cluster, hub: HubProcess) -> list[str]:
    """``env DISPLAY=… XAUTHORITY=…`` of the session's X server, found among its processes."""
    processes = in_pod(cluster, hub, ["ps", "-eo", "args"]).splitlines()
    xvnc = next(p for p in processes if p.split()[0].endswith("Xtigervnc"))
    display = next(part for part in xvnc.split() if part.startswith(":"))
    words = xvnc.split()
    auth = words[words.index("-auth") + 1] if "-auth" in words else ""
    return ["env", f"DISPLAY={display}", f"XAUTHORITY={auth}"]


def window_box(
    cluster: Cluster, hub: HubProcess, x11: list[str], name: str
) -> tuple[int, int, int, int]:
    """Where the window ``name`` is on the session's display: x, y, width, height."""
    info = in_pod(cluster, hub, [*x11, "xwininfo", "-name", name])
    pairs = (line.split(":", 1) for line in info.splitlines() if ":" in line)
    field = {key.strip(): value.strip() for key, value in pairs}
    x, y = int(field["Absolute upper-left X"]), int(field["Absolute upper-left Y"])
    return x, y, int(field["Width"]), int(field["Height"])


def covered(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """The share of box ``a`` (x, y, width, height) that box ``b`` covers."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, width) * max(0, height) / (a[2] * a[3])


def wait_for_windows(
    cluster: Cluster, hub: HubProcess, x11: list[str], *names: str, timeout: float = 180
) -> str:
    """The session display's window tree once it names every one of ``names`` (or the time is
    up)."""
    deadline = time.monotonic() + timeout
    tree = ""
    while time.monotonic() < deadline:
        tree = in_pod(cluster, hub, [*x11, "xwininfo", "-root", "-tree"])
        if all(name in tree for name in names):
            break
        time.sleep(2)
    return tree


def test_a_killed_session_has_its_record_completed_by_a_pod_as_the_user(
    cluster: Cluster, hub: HubProcess, site: Site
) -> None:
    """The desktop session of the test before is killed outright (no SIGTERM): it cannot
    complete its record, so after the server stops a pod of its image does, as alice."""
    sessions = site.cavern / "home" / "alice" / RECORDS_DIR

    def open_record() -> Path | None:
        for path in sorted(sessions.glob(f"*/{RECORD_FILE}"), reverse=True):
            graph = {e["@id"]: e for e in json.loads(path.read_text())["@graph"]}
            if "endTime" not in graph["#session"]:
                return path
        return None

    deadline = time.monotonic() + 60
    record = open_record()
    while record is None and time.monotonic() < deadline:
        time.sleep(1)
        record = open_record()
    assert record is not None, sorted(sessions.glob("*"))
    namespace, pod = pod_of(hub)
    admin(
        cluster,
        lambda api: client.CoreV1Api(api).delete_namespaced_pod(
            pod, namespace, grace_period_seconds=0
        ),
    )
    hub.stop_server("alice")
    graph = {e["@id"]: e for e in json.loads(record.read_text())["@graph"]}
    assert "endTime" in graph["#session"], graph["#session"]
    assert graph["#session"]["actionStatus"]["@id"].endswith("CompletedActionStatus")
    # Written as alice, and the pod that did it is gone.
    assert record.stat().st_uid == ALICE["uid"]
    pods = admin(cluster, lambda api: client.CoreV1Api(api).list_namespaced_pod(namespace))
    assert [p.metadata.name for p in pods.items] == []


def test_stopping_leaves_nothing_and_no_mount_ever_failed(
    cluster: Cluster, hub: HubProcess, site: Site
) -> None:
    hub.stop_server("alice")
    namespace = site.account.namespace

    async def check(api: Any) -> None:
        await nothing_left(api, namespace)
        await assert_no_failed_mount(api, namespace)

    admin(cluster, check)
    # The token never reached the hub's log.
    token = hub.api("GET", "/users/alice")["auth_state"]["access_token"]
    assert token not in hub.log()


def test_run_headless_from_the_form_is_a_job_as_alice(
    cluster: Cluster, hub: HubProcess, browser: Any, release: Any, site: Site
) -> None:
    """The form's Run headless, with no session: the hub creates the run's Job as its own
    account (the chart's Role and casa-runs-rbac.yaml), and the pages follow it to its end."""
    dataset = site.cavern / "home" / "alice" / PROJECT
    script = dataset / "hello.py"
    script.write_text(HELLO)
    os.chown(script, ALICE["uid"], ALICE["gid"])
    page = login(browser, hub)
    page.goto(f"{hub.url}/hub/spawn")
    page.fill("#casa-dataset", DATASET)
    page.fill("#casa-script", "hello.py")
    page.click("#casa-run-headless")
    page.wait_for_url("**/hub/casa-runs/new?**")
    assert release.label in page.locator("#run-build").inner_text(), page.content()[-3000:]
    assert page.locator("#run-script").inner_text() == f"/arc/home/alice/{PROJECT}/hello.py"
    page.click("#run-start")
    page.wait_for_url(re.compile(r".*/hub/casa-runs/[0-9]{8}T[0-9]{6}Z-hello$"))
    run_id = page.url.rsplit("/", 1)[1]
    # The page reloads itself every five seconds while the run runs.
    deadline = time.monotonic() + 600
    while (status := page.locator("#run-status").inner_text()) == "running":
        assert time.monotonic() < deadline, page.content()[-3000:]
        page.wait_for_timeout(1000)
    sentence = page.locator("#run-sentence").inner_text()
    assert status == "finished", sentence + "\n" + page.locator("#run-output").inner_text()
    where = f"/arc/home/alice/{PROJECT}/casaspawner-runs/{run_id}"
    assert sentence == f"Run {run_id} finished; its CASA log, output and record are in {where}."
    output = page.locator("#run-output").inner_text()
    assert f"run as {ALICE['uid']} in CASA {release.casa}" in output, output
    assert (dataset / "casaspawner-runs" / run_id / "output.log").stat().st_uid == ALICE["uid"]
    page.close()
    # Its Job would stay an hour; the namespace goes with the module.
    runs = admin(
        cluster,
        lambda api: client.BatchV1Api(api).list_namespaced_job(site.account.namespace),
    )
    assert [j.metadata.annotations["casaspawner.io/run-id"] for j in runs.items] == [run_id]

    # The run's pod asked the hub for its image's digest with the key its spec holds: its record
    # names the digest the kubelet ran. Asked without that key, the hub knows of no such run.
    (job,) = runs.items
    (container,) = job.spec.template.spec.containers
    key = next(e.value for e in container.env if e.name == RUN_IMAGE_KEY_ENV)
    pods = admin(
        cluster,
        lambda api: client.CoreV1Api(api).list_namespaced_pod(
            site.account.namespace,
            label_selector=f"batch.kubernetes.io/job-name={job.metadata.name}",
        ),
    )
    (ran,) = [s for pod in pods.items for s in pod.status.container_statuses]
    digest = ran.image_id.rsplit("sha256:", 1)[1]
    record = json.loads((dataset / "casaspawner-runs" / run_id / RECORD_FILE).read_text())
    image = next(e for e in record["@graph"] if e["@id"] == RECORD_RUNTIME_ID)
    assert image.get("sha256") == digest, image
    assert "the record names the image by its digest" in output, output

    def ask(with_key: str) -> tuple[str, Any]:
        url = f"{hub.url}/hub/api/casa-runs/alice/{run_id}/image"
        argv = ["curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}", url]
        answer = cluster.run_in_netns([*argv, "-H", f"{RUN_IMAGE_KEY_HEADER}: {with_key}"])
        text, _, status = answer.stdout.rpartition("\n")
        return status, json.loads(text)

    assert ask(key) == ("200", {"digest": f"sha256:{digest}"})
    assert ask("not-the-key")[0] == "404"


def test_an_app_of_another_release_joins_the_desktop_from_a_pod_of_its_own(
    cluster: Cluster,
    hub: HubProcess,
    browser: Any,
    release: Any,
    app_release: Any,
    site: Site,
    workdir: Path,
    tmp_path: Path,
) -> None:
    """From the desktop's menu through noVNC, the CASA terminal of another release: the hub
    creates a pod of that release's image as alice, whose window opens on the session's X
    server through its cookie; the session pod itself has no Kubernetes rights."""
    app_image = imported(cluster, app_release)
    page = login(browser, hub)
    submit_form(page, hub, "desktop")
    wait_for_session(page, hub, "/desktop/")
    page.wait_for_function(
        "(document.querySelector('#status') || {}).textContent === 'Connected'", timeout=120_000
    )
    namespace, session = pod_of(hub)
    x11 = desktop_x11(cluster, hub)
    own, other = release.label, app_release.label
    tree = wait_for_windows(cluster, hub, x11, f'"{own}"', f'"{own} tools"')
    assert f'"{own}"' in tree, tree[-3000:]

    # The menu as openbox computes it when it opens: the hub's releases, the session's first.
    desktop = "/opt/casaspawner/desktop"
    shown = in_pod(cluster, hub, [f"{desktop}/casa-app", "releases-menu"])
    labels = [m.get("label") for m in ET.fromstring(shown).findall("menu")]
    assert labels[0] == f"{own} (this session)" and other in labels, labels
    apps = menu_commands(shown, other)
    assert list(apps) == ["CASA terminal", "plotms", "viewer (imview)"], apps
    assert apps["CASA terminal"][1:] == ["--release", APP_RELEASE, "terminal"]
    choose_from_menu(page, (900, 300), labels.index(other), 0)
    tree = wait_for_windows(cluster, hub, x11, f'"{other}"')
    assert f'"{other}"' in tree and f"{other}: start-up failed" not in tree, tree[-3000:]
    # Placed by openbox beside the session's own terminal, not on it: most of that stays in view.
    mine, theirs = (window_box(cluster, hub, x11, name) for name in (own, other))
    assert covered(mine, theirs) < 0.5, (mine, theirs)

    # Its pod: the other release's image, alice's uid, no token, owned by the session's pod.
    core = client.CoreV1Api
    selector = f"casaspawner.io/app-of={session}"
    found = admin(
        cluster, lambda api: core(api).list_namespaced_pod(namespace, label_selector=selector)
    )
    (app,) = found.items
    owner = admin(cluster, lambda api: core(api).read_namespaced_pod(session, namespace))
    assert [(o.kind, o.uid) for o in app.metadata.owner_references] == [
        ("Pod", owner.metadata.uid)
    ]
    (container,) = app.spec.containers
    assert container.image == app_image
    # casa-app itself from the session's image (an init container copies it): the app's image
    # needs CASA, not casaspawner's desktop.
    (copy,) = app.spec.init_containers
    assert copy.image == owner.spec.containers[0].image and copy.image != app_image
    assert container.args == ["/bin/sh", "/opt/casa-app/casa-app", "terminal"]
    assert app.spec.security_context.run_as_user == ALICE["uid"]
    assert app.spec.automount_service_account_token is False
    assert not [e.name for e in container.env if e.name.startswith("JUPYTER")]
    assert not [v.name for v in app.spec.volumes if v.secret is not None]
    name = app.metadata.name

    def in_app(script: str) -> str:
        return str(
            run_async(run_in_pod(cluster, namespace, name, ["sh", "-c", script], "casa-app"))
        )

    assert in_app("id -u") == str(ALICE["uid"])
    # The X server lets in the cookie the desktop left in alice's home, and nothing else.
    probe = "xdpyinfo >/dev/null 2>&1 && echo in || echo refused"
    assert in_app(probe) == "in"
    assert in_app(f"XAUTHORITY=/dev/null {probe}") == "refused"
    cookie = site.cavern / "home" / "alice" / ".casaspawner" / "desktop" / f"{session}.xauthority"
    assert cookie.stat().st_uid == ALICE["uid"] and cookie.stat().st_mode & 0o777 == 0o600

    # The two NetworkPolicies, owned by the session's pod, select its X server and its app.
    networking = client.NetworkingV1Api
    for suffix, selects in (("x-in", [session]), ("x-out", [name])):
        policy = admin(
            cluster,
            lambda api, n=f"{session}-{suffix}": networking(api).read_namespaced_network_policy(
                n, namespace
            ),
        )
        assert [o.uid for o in policy.metadata.owner_references] == [owner.metadata.uid]
        labels_of = policy.spec.pod_selector.match_labels
        chosen = ",".join(f"{k}={v}" for k, v in labels_of.items())
        pods = admin(
            cluster,
            lambda api, c=chosen: core(api).list_namespaced_pod(namespace, label_selector=c),
        )
        assert [p.metadata.name for p in pods.items] == selects, suffix

    # The noVNC canvas with both releases' terminals, for the docs.
    page.wait_for_timeout(4000)
    target = screenshot_path("k8s-desktop-other-release.png", tmp_path)
    page.locator("canvas").first.screenshot(path=str(target))
    assert target.stat().st_size > 10_000

    # A tool the image has not is one sentence, from the hub.
    refused = in_pod(
        cluster,
        hub,
        [
            "sh",
            "-c",
            f"{' '.join(x11[1:])} {desktop}/casa-app --release {APP_RELEASE} logger 2>&1",
        ],
    )
    assert refused == f"logger is not part of the {other} image.", refused
    # A token that may not enter her server (the tests' own, with admin:servers) starts nothing.
    body = {"release": APP_RELEASE, "app": "terminal", "display": 21}
    with pytest.raises(RuntimeError, match=r"^POST /casa-apps/alice/: 403 "):
        hub.api("POST", "/casa-apps/alice/", body)
    # A drained release, with the operators' sentence; undrained, it starts again.
    state = ReleaseStateStore(workdir / DEFAULT_STATE_FILE)
    state.update(APP_RELEASE, by="operator", drained=True, message="New build at 18:00 UTC")
    launch = f"{' '.join(x11[1:])} {desktop}/casa-app --release {APP_RELEASE} terminal 2>&1"
    refused = in_pod(cluster, hub, ["sh", "-c", launch])
    assert refused == drain_message(other, "New build at 18:00 UTC"), refused
    state.update(APP_RELEASE, by="operator", drained=False)
    assert "starts in pod" in in_pod(cluster, hub, ["sh", "-c", launch])
    # A release whose image the node cannot pull: one sentence, and its pod is being deleted.
    missing = load_catalog().get(UNPULLABLE)
    said = in_pod(cluster, hub, ["sh", "-c", launch.replace(APP_RELEASE, missing.id)])
    assert said.startswith(f"The CASA terminal of {missing.label} could not start (ErrImagePull: ")
    assert "failed to pull" in said.lower(), said
    left = admin(
        cluster, lambda api: core(api).list_namespaced_pod(namespace, label_selector=selector)
    )
    staying = {p.spec.containers[0].image for p in left.items if not p.metadata.deletion_timestamp}
    assert staying == {app_image}
    page.close()

    # The app and the policies go with the session's pod (the garbage collector).
    hub.stop_server("alice")

    async def gone(api: Any) -> None:
        deadline = time.monotonic() + 60
        while True:
            pods = await core(api).list_namespaced_pod(namespace, label_selector=selector)
            policies = await networking(api).list_namespaced_network_policy(namespace)
            left = [p.metadata.name for p in (*pods.items, *policies.items)]
            if not left:
                return
            assert time.monotonic() < deadline, f"left behind: {left}"
            await asyncio.sleep(1)

    admin(cluster, gone)


def canvas_region(page: Any, x: int, y: int, width: int, height: int) -> dict[str, float]:
    """Of the noVNC canvas inside an X window: the share of background, colours, text."""
    return page.evaluate(  # type: ignore[no-any-return]
        """([x, y, w, h, bg]) => {
          const c = document.querySelector('canvas');
          const d = c.getContext('2d').getImageData(x, y, w, h).data;
          const counts = new Map();
          let n = 0, background = 0;
          for (let i = 0; i < d.length; i += 4 * 3) {
            const rgb = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
            counts.set(rgb, (counts.get(rgb) || 0) + 1);
            if (rgb === ((bg[0] << 16) | (bg[1] << 8) | bg[2])) background++;
            n++;
          }
          const top = Math.max(...counts.values());
          return {background: background / n, colours: counts.size, minority: (n - top) / n};
        }""",
        [x, y, width, height, list(DESKTOP_BACKGROUND)],
    )

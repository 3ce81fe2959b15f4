"""Build the session image and a modular CASA image on an mmdebstrap base and run them as a pod would.

Marked ``images``: real buildah builds and podman runs (uid 54321 without a passwd entry, read-only root,
tmpfs /tmp, HOME on a mounted directory, measures mounted read-only). Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from images_support import MODULAR, REGISTRY, build

from casaspawner.catalog import Catalog
from casaspawner.datasets.synth import write_dataset
from casaspawner.images import engine, smoke
from casaspawner.images.cli import check_image
from casaspawner.images.matrix import INPUT_HASH_LABEL, MatrixOptions, Recipe, build_matrix
from casaspawner.plan import PlanConfig

pytestmark = [pytest.mark.images, pytest.mark.timeout(2400)]


def test_session_image_runs_as_any_uid_on_a_read_only_root(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    observed, problems = check_image(tools, built["session"], None)
    assert problems == []
    assert observed["world_writable"] == []
    identity = observed["identity"]
    assert identity["user"] == "smoke" and identity["home"] == smoke.HOME and identity["cwd"] == smoke.HOME  # type: ignore[index]
    assert identity["xdg_runtime_dir"].startswith("/tmp/")  # type: ignore[index]
    assert observed["vnc"] == "RFB 003.008"
    assert observed["desktop"] == {  # type: ignore[comparison-overlap]
        "vncserver": "/usr/bin/vncserver",
        "xstartup": PlanConfig().desktop_xstartup,
    }
    assert "started" in observed["jupyter"]  # type: ignore[operator]
    assert observed["desktop_page"] == 200
    # /desktop-websockify/ made jupyter-remote-desktop-proxy start TigerVNC with the desktop start script.
    assert observed["desktop_vnc"] == "RFB 003.008"


def test_casa_image_kernel_runs_casatools_with_mounted_measures(
    tools: engine.Tools, built: dict[str, Recipe], measures: Path, catalog: Catalog
) -> None:
    release = catalog.get(MODULAR)
    observed, problems = check_image(tools, built[MODULAR], measures)
    assert problems == []
    assert release.kernel_name in observed["kernels"]  # type: ignore[operator]
    output = observed["kernel_run"]["output"]  # type: ignore[index]
    assert f"casatools {release.casa}" in output
    assert "ALMA WGS84 5057" in output  # the observatory table comes from the mounted measures data
    assert observed["casa_env"] == {
        "python": f"/opt/casa/{release.tag}/bin/python",
        "home": f"/opt/casa/{release.tag}",
        "siteconfig": "/opt/casa/casasiteconfig.py",
        "version": "3.11.2",
    }


def test_measures_are_not_baked_into_the_casa_image(tools: engine.Tools, built: dict[str, Recipe]) -> None:
    session = smoke.Session(home=smoke.home_dir())
    result = smoke.run_in(
        tools, built[MODULAR].image, session,
        'ls -A /opt/casa/measures | wc -l; "$CASASPAWNER_CASA_PYTHON" -c "import casatools" >/dev/null 2>&1; echo $?',
    )  # fmt: skip
    entries, status = result.stdout.split()
    assert entries == "0"
    assert status != "0", "casatools started without measures data, so some must be baked in"


def test_gui_appimages_are_extracted_and_usable_by_any_uid(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    session = smoke.Session(home=smoke.home_dir())
    result = smoke.run_in(
        tools, built[MODULAR].image, session,
        'for a in $(find "$CASASPAWNER_CASA_HOME" -name "*.AppImage"); do '
        'd="$(dirname "$a")/$(dirname "$(readlink "$a")")"; '
        '[ -L "$a" ] && [ -x "$a" ] && [ -r "$d/AppRun" ] && echo "ok $(basename "$a")"; '
        'ldd "$d"/usr/bin/* 2>&1 | grep -E "not found|page-aligned|cannot"; done',
    )  # fmt: skip
    # Both GUIs are unpacked, runnable by the session uid, and every library they load is present and intact.
    assert sorted(result.stdout.split("\n")[:-1]) == [
        "ok casaplotms-x86_64.AppImage",
        "ok casaviewer-x86_64.AppImage",
    ]


def test_images_carry_catalog_labels_and_are_reused_when_unchanged(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    labels = tools.image_labels(built[MODULAR].image)
    assert labels["io.casaspawner.release"] == MODULAR
    assert labels["io.casaspawner.kernel-name"] == "CASA 6.6.5-31"
    assert len(labels[INPUT_HASH_LABEL]) == 64
    result, seconds = build("--registry", REGISTRY, "--release", MODULAR)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("up to date") == 2, result.stdout
    assert seconds < 120


def test_pod_manifest_from_casaspawner_pod_runs_under_kube_play(
    tools: engine.Tools, built: dict[str, Recipe], measures: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    home = storage / "home" / "smoke"
    home.mkdir(parents=True)
    for path in (storage, storage / "home", home):
        smoke.chown(path)
    dataset = write_dataset(tmp_path / "data", era="cycle11")
    config = tmp_path / "hub.json"
    config.write_text(json.dumps({"CASASpawner": {
        "image_registry": REGISTRY,
        "pod_security_level": "privileged",  # hostPath volumes stand in for the Cavern and measures claims
        "storage_volume": {"hostPath": {"path": str(storage), "type": "Directory"}},
        "measures_volume": {"hostPath": {"path": str(measures), "type": "Directory"}},
    }}))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "casaspawner", "pod", "--user", "smoke", "--uid", "54321", "--gid", "54321",
         "--dataset", str(dataset), "--release", MODULAR, "--config", str(config), "--no-token", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (pod,) = json.loads(result.stdout)["items"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == built[MODULAR].image
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # What JupyterHub fills in at spawn time (the dry run leaves placeholders), pointing at a stand-in for the
    # hub's API: jupyterhub-singleuser asks the hub for its version before it starts serving.
    hub_env = {
        "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
        "JUPYTERHUB_ACTIVITY_URL": "http://127.0.0.1:8081/hub/api/users/smoke/activity",
        "JUPYTERHUB_API_TOKEN": "smoke-test-token",
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_SERVICE_PREFIX": "/user/smoke/",
        "JUPYTERHUB_HOST": "",
    }
    env = [e for e in container["env"] if e["name"] not in hub_env]
    container["env"] = env + [{"name": k, "value": v} for k, v in hub_env.items()]
    pod["spec"]["containers"].append({
        "name": "hub-api-stand-in",
        "image": container["image"],
        "command": ["python3", "-c", f"exec({HUB_API_STAND_IN!r})"],  # one line: podman splits on newlines
        "securityContext": container["securityContext"],
    })  # fmt: skip
    # podman 4.3 checks annotation values like label values (at most 63 characters; Kubernetes allows far
    # more), so it refuses the long dataset/reason/summary annotations. They do not affect the container.
    annotations = pod["metadata"].get("annotations", {})
    dropped = {k for k, v in annotations.items() if len(v) > 63}
    pod["metadata"]["annotations"] = {k: v for k, v in annotations.items() if k not in dropped}
    manifest = tmp_path / "pod.json"
    manifest.write_text(json.dumps(pod))
    with smoke.kube_play(tools, manifest) as name:
        answer = smoke.exec_http(
            tools, f"{name}-notebook", "http://127.0.0.1:8888/user/smoke/api", timeout=120
        )
        assert "version" in json.loads(answer)
        whoami = tools.run(
            tools.container(
                "exec", f"{name}-notebook", "sh", "-c", "id -u; echo $HOME; ls /opt/casa/measures"
            )
        )
        uid, home_path, *entries = whoami.stdout.split()
        assert (uid, home_path) == ("54321", "/arc/home/smoke")
        assert "geodetic" in entries


HUB_API_STAND_IN = """
import json
from http.server import BaseHTTPRequestHandler, HTTPServer
class Hub(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"version": "5.5.4"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-JupyterHub-Version", "5.5.4")
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
HTTPServer(("127.0.0.1", 8081), Hub).serve_forever()
"""


# ----------------------------------------------------------------------------------------- monolithic recipe

STANDIN = "pl-2024.1.0.8"


def standin_tarball(directory: Path, catalog: Catalog) -> tuple[Path, str]:
    """A tarball with the layout of the release's real one: ``casa-<ver>-pipeline-<pl>/`` with ``bin/casa`` and
    ``lib/py/bin/python3`` (here a link to the image's Python), plus a world-writable file to be fixed."""
    release = catalog.get(STANDIN)
    assert release.tarball is not None
    top = f"casa-{release.casa}-pipeline-{release.pipeline}"
    path = directory / release.tarball.name
    members = {
        f"{top}/bin/casa": (b'#!/bin/sh\nexec "$(dirname "$0")/../lib/py/bin/python3" "$@"\n', 0o755),
        f"{top}/VERSION": (f"{release.casa}\n".encode(), 0o644),
        f"{top}/lib/py/share/notes.txt": (b"stand-in\n", 0o666),
    }
    with tarfile.open(path, "w:xz") as tar:
        for name in (
            top,
            f"{top}/bin",
            f"{top}/lib",
            f"{top}/lib/py",
            f"{top}/lib/py/bin",
            f"{top}/lib/py/share",
        ):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, (data, mode) in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{top}/lib/py/bin/python3")
        link.type, link.linkname = tarfile.SYMTYPE, "/usr/bin/python3"
        tar.addfile(link)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tarball_server(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Iterator[tuple[str, str]]:
    directory = tmp_path_factory.mktemp("mirror")
    _, sha256 = standin_tarball(directory, catalog)
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", sha256
    finally:
        server.shutdown()


def test_monolithic_recipe_refuses_a_wrong_checksum(
    built: dict[str, Recipe], tarball_server: tuple[str, str]
) -> None:
    url, sha256 = tarball_server
    wrong = hashlib.sha256(b"not the tarball").hexdigest()
    result, _ = build("--registry", f"{REGISTRY}-standin", "--release", STANDIN, "--tarball-mirror", url,
                      "--sha256", wrong)  # fmt: skip
    assert result.returncode == 2
    assert "checksum mismatch" in result.stderr
    assert f"expected {wrong}, got {sha256}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_monolithic_recipe_installs_a_verified_tarball(
    tools: engine.Tools, built: dict[str, Recipe], tarball_server: tuple[str, str], catalog: Catalog
) -> None:
    url, sha256 = tarball_server
    result, _ = build("--registry", f"{REGISTRY}-standin", "--release", STANDIN, "--tarball-mirror", url,
                      "--sha256", sha256)  # fmt: skip
    assert result.returncode == 0, result.stderr
    release = catalog.get(STANDIN)
    options = MatrixOptions(registry=f"{REGISTRY}-standin", checksums={release.tarball.name: sha256})  # type: ignore[union-attr]
    recipe = build_matrix(catalog, options, [STANDIN])[1]
    labels = tools.image_labels(recipe.image)
    assert labels["io.casaspawner.tarball-sha256"] == sha256
    assert smoke.world_writable(tools, recipe.image) == []  # the 0666 file in the tarball was fixed
    session = smoke.Session(home=smoke.home_dir())
    env = smoke.casa_environment(tools, recipe.image, session)
    assert env["python"] == f"/opt/casa/{release.tag}/lib/py/bin/python3"
    assert env["home"] == f"/opt/casa/{release.tag}"
    version = smoke.run_in(
        tools, recipe.image, session, 'cat "$CASASPAWNER_CASA_HOME/VERSION"'
    ).stdout.strip()
    assert version == release.casa
    specs = smoke.kernelspecs(tools, recipe.image, session)
    kernel = next(k for k, v in specs.items() if v["spec"]["display_name"] == release.kernel_name)
    reply = smoke.run_kernel(tools, recipe.image, session, kernel, "import sys; print(sys.executable)")
    assert reply == {"status": "ok", "output": f"/opt/casa/{release.tag}/lib/py/bin/python3\n"}

"""Build the session image and a modular CASA image on an mmdebstrap base and run them as a pod
would.

Marked ``images``: real buildah builds and podman runs (uid 54321 without a passwd entry, read-only
root, tmpfs /tmp, HOME on a mounted directory, measures mounted read-only). Only 127.0.0.1 is
contacted (plus the package indexes and apt mirror the builds themselves use).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import ssl
import subprocess
import sys
import tarfile
import threading
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.images import MODULAR, REGISTRY, build
from support.servers import serving

from casaspawner.catalog import Catalog
from casaspawner.datasets.synth import write_dataset
from casaspawner.images import engine, smoke
from casaspawner.images.cli import check_image, notices_problems
from casaspawner.images.matrix import (
    INPUT_HASH_LABEL,
    MEASURES_POLICIES,
    MatrixOptions,
    Recipe,
    build_matrix,
)
from casaspawner.plan import PlanConfig

pytestmark = [pytest.mark.images, pytest.mark.timeout(2400)]


def test_session_image_runs_as_any_uid_on_a_read_only_root(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    observed, problems = check_image(tools, built["session"], None)
    assert problems == []
    assert observed["world_writable"] == []
    identity = observed["identity"]
    user, home, cwd = identity["user"], identity["home"], identity["cwd"]  # type: ignore[index]
    assert user == "smoke" and home == smoke.HOME and cwd == smoke.HOME
    assert identity["xdg_runtime_dir"].startswith("/tmp/")  # type: ignore[index]
    assert observed["vnc"] == "RFB 003.008"
    # casaspawner's vncserver (bin/vncserver: it picks the display, and listens on TCP for a
    # desktop whose apps run in pods) comes before TigerVNC's on PATH.
    assert observed["desktop"] == {  # type: ignore[comparison-overlap]
        "vncserver": "/usr/local/bin/vncserver",
        "xstartup": PlanConfig().desktop_xstartup,
    }
    assert "started" in observed["jupyter"]  # type: ignore[operator]
    assert observed["desktop_page"] == 200
    # /desktop-websockify/ made jupyter-remote-desktop-proxy start TigerVNC with the desktop start
    # script.
    assert observed["desktop_vnc"] == "RFB 003.008"


def test_session_image_carries_the_casaspawner_package(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    session = smoke.Session(home=smoke.home_dir())
    extensions = smoke.server_extensions(tools, built["session"].image, session)
    notices, lab = smoke.NOTICES_EXTENSION, smoke.NOTICES_LABEXTENSION
    # The wheel's data files: its jupyter_server_config.d/casaspawner.json is what enables the
    # notices extension (no hub passes --ServerApp.jpserver_extensions), and JupyterLab finds the
    # lab extension.
    assert extensions[f"{notices} (import)"] == "ok"
    assert (
        extensions[f"{notices} (config)"]
        == "/opt/session/etc/jupyter/jupyter_server_config.d/casaspawner.json"
    )
    assert extensions[notices] == "enabled", extensions
    assert extensions[f"{lab} (path)"] == f"/opt/session/share/jupyter/labextensions/{lab}"
    assert extensions[f"{lab} (labextension)"] == "enabled OK", extensions
    assert notices_problems(extensions) == []
    # The session base has no casaspawner: the same check names every missing piece.
    base = smoke.server_extensions(tools, built["session-base"].image, session)
    assert notices_problems(base) == [
        f"{notices} does not import in the session environment",
        f"no jupyter_server_config.d file of the session environment enables {notices}",
        f"jupyter server extension list does not show {notices} enabled",
        f"the JupyterLab extension {lab} is not in /opt/session/share/jupyter/labextensions",
        f"jupyter labextension list does not show {lab} enabled and OK (not listed)",
    ]
    # The desktop files come from the package; nothing of the build's CA bundle or secret mounts is
    # left.
    result = smoke.run_in(
        tools,
        built["session"].image,
        session,
        "readlink /opt/casaspawner/desktop; "
        "ls /etc/casaspawner-build-ca.pem /run/secrets 2>&1 | wc -l; "
        "ls /etc/casaspawner-build-ca.pem /run/secrets 2>/dev/null | wc -l",
    )
    target, _, found = result.stdout.split()
    assert target == "/opt/session/lib/python3.11/site-packages/casaspawner/insession/desktop"
    assert found == "0"


def test_smoke_server_falls_back_to_host_networking(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    # What the smoke checks do on a host where containers get no bridge network: the server runs in
    # the host's network namespace, listening on 127.0.0.1 only.
    host = dataclasses.replace(tools, network="host")
    session = smoke.Session(home=smoke.home_dir())
    with smoke.jupyter_server(host, built["session"].image, session) as (url, token):
        assert "started" in smoke.get_json(f"{url}/api/status", token)


def test_world_writable_check_sees_the_images_own_run_and_var_tmp(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    # The mmdebstrap base has world-writable /run/lock and /var/tmp; a --read-only run would hide
    # both under tmpfs mounts. The session layer fixes them, and the check sees both states.
    # The mmdebstrap base used:
    base = tools.image_labels(built["session-base"].image)["io.casaspawner.base"]
    assert base.startswith("localhost/casaspawner-base:")
    assert {"/run/lock", "/var/tmp"} <= set(smoke.world_writable(tools, base))
    assert smoke.world_writable(tools, built["session-base"].image) == []


def test_casa_image_kernel_runs_casatools_with_mounted_measures(
    tools: engine.Tools, built: dict[str, Recipe], measures: Path, catalog: Catalog
) -> None:
    release = catalog.get(MODULAR)
    observed, problems = check_image(tools, built[MODULAR], measures)
    assert problems == []
    assert release.kernel_name in observed["kernels"]  # type: ignore[operator]
    # register_kernel's jupyter_server_config.json.
    assert observed["default_kernel"] == "casa-6.6.5-31"
    output = observed["kernel_run"]["output"]  # type: ignore[index]
    assert f"casatools {release.casa}" in output
    # The observatory table comes from the mounted measures data.
    assert "ALMA WGS84 5057" in output
    assert observed["casa_env"] == {
        "python": f"/opt/casa/{release.tag}/bin/python",
        "home": f"/opt/casa/{release.tag}",
        "siteconfig": "/opt/casa/casasiteconfig.py",
        "version": "3.11.2",
    }
    # plotms plotted a simulated MS (check_image's plotms check: the PNG has data points), and the
    # viewer's tasks import: neither does with the protobuf pip picks by itself, or without the
    # casarc.
    plot = observed["plotms"]
    assert plot["rows"] == 300 and plot["viewer"] == "ok", plot  # type: ignore[index]


def test_plotms_reads_the_mounted_measures_through_the_casarc(
    tools: engine.Tools, built: dict[str, Recipe], measures: Path
) -> None:
    # As a pod runs it (uid 54321, read-only root, Xvnc, proxy variables set): a PNG with the data
    # drawn.
    session = smoke.Session(home=smoke.home_dir(), measures=measures)
    plot = smoke.plotms_plot(tools, built[MODULAR].image, session)
    assert plot["rows"] == 300, plot["log"]
    png = session.home / "plotms.png"
    assert png.read_bytes().startswith(b"\x89PNG"), plot
    # The data points, not only axes and labels.
    assert plot["png"]["blue"] > 1000, plot
    assert plot["png"]["colours"] > 10 and plot["png"]["width"] > 300
    # The casarc names $CASA_MEASURES_PATH: measures mounted elsewhere (the spawner's
    # measures_mount_path, exported as CASA_MEASURES_PATH) are found too.
    moved = smoke.Session(
        home=smoke.home_dir(),
        measures=measures,
        measures_mount="/srv/measures",
        env={"CASA_MEASURES_PATH": "/srv/measures"},
    )
    assert (smoke.plotms_plot(tools, built[MODULAR].image, moved)["png"] or {}).get(
        "blue", 0
    ) > 1000
    # Without it, plotms finds no Observatories table (it ignores casaconfig) and writes nothing.
    without = dataclasses.replace(session, home=smoke.home_dir(), env={"CASARCFILES": ""})
    failed = smoke.plotms_plot(tools, built[MODULAR].image, without)
    assert failed["rows"] == 300 and failed["png"] is None
    assert "Cannot read table of Observatories" in failed["log"], failed["log"]


def test_measures_are_not_baked_into_the_casa_image(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    session = smoke.Session(home=smoke.home_dir())
    result = smoke.run_in(
        tools,
        built[MODULAR].image,
        session,
        'ls -A /opt/casa/measures | wc -l; "$CASASPAWNER_CASA_PYTHON" -c "import casatools" '
        ">/dev/null 2>&1; echo $?",
    )
    entries, status = result.stdout.split()
    assert entries == "0"
    assert status != "0", "casatools started without measures data, so some must be baked in"


def test_gui_appimages_are_extracted_and_usable_by_any_uid(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    session = smoke.Session(home=smoke.home_dir())
    result = smoke.run_in(
        tools,
        built[MODULAR].image,
        session,
        'for a in $(find "$CASASPAWNER_CASA_HOME" -name "*.AppImage"); do '
        'd="$(dirname "$a")/$(dirname "$(readlink "$a")")"; '
        '[ -L "$a" ] && [ -x "$a" ] && [ -r "$d/AppRun" ] && echo "ok $(basename "$a")"; '
        'ldd "$d"/usr/bin/* 2>&1 | grep -E "not found|page-aligned|cannot"; done',
    )
    # Both GUIs are unpacked, runnable by the session uid, and every library they load is present
    # and intact.
    assert sorted(result.stdout.split("\n")[:-1]) == [
        "ok casaplotms-x86_64.AppImage",
        "ok casaviewer-x86_64.AppImage",
    ]
    # ... and plotms (with its symbol tables stripped) starts and opens its window.
    app = (
        f"{built[MODULAR].build_args['CASA_TAG']}/lib/python3.11/site-packages/casaplotms/__bin__"
    )
    window = smoke.x11_window(
        tools,
        built[MODULAR].image,
        session,
        f"/opt/casa/{app}/casaplotms-x86_64.AppImage",
        '"PlotMS"',
    )
    assert '"PlotMS": ("casa.qtapp"' in window, window


def test_test_suites_of_third_party_packages_are_not_in_the_casa_image(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    session = smoke.Session(home=smoke.home_dir())
    result = smoke.run_in(
        tools,
        built[MODULAR].image,
        session,
        'cd "$CASASPAWNER_CASA_HOME"/lib/python3.11/site-packages && ls -d numpy/_core/tests '
        "scipy/linalg/tests matplotlib/tests 2>/dev/null | wc -l; ls -d numpy/testing casatasks "
        ">/dev/null && echo kept",
    )
    assert result.stdout.split() == ["0", "kept"]


def test_images_carry_catalog_labels_and_are_reused_when_unchanged(
    tools: engine.Tools, built: dict[str, Recipe]
) -> None:
    labels = tools.image_labels(built[MODULAR].image)
    assert labels["io.casaspawner.release"] == MODULAR
    assert labels["io.casaspawner.kernel-name"] == "CASA 6.6.5-31"
    assert labels["io.casaspawner.measures"] == MEASURES_POLICIES["casaconfig"]
    assert len(labels[INPUT_HASH_LABEL]) == 64
    result, seconds = build("--registry", REGISTRY, "--release", MODULAR)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("up to date") == 3, result.stdout
    assert seconds < 120


def test_a_casaspawner_change_leaves_the_casa_layers_alone(
    tools: engine.Tools, built: dict[str, Recipe], catalog: Catalog, tmp_path: Path
) -> None:
    # A checkout whose casaspawner differs in one file gives another wheel; rebuilt with it, the
    # CASA image keeps every layer but the last two (casaspawner's wheel and its installation), so
    # nodes and registries keep the CASA layers too.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    root = Path(engine.__file__).resolve().parents[2]
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(root / name, checkout / name)
    for name in ("casaspawner", "images"):
        shutil.copytree(root / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    with (checkout / "casaspawner" / "insession" / "desktop" / "casa_startup.py").open("a") as f:
        f.write("# a change to casaspawner only\n")
    wheel = engine.casaspawner_wheel(tmp_path, checkout=checkout)
    registry = f"{REGISTRY}-rewheel"
    result, _ = build(
        "--registry", registry, "--release", MODULAR, "--casaspawner-wheel", str(wheel)
    )
    assert result.returncode == 0, result.stderr
    rebuilt = build_matrix(catalog, MatrixOptions(registry=registry), [MODULAR])
    try:
        before, after = (layers(tools, built[MODULAR].image), layers(tools, rebuilt[2].image))
        assert after[:-2] == before[:-2]
        assert after[-2] != before[-2] and after[-1] != before[-1]
        changed = smoke.run_in(
            tools,
            rebuilt[2].image,
            smoke.Session(home=smoke.home_dir()),
            "tail -n 1 /opt/casaspawner/desktop/casa_startup.py",
        )
        assert changed.stdout == "# a change to casaspawner only\n"
        assert layers(tools, rebuilt[0].image) == layers(tools, built["session-base"].image)
    finally:
        for recipe in rebuilt:
            tools.run([tools.runner, "rmi", recipe.image], check=False)


def layers(tools: engine.Tools, image: str) -> list[str]:
    result = tools.run(
        [tools.runner, "image", "inspect", "--format", "{{json .RootFS.Layers}}", image]
    )
    return list(json.loads(result.stdout))


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
    config.write_text(
        json.dumps(
            {
                "CASASpawner": {
                    "image_registry": REGISTRY,
                    # hostPath volumes stand in for the Cavern and measures claims.
                    "pod_security_level": "privileged",
                    "storage_volume": {"hostPath": {"path": str(storage), "type": "Directory"}},
                    "measures_volume": {"hostPath": {"path": str(measures), "type": "Directory"}},
                }
            }
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "casaspawner",
            "pod",
            "--user",
            "smoke",
            "--uid",
            "54321",
            "--gid",
            "54321",
            "--dataset",
            str(dataset),
            "--release",
            MODULAR,
            "--config",
            str(config),
            "--no-token",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (pod,) = json.loads(result.stdout)["items"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == built[MODULAR].image
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # What JupyterHub fills in at spawn time (the dry run leaves placeholders), pointing at a
    # stand-in for the hub's API: jupyterhub-singleuser asks the hub for its version before it
    # starts serving.
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
    pod["spec"]["containers"].append(
        {
            "name": "hub-api-stand-in",
            "image": container["image"],
            # One line: podman splits on newlines.
            "command": [
                "python3",
                "-c",
                f"exec({HUB_API_STAND_IN!r})",
            ],
            "securityContext": container["securityContext"],
        }
    )
    # podman 4.3 checks annotation values like label values (at most 63 characters; Kubernetes
    # allows far more), so it refuses the long dataset/reason/summary annotations. They do not
    # affect the container.
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


# -----------------------------------------------------------------------------------------
# monolithic recipe

# CASA 6.6.1-17: a pipeline build with bundled data (pre-casaconfig).
STANDIN = "pl-2024.1.0.8"
# Preferred, so the build arguments (and buildah's layer cache) stay the same per run.
STANDIN_PORT = 47911
SITE = "lib/py/lib/python3.8/site-packages"


def standin_tarball(directory: Path, catalog: Catalog, appimage: Path) -> Path:
    """A tarball with the layout of the release's real one: ``casa-<ver>-pipeline-<pl>/`` with
    ``bin/casa``, ``lib/py/bin/python3`` (here a link to the image's Python), the bundled
    ``casadata/__data__`` (geodetic, ephemerides, alma) and casaplotms's real AppImage under
    ``casaplotms/__bin__``, plus a world-writable file to be fixed. Written deterministically
    (fixed times and owners, uncompressed: GNU tar reads it as it reads .tar.xz), so its checksum
    is the same on every run."""
    release = catalog.get(STANDIN)
    assert release.tarball is not None
    top = f"casa-{release.casa}-pipeline-{release.pipeline}"
    path = directory / release.tarball.name
    data = f"{top}/{SITE}/casadata/__data__"
    members = {
        f"{top}/bin/casa": (
            b'#!/bin/sh\nexec "$(dirname "$0")/../lib/py/bin/python3" "$@"\n',
            0o755,
        ),
        f"{top}/VERSION": (f"{release.casa}\n".encode(), 0o644),
        f"{top}/lib/py/share/notes.txt": (b"stand-in\n", 0o666),
        f"{data}/geodetic/TAI_UTC/table.dat": (b"bundled, stale\n", 0o644),
        f"{data}/ephemerides/DE405/table.dat": (b"bundled, stale\n", 0o644),
        f"{data}/alma/responses/README": (b"release data that stays\n", 0o644),
    }
    dirs = sorted({str(Path(name).parent) for name in members} | {f"{top}/lib/py/bin"})
    appdir = f"{top}/{SITE}/casaplotms/__bin__"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(
            {str(p) for d in [*dirs, appdir] for p in [Path(d), *Path(d).parents]} - {"."}
        ):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, (content, mode) in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), mode
            tar.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo(f"{appdir}/{appimage.name}")
        info.size, info.mode = appimage.stat().st_size, 0o755
        with appimage.open("rb") as f:
            tar.addfile(info, f)
        link = tarfile.TarInfo(f"{top}/lib/py/bin/python3")
        link.type, link.linkname = tarfile.SYMTYPE, "/usr/bin/python3"
        tar.addfile(link)
    return path


@pytest.fixture(scope="module")
def tarball_server(
    tmp_path_factory: pytest.TempPathFactory, catalog: Catalog, plotms_appimage: Path
) -> Iterator[tuple[str, Path]]:
    """The stand-in served on 127.0.0.1: ``good/`` with its right .md5, ``wrong/`` with a wrong
    .md5 and ``none/`` with no .md5; yields (base URL, tarball)."""
    root = tmp_path_factory.mktemp("mirror")
    tarball = standin_tarball(root, catalog, plotms_appimage)
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    for kind, sum_ in (("good", md5), ("wrong", "0" * 32), ("none", None)):
        (root / kind).mkdir()
        (root / kind / tarball.name).symlink_to(tarball)
        if sum_:
            (root / kind / f"{tarball.name}.md5").write_text(f"{sum_}  {tarball.name}\n")
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    with serving(handler, port=STANDIN_PORT) as url:
        yield url, tarball


def standin_build(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    result, _ = build(
        "--registry", f"{REGISTRY}-standin", "--release", STANDIN, "--tarball-mirror", url, *args
    )
    return result


def test_monolithic_recipe_refuses_a_wrong_or_missing_checksum(
    built: dict[str, Recipe], tarball_server: tuple[str, Path]
) -> None:
    url, tarball = tarball_server
    wrong_md5 = standin_build(f"{url}/wrong/")
    assert wrong_md5.returncode == 2
    assert wrong_md5.stderr.strip().endswith(
        f"{tarball.name} does not match its MD5 checksum (log: "
        f"{wrong_md5.stderr.split('(log: ')[-1].strip()}"
    )
    assert len(wrong_md5.stderr.strip().splitlines()) == 1
    wrong_sha = standin_build(
        f"{url}/good/", "--sha256", hashlib.sha256(b"not the tarball").hexdigest()
    )
    assert wrong_sha.returncode == 2
    assert f"{tarball.name} does not match its SHA256 checksum" in wrong_sha.stderr
    no_md5 = standin_build(f"{url}/none/")
    assert no_md5.returncode == 2
    assert (
        f"{tarball.name} cannot be verified: the catalog has no SHA-256 and "
        f"{url}/none/{tarball.name}.md5 is unreachable" in no_md5.stderr
    )
    assert len(no_md5.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def standin(
    tools: engine.Tools,
    built: dict[str, Recipe],
    tarball_server: tuple[str, Path],
    catalog: Catalog,
) -> Recipe:
    """The stand-in release built from ``good/``: no SHA-256 anywhere, so the published .md5
    verifies it."""
    url, _ = tarball_server
    result = standin_build(f"{url}/good/")
    assert result.returncode == 0, result.stderr
    options = MatrixOptions(registry=f"{REGISTRY}-standin", tarball_mirror=f"{url}/good/")
    return build_matrix(catalog, options, [STANDIN])[2]


def test_monolithic_recipe_installs_a_tarball_verified_by_its_published_md5(
    tools: engine.Tools, standin: Recipe, tarball_server: tuple[str, Path], catalog: Catalog
) -> None:
    _, tarball = tarball_server
    release = catalog.get(STANDIN)
    labels = tools.image_labels(standin.image)
    assert (
        labels["io.casaspawner.tarball-checksum"]
        == f"md5:{hashlib.md5(tarball.read_bytes()).hexdigest()}"
    )
    assert labels["io.casaspawner.measures"] == MEASURES_POLICIES["bundled"]
    # The 0666 file in the tarball was fixed.
    assert smoke.world_writable(tools, standin.image) == []
    session = smoke.Session(home=smoke.home_dir())
    env = smoke.casa_environment(tools, standin.image, session)
    assert env["python"] == f"/opt/casa/{release.tag}/lib/py/bin/python3"
    assert env["home"] == f"/opt/casa/{release.tag}"
    version = smoke.run_in(
        tools, standin.image, session, 'cat "$CASASPAWNER_CASA_HOME/VERSION"'
    ).stdout.strip()
    assert version == release.casa
    specs = smoke.kernelspecs(tools, standin.image, session)
    kernel = next(k for k, v in specs.items() if v["spec"]["display_name"] == release.kernel_name)
    with smoke.jupyter_server(tools, standin.image, session) as (url, token):
        assert smoke.get_json(f"{url}/api/kernelspecs", token)["default"] == kernel
    reply = smoke.run_kernel(
        tools, standin.image, session, kernel, "import sys; print(sys.executable)"
    )
    assert reply == {"status": "ok", "output": f"/opt/casa/{release.tag}/lib/py/bin/python3\n"}
    # What the build installed is recorded, the pip that installed it too, so the constraints pin
    # both.
    freeze = smoke.run_in(
        tools, standin.image, session, 'cat "$CASASPAWNER_CASA_HOME/casaspawner-freeze.txt"'
    )
    pins = {line.split("==")[0].lower() for line in freeze.stdout.splitlines() if "==" in line}
    assert {"ipykernel", "pip"} <= pins, freeze.stdout
    assert notices_problems(smoke.server_extensions(tools, standin.image, session)) == []


def test_bundled_data_reads_its_measures_from_the_mount(
    tools: engine.Tools, standin: Recipe, measures: Path
) -> None:
    # CASA 6.6.1 ignores casaconfig: its bundled geodetic and ephemerides directories lead to the
    # mount.
    session = smoke.Session(home=smoke.home_dir(), measures=measures)
    data = f"$CASASPAWNER_CASA_HOME/{SITE}/casadata/__data__"
    result = smoke.run_in(
        tools,
        standin.image,
        session,
        f"readlink {data}/geodetic {data}/ephemerides; ls {data}/geodetic/; cat "
        f"{data}/alma/responses/README",
    )
    lines = result.stdout.splitlines()
    assert lines[:2] == ["/opt/casa/measures/geodetic", "/opt/casa/measures/ephemerides"]
    # The mounted tables.
    assert set(lines[2:-1]) == {p.name for p in (measures / "geodetic").iterdir()}
    assert lines[-1] == "release data that stays"


def test_monolithic_appimage_is_extracted_and_starts_as_any_uid(
    tools: engine.Tools, standin: Recipe, catalog: Catalog
) -> None:
    release = catalog.get(STANDIN)
    app = f"/opt/casa/{release.tag}/{SITE}/casaplotms/__bin__/casaplotms-x86_64.AppImage"
    session = smoke.Session(home=smoke.home_dir())
    result = smoke.run_in(
        tools,
        standin.image,
        session,
        f"readlink {app}; test -d /dev/fuse && echo fuse || echo no-fuse",
    )
    assert result.stdout.split() == ["casaplotms-x86_64.AppDir/AppRun", "no-fuse"]
    # uid 54321, read-only root, no FUSE: the extracted plotms opens its window on TigerVNC's X
    # server.
    window = smoke.x11_window(tools, standin.image, session, app, '"PlotMS"')
    assert '"PlotMS": ("casa.qtapp"' in window, window


# ------------------------------------------------------------------------------ local base over
# https


class _MirrorProxy(BaseHTTPRequestHandler):
    """HTTPS on 127.0.0.1 in front of the host's (http) Debian mirror: an https mirror with a
    private CA."""

    upstream = ""

    def do_GET(self) -> None:
        try:
            response = urllib.request.urlopen(self.upstream + self.path, timeout=60)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            body = response.read()
            self.send_response(response.status)
            for key in ("Content-Type", "Last-Modified"):
                if response.headers.get(key):
                    self.send_header(key, response.headers[key])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_local_base_from_an_https_mirror_with_a_private_ca(
    tools: engine.Tools, tmp_path: Path
) -> None:
    host = [
        s
        for s in engine.read_host_apt_sources()
        if "bookworm" in s.suites and s.uri.startswith("http:")
    ]
    if not host:
        pytest.skip("the host has no http bookworm mirror to put behind the https stand-in")
    key, cert = tmp_path / "key.pem", tmp_path / "ca.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    _MirrorProxy.upstream = host[0].uri.rstrip("/")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MirrorProxy)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = engine.AptSource(
        f"https://127.0.0.1:{server.server_address[1]}", ("bookworm",), ("main",)
    )
    with_ca = engine.Tools(
        tools.builder, tools.runner, env=tools.env, run_flags=tools.run_flags, ca_bundle=cert
    )
    reference = None
    try:
        reference = engine.local_base(with_ca, sources=[mirror], cache=tmp_path, log=False)
        (tarball,) = (tmp_path / "base").glob("bookworm-*.tar")
        with tarfile.open(tarball) as tar:
            names = set(tar.getnames())
            extracted = tar.extractfile("./etc/apt/sources.list")
            sources = extracted.read().decode()  # type: ignore[union-attr]
        # The base's apt can use https mirrors later.
        assert "./etc/ssl/certs/ca-certificates.crt" in names
        # The bootstrap's CA setting is not kept.
        assert "./etc/apt/apt.conf.d/99mmdebstrap" not in names
        assert mirror.uri in sources
        assert tools.image_id(reference)
    finally:
        server.shutdown()
        if reference:
            tools.run([tools.runner, "rmi", reference], check=False)

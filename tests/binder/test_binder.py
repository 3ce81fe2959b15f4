"""Binder: the environment binder/ describes, built as repo2docker builds it, then used.

repo2docker cannot run here (no container engine), so these tests take its steps with the same
files and tools: a venv of runtime.txt's Python with binder/requirements.txt installed from the
repository's root (cached, keyed by those two files), apt.txt's packages (``make deps`` installs
them through mk/binder.mk), postBuild run by a throwaway non-root user whose home holds a copy of
the repository (repo2docker's ``jovyan``, whose home is the repository), and ``start`` in front of
every command. Then nbclient runs the demo notebook in the CASA kernel postBuild registered, and
Chromium opens the CASA desktop of a JupyterLab started as that user.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import REPO, SCREENSHOTS
from support.browser import chromium
from support.local import wait_for_display, wait_for_title, window_geometry, window_titles

from casaspawner import runtime
from casaspawner.catalog import Catalog
from casaspawner.catalog.model import Release
from casaspawner.datasets.resolve import resolve_target
from casaspawner.datasets.synth import write_dataset
from casaspawner.local.demo import DEMO_PROJECT
from casaspawner.local.environments.pythons import find_python
from casaspawner.local.processes import ProcessHandle, session_processes, terminate
from casaspawner.net import free_port

BINDER = REPO / "binder"
NOTEBOOK = "binder/casa-demo.ipynb"
#: A venv whose install finished has this file, naming the Python it was made from.
COMPLETE = ".casaspawner-complete"

#: Runs a notebook with nbclient in the kernel its metadata names; as the Binder user.
RUN_NOTEBOOK = """
import sys
import nbformat
from nbclient import NotebookClient

source, target, workdir = sys.argv[1:]
notebook = nbformat.read(source, as_version=4)
NotebookClient(notebook, timeout=600, resources={"metadata": {"path": workdir}}).execute()
nbformat.write(notebook, target)
"""

#: Typed at the desktop's CASA prompt, as the notebook tells Binder users.
PLOTMS_COMMAND = (
    f"import glob; ms = glob.glob(os.path.expanduser('~/{DEMO_PROJECT}/**/*.ms'), "
    "recursive=True)[0]; plotms(vis=ms, xaxis='uvdist', yaxis='amp', coloraxis='antenna1')"
)


def binder_lines(name: str) -> list[str]:
    """The lines of a binder/ file that say something: no comments, no blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in (BINDER / name).read_text().splitlines())
    return [line for line in lines if line]


def binder_python() -> str:
    """The Python runtime.txt asks for, e.g. ``3.11``."""
    (line,) = binder_lines("runtime.txt")
    name, version = line.split("-", 1)
    assert name == "python", line
    return version


def requirement_pins() -> dict[str, str]:
    """The ``name==version`` lines of binder/requirements.txt."""
    pins = {}
    for line in binder_lines("requirements.txt"):
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def binder_release(catalog: Catalog) -> Release:
    """The modular release whose casatools binder/requirements.txt pins."""
    casatools = requirement_pins()["casatools"]
    found = [
        r
        for r in catalog.available(("modular",))
        if r.wheels is not None and r.wheels.casatools == casatools
    ]
    assert len(found) == 1, f"casatools {casatools} is not one modular release: {found}"
    return found[0]


def test_requirements_pin_the_catalog_release(catalog: Catalog) -> None:
    release = binder_release(catalog)
    assert release.wheels is not None
    # The wheels exactly as the catalog pins them, for the Python runtime.txt names.
    pins = requirement_pins()
    for requirement in release.wheels.requirements():
        name, version = requirement.split("==")
        assert pins.get(name) == version, (name, pins.get(name), version)
    assert binder_python() in release.wheels.python
    # What casaspawner adds to every CASA environment, less the logger GUI (as in the images).
    lines = binder_lines("requirements.txt")
    assert [p for p in runtime.EXTRA_PACKAGES if p not in lines] == ["casalogger"]
    # casaspawner itself, from the repository's root, where repo2docker runs pip.
    assert "." in lines
    # The notebook opens in that release's kernel.
    metadata = json.loads((REPO / NOTEBOOK).read_text())["metadata"]["kernelspec"]
    assert metadata["name"] == runtime.kernel_id(release.tag)
    assert metadata["display_name"] == release.kernel_name


def test_make_installs_what_apt_txt_lists() -> None:
    database = subprocess.run(
        ["make", "-s", "-n", "-p", "deps"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in database.splitlines() if line.startswith("APT_PACKAGES :="))
    installed_by_make = set(line.split(":=", 1)[1].split())
    apt = binder_lines("apt.txt")
    assert apt and "tigervnc-standalone-server" in apt
    assert set(apt) <= installed_by_make, set(apt) - installed_by_make


# The rest builds and runs the Binder environment.


@dataclass(frozen=True)
class User:
    """The Binder user the tests act as: a throwaway account as root, else this user."""

    name: str
    uid: int
    gid: int
    home: Path

    def env(self, venv: Path) -> dict[str, str]:
        """A login's environment in the Binder image, with the environment's Python first."""
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
            "REPO_DIR": str(self.home),
            "NB_PYTHON_PREFIX": str(venv),
            "PYTHONUNBUFFERED": "1",
        }

    def process(self, venv: Path) -> dict[str, Any]:
        """``subprocess`` arguments that run a command as this user, in its home."""
        extra: dict[str, Any] = {}
        if os.geteuid() == 0:
            extra = {"user": self.uid, "group": self.gid, "extra_groups": []}
        return {"cwd": self.home, "env": self.env(venv), **extra}


@dataclass
class Lab:
    url: str
    token: str
    server: subprocess.Popen[bytes]

    def api(self, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}", headers={"Authorization": f"token {self.token}"}
        )
        # A server on 127.0.0.1 the test started.
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def binder_key() -> str:
    """What the environment depends on: runtime.txt and requirements.txt, comments aside."""
    lines = [
        f"{name}: {line}"
        for name in ("runtime.txt", "requirements.txt")
        for line in binder_lines(name)
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def run(cmd: list[str], **kwargs: Any) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{cmd[:4]} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def binder_venv() -> Iterator[Path]:
    """The environment repo2docker makes from binder/, cached until its files change.

    Under ``casaspawner.runtime.cache_dir()``: ``/var/cache/casaspawner`` as root, whose own
    home the Binder user could not enter. A lock keeps two runs from sharing it at once.
    """
    # One every user can run, as for local sessions: pyenv's, under root's home, is not.
    found = find_python([binder_python()], shared=True)
    assert found, f"runtime.txt asks for Python {binder_python()}, which no user here can run"
    python = str(found[0])
    cache = runtime.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / f"binder-{binder_key()}"
    with open(cache / "binder.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        complete = venv / COMPLETE
        if not complete.is_file() or complete.read_text() != python:
            for old in cache.glob("binder-*"):
                if old.is_dir() and old != venv:
                    shutil.rmtree(old)
            shutil.rmtree(venv, ignore_errors=True)
            run([python, "-m", "venv", str(venv)])
            # As repo2docker does: pip in the repository's root, so "." is casaspawner.
            pip = [str(venv / "bin" / "pip"), "install", "--no-input"]
            run([*pip, "-r", "binder/requirements.txt"], cwd=REPO, timeout=3000)
            complete.write_text(python)
        else:
            # This checkout's casaspawner, as a new build would install it.
            pip = [str(venv / "bin" / "pip"), "install", "--no-input", "--no-deps"]
            run([*pip, "--force-reinstall", "."], cwd=REPO, timeout=600)
        yield venv


def copy_repository(target: Path) -> None:
    """Copy the checkout's files (tracked, and new ones git does not ignore) into ``target``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def processes_of(uid: int) -> list[ProcessHandle]:
    """Handles on every process of ``uid`` now."""
    handles = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                handle = ProcessHandle.open(int(entry))
                if handle is not None:
                    handles.append(handle)
    return handles


@pytest.fixture(scope="module")
def jovyan(binder_venv: Path) -> Iterator[User]:
    """The Binder user: a home holding a copy of the repository; the environment is theirs.

    As root, a throwaway account owns both while the tests run. Everything it ran is stopped, and
    it is removed, at the end.
    """
    home = Path(tempfile.mkdtemp(prefix="casaspawner-binder-", dir="/tmp"))
    copy_repository(home)
    root = os.geteuid() == 0
    if root:
        name = f"binder-{secrets.token_hex(4)}"
        run(["useradd", "--no-create-home", "--home-dir", str(home), "--user-group", name])
        account = pwd.getpwnam(name)
        user = User(name, account.pw_uid, account.pw_gid, home)
        run(["chown", "-R", f"{user.uid}:{user.gid}", str(home), str(binder_venv)])
    else:
        user = User(pwd.getpwuid(os.getuid()).pw_name, os.getuid(), os.getgid(), home)
    try:
        yield user
    finally:
        if root:
            terminate(processes_of(user.uid))
            run(["chown", "-R", "0:0", str(binder_venv)])
            run(["userdel", user.name])
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def postbuild(jovyan: User, binder_venv: Path) -> str:
    """What postBuild printed, run as repo2docker runs it: ``./binder/postBuild`` as the user."""
    missing = [
        package
        for package in binder_lines("apt.txt")
        if "install ok installed"
        not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        ).stdout
    ]
    assert not missing, f"apt.txt's {missing} are not installed: run `make deps`"
    result = subprocess.run(
        ["./binder/postBuild"],
        capture_output=True,
        text=True,
        timeout=1200,
        **jovyan.process(binder_venv),
    )
    assert result.returncode == 0, f"postBuild failed:\n{result.stdout[-3000:]}{result.stderr}"
    return result.stdout


@pytest.mark.integration
@pytest.mark.timeout(3600)
def test_postbuild_prepares_casa_as_the_binder_user(
    postbuild: str, jovyan: User, binder_venv: Path, catalog: Catalog
) -> None:
    release = binder_release(catalog)
    kernel_id = runtime.kernel_id(release.tag)
    home = jovyan.home
    # The CASA kernel: the environment's Python with CASA's settings, JupyterLab's default.
    spec_file = home / ".local" / "share" / "jupyter" / "kernels" / kernel_id / "kernel.json"
    spec = json.loads(spec_file.read_text())
    assert Path(spec["argv"][0]).parent == binder_venv / "bin"
    assert spec["display_name"] == release.kernel_name
    server_config = json.loads((home / ".jupyter" / "jupyter_server_config.json").read_text())
    assert server_config["MappingKernelManager"]["default_kernel_name"] == kernel_id
    # CASA reads measures from casadata, with auto-updates off.
    site = next(binder_venv.glob("lib/python*/site-packages"))
    measures = site / "casadata" / "__data__"
    site_config = Path(spec["env"]["CASASITECONFIG"])
    assert site_config.read_text() == runtime.site_config_text(measures)
    casarc = Path(spec["env"]["CASARCFILES"]).read_text()
    assert casarc == f"measures.directory: {measures}\n"
    # The GUIs run without FUSE: each AppImage is a link to its extracted AppRun.
    appimages = sorted(site.glob("*/__bin__/*.AppImage"))
    assert {a.parent.parent.name for a in appimages} == {"casaplotms", "casaviewer"}
    for appimage in appimages:
        assert appimage.is_symlink() and appimage.resolve().name == "AppRun", appimage
        assert os.access(appimage.resolve(), os.X_OK)
    # The demo dataset, the user's own, resolves to the build installed, with its reason.
    (ms,) = home.glob(f"{DEMO_PROJECT}/**/calibrated/*.ms")
    assert ms.stat().st_uid == jovyan.uid and spec_file.stat().st_uid == jovyan.uid
    resolution = resolve_target(str(home / DEMO_PROJECT), catalog)
    assert resolution.release == release and resolution.exact
    assert f"~/{DEMO_PROJECT}: {resolution.reason}" in postbuild
    # start gives every command CASA's settings and the desktop.
    shown = subprocess.run(
        ["./binder/start", "env"],
        capture_output=True,
        text=True,
        check=True,
        **jovyan.process(binder_venv),
    ).stdout
    variables = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    xstartup = Path(variables["JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP"])
    assert xstartup.name == "xstartup" and os.access(xstartup, os.X_OK)
    assert variables["PATH"].startswith(f"{xstartup.parent / 'bin'}:")
    assert variables["CASASPAWNER_CASA_PYTHON"] == spec["argv"][0]
    assert variables["CASASPAWNER_KERNEL_NAME"] == release.kernel_name
    assert variables["CASASPAWNER_REASON"] == resolution.reason
    assert variables["CASASITECONFIG"] == str(site_config)


@pytest.mark.integration
@pytest.mark.timeout(3600)
def test_notebook_runs_casa_on_the_demo_dataset(
    postbuild: str, jovyan: User, binder_venv: Path, catalog: Catalog, tmp_path: Path
) -> None:
    release = binder_release(catalog)
    executed = jovyan.home / "casa-demo.executed.ipynb"
    result = subprocess.run(
        ["./binder/start", "python3", "-c", RUN_NOTEBOOK, NOTEBOOK, str(executed), "binder"],
        capture_output=True,
        text=True,
        timeout=1200,
        **jovyan.process(binder_venv),
    )
    assert result.returncode == 0, f"the notebook failed:\n{result.stderr[-4000:]}"
    cells = [c for c in json.loads(executed.read_text())["cells"] if c["cell_type"] == "code"]
    texts = [
        "".join(
            "".join(o.get("text", "")) for o in cell["outputs"] if o["output_type"] == "stream"
        )
        for cell in cells
    ]
    resolution = resolve_target(str(jovyan.home / DEMO_PROJECT), catalog)
    assert texts[0] == (
        f"Dataset: ~/{DEMO_PROJECT}\nBuild:   {release.label} (exact)\n"
        f"Why:     {resolution.reason}\n"
    )
    assert texts[1] == f"This kernel runs {release.label}\n"
    assert f"{release.label} rows 300 antennas 5\n" in texts[2]
    assert "DemoQuasar" in texts[3] and "ALMA" in texts[3]
    peak = re.search(r"Peak (\d+\.\d+) Jy/beam at pixel \((\d+), (\d+)\)", texts[4])
    assert peak, texts[4]
    # The simulated 1.5 Jy point source, at the phase centre of the 128-pixel image.
    assert 1.3 < float(peak[1]) < 1.7, texts[4]
    assert abs(int(peak[2]) - 64) <= 1 and abs(int(peak[3]) - 64) <= 1, texts[4]
    assert any("image/png" in o.get("data", {}) for o in cells[5]["outputs"])
    other = resolve_target(str(write_dataset(tmp_path, era="cycle10")), catalog)
    assert other.release != release
    assert texts[6].startswith(f"Build:   CASA {other.release.casa} with pipeline ")
    assert texts[6].endswith(f"Why:     {other.reason}\n")


@pytest.fixture(scope="module")
def lab(postbuild: str, jovyan: User, binder_venv: Path) -> Iterator[Lab]:
    """JupyterLab as Binder starts it (``start`` first), on 127.0.0.1 with a token."""
    port, token = free_port(), secrets.token_hex(16)
    log = open(jovyan.home / ".jupyter-server-log.txt", "wb")  # noqa: SIM115
    command = [
        "./binder/start",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
    ]
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, **jovyan.process(binder_venv)
    )
    lab = Lab(f"http://127.0.0.1:{port}", token, server)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (jovyan.home / ".jupyter-server-log.txt").read_text()
            try:
                lab.api("/api/status")
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer in 90 s"
                time.sleep(0.5)
        yield lab
    finally:
        # The desktop's programs first (TigerVNC, openbox, CASA), then the server.
        terminate(session_processes(server.pid))
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.integration
@pytest.mark.timeout(3600)
def test_desktop_runs_casa_and_plotms(lab: Lab, catalog: Catalog, tmp_path: Path) -> None:
    release = binder_release(catalog)
    label = release.label
    # JupyterLab offers the CASA kernel first.
    specs = lab.api("/api/kernelspecs")
    assert specs["default"] == runtime.kernel_id(release.tag)
    assert specs["kernelspecs"][specs["default"]]["spec"]["display_name"] == label

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(60_000)
        # What ?urlpath=desktop opens.
        page.goto(f"{lab.url}/desktop?token={lab.token}")
        page.wait_for_function(
            "(document.querySelector('#status') || {}).textContent === 'Connected'",
            timeout=90_000,
        )
        display, xauthority = wait_for_display(lab.server.pid)
        # The CASA terminal takes the build's name once casatools and casatasks are loaded.
        titles = wait_for_title(display, xauthority, label, timeout=120)
        assert label in titles and f"{label} tools" in titles, titles
        assert f"{label}: start-up failed" not in titles

        # The user types at the CASA prompt through noVNC: plotms opens on the demo MS.
        x, y, width, height = window_geometry(display, xauthority, label)
        scale = page.evaluate(
            "() => { const c = document.querySelector('canvas'); return c.clientWidth / c.width; }"
        )
        box = page.locator("canvas").first.bounding_box()
        page.mouse.click(box["x"] + (x + width / 2) * scale, box["y"] + (y + height / 2) * scale)
        page.keyboard.type(PLOTMS_COMMAND + "\n", delay=5)
        assert "PlotMS" in wait_for_title(display, xauthority, "PlotMS", timeout=180)
        env = {**os.environ, "DISPLAY": display, "XAUTHORITY": xauthority}
        subprocess.run(["wmctrl", "-r", "PlotMS", "-e", "0,575,40,700,490"], env=env, check=True)
        # plotms reads the MS and draws.
        page.wait_for_timeout(8000)
        assert "PlotMS" in window_titles(display, xauthority)
        shot = tmp_path / "binder-desktop.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("CASASPAWNER_SCREENSHOTS"):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOTS / "binder-desktop.png")
        page.close()

"""Per-release CASA environments: finding Pythons, saying why a build cannot be installed, a
monolithic stand-in tarball served on 127.0.0.1 (verified, unpacked, built once under a lock,
registered as a kernel), and the real demo environment (offline start with the site config,
extracted GUIs, the simulated MS)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import casaspawner
from casaspawner.catalog.model import Catalog, Release, Tarball, Wheels, load_catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.errors import CasaspawnerError
from casaspawner.local import demo
from casaspawner.local.environments import (
    CasaEnvironment,
    EnvironmentBuildError,
    EnvironmentManager,
)
from casaspawner.local.environments.pythons import find_python, world_usable
from casaspawner.runtime import site_config_text

OFFLINE = {
    key: "http://127.0.0.1:9" for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
}


def release(**fields: object) -> Release:
    base: dict[str, object] = {
        "id": "test-release",
        "role": "pipeline",
        "casa": "6.6.1-17",
        "confidence": "confirmed",
    }
    return Release(**{**base, **fields})  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# unit


def test_find_python_finds_this_interpreter_and_not_missing_ones() -> None:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = find_python(["2.5", version])
    assert found is not None and found[1] == version
    out = subprocess.run(
        [str(found[0]), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True
    )
    assert out.stdout.decode().strip() == str(tuple(sys.version_info[:2]))
    assert find_python(["2.5"]) is None


def test_world_usable(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "python").write_text("")
    (private / "python").chmod(0o755)
    assert not world_usable(private / "python")
    assert world_usable("/bin/sh")


def test_missing_python_and_unreachable_tarball_are_one_sentence_each(tmp_path: Path) -> None:
    manager = EnvironmentManager(tmp_path, tarball_mirror="http://127.0.0.1:9/", probe_timeout=2)
    wheels_only = release(
        casa="6.6.6-1", role="modular", wheels=Wheels(("3.4",), "6.6.6.1", "6.6.6.1")
    )
    assert manager.unavailable_reason(wheels_only) == (
        "CASA 6.6.6-1 cannot be installed on this hub: its wheels need Python 3.4, which this "
        "machine does not have."
    )
    tarball_only = release(
        pipeline="2024.1.0.8", tarball=Tarball("casa-x.tar.xz", "https://example.invalid/")
    )
    reason = manager.unavailable_reason(tarball_only)
    assert reason is not None
    assert reason.startswith(
        "CASA 6.6.1-17 (pipeline 2024.1.0.8) cannot be installed on this hub: its tarball "
        "http://127.0.0.1:9/casa-x.tar.xz is unreachable ("
    ), reason
    assert reason.endswith(".") and "\n" not in reason
    unpublished = release(casa="5.4.0-68")
    assert manager.unavailable_reason(unpublished) == (
        "CASA 5.4.0-68 cannot be installed on this hub: ALMA published no tarball or wheels for "
        "it."
    )


def test_python_discovery_is_probed_once_per_manager(tmp_path: Path) -> None:
    """Python discovery runs interpreters (seconds each); a manager asks once and remembers the
    answer."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3.4").write_text(f"#!/bin/sh\necho probed >> {calls}\nexit 1\n")
    (bin_dir / "python3.4").chmod(0o755)
    manager = EnvironmentManager(tmp_path / "cache", search_path=str(bin_dir))
    wheels_only = release(
        casa="6.6.6-1", role="modular", wheels=Wheels(("3.4",), "6.6.6.1", "6.6.6.1")
    )
    first = manager.unavailable_reason(wheels_only)
    probes = calls.read_text().count("probed")
    assert probes >= 1
    assert manager.unavailable_reason(wheels_only) == first
    assert calls.read_text().count("probed") == probes, "the second question probed again"
    EnvironmentManager(tmp_path / "cache", search_path=str(bin_dir)).unavailable_reason(
        wheels_only
    )
    assert calls.read_text().count("probed") > probes, "another manager probes for itself"


def test_the_demo_runs_the_newest_release_this_machine_can_install(tmp_path: Path) -> None:
    manager = EnvironmentManager(tmp_path, tarball_mirror="http://127.0.0.1:9/", probe_timeout=1)
    here = next(
        (v for v in ("3.13", "3.12", "3.11", "3.10", "3.9", "3.8") if manager.find_python([v])),
        None,
    )
    if here is None:
        pytest.skip("no Python 3.8 or newer that sessions could run was found here")
    old = release(
        id="casa-6.6.0-1",
        casa="6.6.0-1",
        role="modular",
        wheels=Wheels((here,), "6.6.0.1", "6.6.0.1"),
    )
    new = release(
        id="casa-6.9.0-1",
        casa="6.9.0-1",
        role="modular",
        wheels=Wheels(("3.4",), "6.9.0.1", "6.9.0.1"),
    )
    pipeline = release(
        id="pl", casa="6.9.9-1", tarball=Tarball("casa-x.tar.xz", "https://example.invalid/")
    )
    assert demo.demo_release(manager, Catalog((old, new, pipeline))) == old
    with pytest.raises(CasaspawnerError) as caught:
        demo.demo_release(manager, Catalog((new, pipeline)))
    assert str(caught.value).startswith(
        "No CASA release can be installed here: its wheels need Python 3.4, and no such Python"
    ), caught.value
    assert "`uv python install 3.4`" in str(caught.value) and "\n" not in str(caught.value)
    spec = demo.demo_spec(old)
    assert spec.casa == "6.6.0.1" and spec.project == demo.DEMO_PROJECT


def test_site_config_points_at_the_shared_measures_with_updates_off(tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(site_config_text(tmp_path / "measures"), namespace)
    assert namespace["measurespath"] == str(tmp_path / "measures")
    assert namespace["measures_auto_update"] is False and namespace["data_auto_update"] is False


# ------------------------------------------------------------------- monolithic stand-ins on
# 127.0.0.1

STANDIN_TOP = "casa-6.6.1-17-pipeline-2024.1.0.8"
WRAPPER = """#!/bin/sh
# like CASA 6's bin/python3: its own site-packages first, then the bundled interpreter
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here/lib/py/lib/python{version}/site-packages${{PYTHONPATH:+:$PYTHONPATH}}"
exec {python} "$@"
"""
#: CASA 4/5 have no Python 3: their bin/casa runs ``-c <script>`` with their own (here: any)
#: interpreter.
CASA5_LAUNCHER = """#!/bin/sh
while [ $# -gt 0 ]; do
    [ "$1" = -c ] && exec {python} "$2"
    shift
done
echo "casa: no script given" >&2
exit 1
"""
CASA5_BROKEN = """#!/bin/sh
echo "casa: error while loading shared libraries:" \\
    "libgfortran.so.3: cannot open shared object file" >&2
exit 127
"""


@pytest.fixture(scope="module")
def standin_python() -> tuple[Path, str]:
    """Any Python here stands in for a tarball's bundled interpreter."""
    found = find_python(["3.13", "3.12", "3.11", "3.10", "3.9", "3.8"])
    if found is None:
        pytest.skip(
            "no Python 3.8 or newer was found on PATH, in pyenv or through uv for the stand-in "
            "tarballs"
        )
    return found


def standin_tree(base: Path, kind: str, python: tuple[Path, str]) -> Path:
    """A CASA tree: ``python`` (CASA 6: bin/python3 + casatools), ``casa5`` (bin/casa only),
    ``casa5-broken`` (a bin/casa that cannot start) or ``bare`` (neither)."""
    tree = base / STANDIN_TOP
    (tree / "bin").mkdir(parents=True)
    if kind == "python":
        site = tree / "lib" / "py" / "lib" / f"python{python[1]}" / "site-packages" / "casatools"
        site.mkdir(parents=True)
        (site / "__init__.py").write_text("def version_string():\n    return '6.6.1-17'\n")
        (tree / "bin" / "python3").write_text(WRAPPER.format(version=python[1], python=python[0]))
        (tree / "bin" / "python3").chmod(0o755)
    elif kind in ("casa5", "casa5-broken"):
        text = CASA5_LAUNCHER.format(python=python[0]) if kind == "casa5" else CASA5_BROKEN
        (tree / "bin" / "casa").write_text(text)
        (tree / "bin" / "casa").chmod(0o755)
    (tree / "data").mkdir()
    return tree


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A directory served on 127.0.0.1; yields (base URL, directory, request log)."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(www), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            requests.append(f"{self.command} {self.path}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", www, requests
    finally:
        server.shutdown()


def pack(tree: Path, www: Path, name: str) -> Path:
    archive = www / name
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tree, arcname=tree.name)
    return archive


@pytest.fixture
def tarball_server(
    tmp_path: Path, served: tuple[str, Path, list[str]], standin_python: tuple[Path, str]
) -> tuple[str, Path, list[str]]:
    """A stand-in CASA 6 tarball (+ .md5) served on 127.0.0.1; (base URL, file, request log)."""
    url, www, requests = served
    tree = standin_tree(tmp_path / "src", "python", standin_python)
    archive = pack(tree, www, f"{STANDIN_TOP}-py{standin_python[1]}.el8.tar.xz")
    (www / (archive.name + ".md5")).write_text(
        f"{hashlib.md5(archive.read_bytes()).hexdigest()}  {archive.name}\n"
    )
    return url, archive, requests


async def _collect(manager: EnvironmentManager, rel: Release) -> list[str]:
    return [message async for message in manager.ensure(rel)]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_monolithic_tarball_is_verified_unpacked_built_once_and_registered(
    tmp_path: Path, tarball_server: tuple[str, Path, list[str]]
) -> None:
    url, archive, requests = tarball_server
    measures = tmp_path / "measures"
    (measures / "geodetic").mkdir(parents=True)
    # No sha256: the .md5 is used.
    rel = release(pipeline="2024.1.0.8", tarball=Tarball(archive.name, url))

    def manager() -> EnvironmentManager:
        return EnvironmentManager(tmp_path / "cache", measures_path=measures, probe_timeout=5)

    assert manager().unavailable_reason(rel) is None

    async def two_spawns() -> list[list[str]]:
        return list(await asyncio.gather(_collect(manager(), rel), _collect(manager(), rel)))

    first, second = asyncio.run(two_spawns())
    assert sum(1 for r in requests if r == f"GET /{archive.name}") == 1, requests
    assert any(r == f"GET /{archive.name}.md5" for r in requests)
    assert any("Waited for another session" in m for m in first + second), (first, second)
    assert any(m.startswith("Verifying ") for m in first + second)
    # The download's progress: its size, to the end.
    from casaspawner.local.environments.progress import Progress

    size = archive.stat().st_size
    done = [m for m in first + second if isinstance(m, Progress) and m.done == size]
    assert done and done[0].total == size, first + second
    assert str(done[0]).startswith(f"Downloading {rel.label}: ")

    env = manager().ready(rel)
    assert isinstance(env, CasaEnvironment)
    assert env.python == env.root / "casa" / "bin" / "python3"
    assert env.casa_home == env.root / "casa"
    assert env.kernel_site is not None and (env.kernel_site / "ipykernel").is_dir()
    assert not list((tmp_path / "cache" / "envs").glob(".*.*")), "no staging directories are left"

    jupyter = env.write_kernelspec("CASA 6.6.1-17 (pipeline 2024.1.0.8)")
    spec = json.loads((jupyter / "kernels" / env.kernel_id / "kernel.json").read_text())
    assert spec["display_name"] == "CASA 6.6.1-17 (pipeline 2024.1.0.8)"
    assert spec["argv"][:3] == [str(env.python), "-m", "ipykernel_launcher"]
    run = subprocess.run(
        [
            *spec["argv"][:1],
            "-c",
            "import ipykernel, casatools; print(casatools.version_string())",
        ],
        env={**os.environ, **spec["env"]},
        capture_output=True,
        text=True,
    )
    assert run.stdout.strip() == "6.6.1-17", run.stderr
    config: dict[str, object] = {}
    exec(env.site_config.read_text(), config)
    assert config["measurespath"] == str(measures)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["casa5", "casa5-broken", "bare"])
def test_a_casa_without_python3_is_run_checked_with_bin_casa_or_says_it_was_not(
    kind: str,
    tmp_path: Path,
    served: tuple[str, Path, list[str]],
    standin_python: tuple[Path, str],
) -> None:
    url, www, _requests = served
    archive = pack(
        standin_tree(tmp_path / "src", kind, standin_python),
        www,
        "casa-release-5.6.1-8.el7.tar.gz",
    )
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    measures = tmp_path / "measures"
    (measures / "geodetic").mkdir(parents=True)
    rel = release(casa="5.6.1-8", pipeline=None, tarball=Tarball(archive.name, url, sha256=sha256))
    manager = EnvironmentManager(tmp_path / "cache", measures_path=measures)
    if kind == "casa5-broken":
        with pytest.raises(EnvironmentBuildError) as caught:
            asyncio.run(_collect(manager, rel))
        assert str(caught.value) == (
            "Starting CASA 5.6.1-8 failed: casa: error while loading shared libraries: "
            "libgfortran.so.3: cannot "
            "open shared object file."
        )
        assert manager.ready(rel) is None
        return
    messages = asyncio.run(_collect(manager, rel))
    env = manager.ready(rel)
    assert env is not None and env.python is None
    if kind == "casa5":
        assert "Checking that CASA 5.6.1-8 starts (desktop only: it has no Python 3)." in messages
        assert env.run_checked
    else:
        assert (
            "CASA 5.6.1-8 has no Python 3 and no bin/casa to try: desktop only, not run-checked."
            in messages
        )
        assert not env.run_checked


HUNG_CASA = """#!/bin/sh
exec sleep {marker}
"""


@pytest.mark.parametrize("version", ["3.10", f"{sys.version_info[0]}.{sys.version_info[1]}"])
def test_a_hung_casa_start_check_is_one_sentence_on_every_supported_python(
    version: str, tmp_path: Path
) -> None:
    """``asyncio.wait_for`` raises ``asyncio.TimeoutError`` on Python 3.10 (``TimeoutError`` only
    from 3.11): a CASA 4/5 start check that hangs is one sentence on both, and the hung CASA is not
    left running."""
    found = find_python([version])
    if found is None:
        pytest.skip(f"no Python {version} here (pyenv, PATH or uv)")
    # How long it sleeps: a number only it uses.
    marker = f"119.{os.getpid()}{version.replace('.', '')}"
    launcher = tmp_path / "casa"
    launcher.write_text(HUNG_CASA.format(marker=marker))
    launcher.chmod(0o755)
    code = (
        "import asyncio, sys\nfrom pathlib import Path\n"
        "from casaspawner.local.environments.steps import EnvironmentBuildError, casa_starts\n"
        "try:\n    asyncio.run(casa_starts(Path(sys.argv[1]), 'CASA 5.6.1-8', timeout=1))\n"
        "except EnvironmentBuildError as error:\n    print('SENTENCE', error)\n"
    )
    # casaspawner from this checkout; its (pure-Python) dependencies from the venv running the
    # tests.
    path = os.pathsep.join(
        [str(Path(demo.__file__).parent.parent), sysconfig.get_paths()["purelib"]]
    )
    result = subprocess.run(
        [str(found[0]), "-c", code, str(launcher)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.stdout == "SENTENCE CASA 5.6.1-8 did not start within 1 seconds.\n", (
        result.stderr[-3000:]
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(int(p), marker)]
    assert left == [], "the hung CASA start check is still running"


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.integration
def test_tarball_with_a_wrong_checksum_is_refused(
    tmp_path: Path, tarball_server: tuple[str, Path, list[str]]
) -> None:
    url, archive, _requests = tarball_server
    measures = tmp_path / "measures"
    (measures / "geodetic").mkdir(parents=True)
    rel = release(tarball=Tarball(archive.name, url, sha256="0" * 64))
    manager = EnvironmentManager(tmp_path / "cache", measures_path=measures)
    with pytest.raises(EnvironmentBuildError) as caught:
        asyncio.run(_collect(manager, rel))
    assert str(caught.value) == f"{archive.name} does not match its SHA256 checksum."
    assert manager.ready(rel) is None
    assert not (tmp_path / "cache" / "downloads" / archive.name).exists(), (
        "a bad download is not kept"
    )


# ------------------------------------------------------------------------------ the real demo
# environment


@pytest.mark.integration
def test_casatools_starts_offline_with_the_site_config_and_not_without(
    demo_env: CasaEnvironment, tmp_path: Path
) -> None:
    assert demo_env.python is not None
    code = (
        "import casatools; print(casatools.version_string()); "
        "print(casatools.measures().observatory('ALMA')['m2'])"
    )
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **OFFLINE}
    good = subprocess.run(
        [str(demo_env.python), "-c", code],
        env={**base, "CASASITECONFIG": str(demo_env.site_config)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert good.stdout.splitlines()[0] == demo_env.casa
    bad = subprocess.run(
        [str(demo_env.python), "-c", code],
        env=base,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert bad.returncode != 0, (
        "without the site config casatools would try to fetch measures data"
    )
    assert "measurespath" in bad.stderr or "AutoUpdatesNotAllowed" in bad.stderr
    assert world_usable(demo_env.measures / "geodetic")
    assert not demo_env.measures.stat().st_mode & 0o222, "the shared measures tree is read-only"


@pytest.mark.integration
def test_gui_appimages_are_extracted_once_for_every_user(demo_env: CasaEnvironment) -> None:
    for package in ("casaplotms", "casaviewer", "casalogger"):
        appimages = list(
            demo_env.casa_home.glob(f"lib/python3*/site-packages/{package}/__bin__/*.AppImage")
        )
        assert len(appimages) == 1, package
        target = appimages[0].resolve()
        assert appimages[0].is_symlink() and target == demo_env.root / "apps" / package / "AppRun"
        assert world_usable(target) and os.stat(target).st_mode & 0o001


@pytest.mark.integration
def test_demo_dataset_is_a_real_ms_in_an_alma_tree_owned_by_the_user(
    demo_root: Path, demo_env: CasaEnvironment, demo_release: Release, tmp_path: Path
) -> None:
    home = demo_root / "arc" / "home" / demo.DEMO_USER
    project = home / demo.DEMO_PROJECT
    resolution = resolve_path(project, load_catalog())
    assert (resolution.release.id, resolution.exact) == (demo_release.id, True)
    ms = next(project.rglob("*.ms"))
    assert ms.parent.name == "calibrated"
    owner = os.lstat(home).st_uid
    assert owner != 0 and {os.lstat(p).st_uid for p in [project, *project.rglob("*")]} == {owner}
    code = (
        "import sys, casatools; tb = casatools.table(); ms = sys.argv[1]\n"
        "tb.open(ms); rows = tb.nrows(); tb.close()\n"
        "tb.open(ms + '/ANTENNA'); ants = tb.nrows(); tb.close()\n"
        "tb.open(ms + '/SPECTRAL_WINDOW'); chans = tb.getcol('NUM_CHAN').tolist(); tb.close()\n"
        "print(rows, ants, chans)"
    )
    assert demo_env.python is not None
    out = subprocess.run(
        [str(demo_env.python), "-c", code, str(ms)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "CASASITECONFIG": str(demo_env.site_config), **OFFLINE},
        timeout=300,
    )
    assert out.stdout.strip().splitlines()[-1] == "300 5 [16]", out.stderr[-2000:]


def test_envs_command_lists_what_this_machine_can_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], demo_release: Release
) -> None:
    from casaspawner.cli import main

    options = [
        "--cache-dir",
        str(tmp_path),
        "--tarball-mirror",
        "http://127.0.0.1:9/",
        "--probe-timeout",
        "1",
    ]
    assert main(["envs", "list", "--json", *options]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert (
        rows[demo_release.id]["status"] == "buildable" and rows[demo_release.id]["reason"] is None
    )
    assert rows["pl-2023.1.0.124"]["status"] == "unavailable"
    assert "tarball http://127.0.0.1:9/" in rows["pl-2023.1.0.124"]["reason"]
    assert main(["envs", "build", "no-such-release", *options]) == 2
    assert capsys.readouterr().err.strip() == (
        "casaspawner: 'no-such-release' is not a release in the catalog; `casaspawner catalog` "
        "lists them."
    )


# ------------------------------------------------------------------------------------ the
# desktop's scripts

DESKTOP = Path(casaspawner.__file__).parent / "insession" / "desktop"


def _title_sequences(output: bytes) -> list[str]:
    return [m.decode() for m in re.findall(rb"\x1b\]2;([^\x07]*)\x07", output)]


@pytest.mark.integration
def test_the_casa_terminal_is_named_after_the_build_only_once_casa_is_loaded(
    demo_env: CasaEnvironment, tmp_path: Path
) -> None:
    assert demo_env.python is not None
    env = {
        **os.environ,
        **OFFLINE,
        "HOME": str(tmp_path),
        "CASASITECONFIG": str(demo_env.site_config),
        "CASASPAWNER_KERNEL_NAME": "CASA test-build",
    }
    ready = subprocess.run(
        [str(demo_env.python), str(DESKTOP / "casa_startup.py")],
        env=env,
        capture_output=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert _title_sequences(ready.stdout) == ["CASA test-build"], ready.stdout[-2000:]
    assert f"CASA {demo_env.casa} (casatools and casatasks loaded".encode() in ready.stdout
    # plotms and the viewer tasks load too (they need the old protobuf the environment pins).
    assert b"or plotms(), imview(), msview() here." in ready.stdout, ready.stdout[-2000:]
    # A Python without CASA (a broken environment): the title says so, and never the build's name
    # alone.
    broken = subprocess.run(
        [sys.executable, "-I", str(DESKTOP / "casa_startup.py")],
        env=env,
        capture_output=True,
        cwd=tmp_path,
    )
    assert _title_sequences(broken.stdout) == ["CASA test-build: start-up failed"], broken.stdout
    assert b"CASA could not be loaded: ModuleNotFoundError" in broken.stdout


def test_the_desktop_makes_a_fresh_private_runtime_directory(tmp_path: Path) -> None:
    """Another local user could pre-create a predictable /tmp name; xstartup's directory is always
    new."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o755)
    # The name it used to have for DISPLAY=:1.
    planted = runtime / f"casaspawner-desktop-{os.getuid()}-_1"
    planted.mkdir()
    (planted / "rc.xml").write_text("<planted/>")
    tools = tmp_path / "tools"
    tools.mkdir()
    record = tmp_path / "openbox-args"
    # Stand-ins for the X programs (no X server here): openbox records where its configuration is.
    (tools / "openbox").write_text(
        f'#!/bin/sh\necho "$@" > {record}\nstat -c "%a %u" "$(dirname "$2")" >> {record}\ncat '
        f'"$2" >> {record}\n'
    )
    (tools / "xprop").write_text("#!/bin/sh\necho 'window id # 0x1'\n")
    for tool in ("openbox", "xprop"):
        (tools / tool).chmod(0o755)
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(runtime),
        "DISPLAY": ":1",
        "CASASPAWNER_NOTICES_INTERVAL": "0.2",
    }
    subprocess.run(
        ["sh", str(DESKTOP / "xstartup")], env=env, timeout=60, check=True, capture_output=True
    )
    args, owner, rc = record.read_text().split("\n", 2)
    config = Path(args.split()[1])
    assert owner == f"700 {os.getuid()}", owner
    assert config.parent.parent == runtime and config.parent != planted, args
    assert config.parent.name.startswith("casaspawner-desktop.") and "<planted/>" not in rc
    assert f"<file>{config.parent}/menu.xml</file>" in rc
    assert not config.parent.exists(), "the runtime directory is removed when the desktop ends"
    assert (planted / "rc.xml").read_text() == "<planted/>"


#: Directories with what breaks a sed expression (``|``, ``&``, ``\\``), XML (``&``, ``<``, ``"``
#: in an attribute) or a command split like a shell (spaces, quotes).
AWKWARD = 'desk top & co\'s |x| <"casa"> \\n'


def awkward_desktop(tmp_path: Path) -> tuple[Path, Path, dict[str, str], Path]:
    """The session's desktop files copied to a directory with an awkward name, a runtime directory
    as awkward, and a stand-in openbox that keeps its configuration files; (desktop, runtime, env,
    kept)."""
    desktop = tmp_path / AWKWARD / "desktop"
    shutil.copytree(DESKTOP, desktop)
    runtime = tmp_path / f"run {AWKWARD}"
    runtime.mkdir()
    kept, tools = tmp_path / "kept", tmp_path / "tools"
    kept.mkdir()
    tools.mkdir()
    (tools / "openbox").write_text(
        f'#!/bin/sh\ncp "$2" "{kept}/rc.xml"\n'
        """cp "$(sed -n 's|.*<file>\\(.*menu.xml\\)</file>.*|\\1|p' "$2" """
        f"""| sed 's/&lt;/</g; s/&gt;/>/g; s/&quot;/"/g; s/&amp;/\\&/g')" "{kept}/menu.xml"\n"""
    )
    (tools / "xprop").write_text("#!/bin/sh\necho 'window id # 0x1'\n")
    for tool in ("openbox", "xprop"):
        (tools / tool).chmod(0o755)
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(runtime),
        "DISPLAY": ":1",
        "CASASPAWNER_NOTICES_INTERVAL": "0.2",
    }
    return desktop, runtime, env, kept


def test_the_desktop_menu_works_from_a_directory_with_any_name(tmp_path: Path) -> None:
    """xstartup writes its directories into openbox's XML: escaped for sed, for XML and for the
    shell-like splitting of menu commands, each menu entry runs casa-app from the directory it is
    in."""
    import shlex
    import xml.etree.ElementTree as ET

    desktop, runtime, env, kept = awkward_desktop(tmp_path)
    subprocess.run(
        ["sh", str(desktop / "xstartup")], env=env, timeout=60, check=True, capture_output=True
    )
    namespace = {"ob": "http://openbox.org/3.4/rc", "m": "http://openbox.org/3.4/menu"}
    files = [
        f.text for f in ET.parse(kept / "rc.xml").getroot().iterfind("ob:menu/ob:file", namespace)
    ]
    assert len(files) == 1 and Path(files[0] or "").parent.parent == runtime, files
    commands = [
        c.text or ""
        for c in ET.parse(kept / "menu.xml").getroot().iterfind(".//m:command", namespace)
    ]
    # Openbox splits as a POSIX shell does.
    casa = [shlex.split(c) for c in commands if "casa-app" in c]
    assert [argv[1:] for argv in casa] == [["terminal"], ["plotms"], ["viewer"], ["logger"]], (
        commands
    )
    assert {argv[0] for argv in casa} == {str(desktop / "casa-app")}, commands
    assert os.access(casa[0][0], os.X_OK)
    # The other releases' pipe menu: an attribute (" escaped too), split the same way.
    (releases,) = ET.parse(kept / "menu.xml").getroot().iterfind(".//m:menu[@execute]", namespace)
    assert releases.get("label") == "Other CASA releases"
    assert shlex.split(releases.get("execute") or "") == [
        str(desktop / "casa-app"),
        "releases-menu",
    ]


@pytest.mark.integration
def test_openbox_reads_the_desktop_menu_from_a_directory_with_any_name(
    tmp_path: Path, x_display: str
) -> None:
    """The real openbox, on a private X server, parses what xstartup wrote for awkward directories
    (an unescaped ``&`` or ``<`` is a libxml2 "parser error" on its stderr, and the menu is lost).
    """
    desktop, _runtime, env, kept = awkward_desktop(tmp_path)
    subprocess.run(
        ["sh", str(desktop / "xstartup")], env=env, timeout=60, check=True, capture_output=True
    )
    rc = kept / "rc.xml"
    menu = Path(
        re.findall(r"<file>(.*menu\.xml)</file>", rc.read_text())[0]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", '"')
        .replace("&amp;", "&")
    )
    # xstartup removed its runtime directory when it ended: put the menu back there.
    menu.parent.mkdir()
    shutil.copy(kept / "menu.xml", menu)
    with tempfile.TemporaryDirectory() as home:
        wm = subprocess.Popen(
            ["openbox", "--config-file", str(rc)],
            env={**os.environ, "DISPLAY": x_display, "HOME": home},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        time.sleep(3)
        wm.terminate()
        output = wm.communicate(timeout=10)[0].decode(errors="replace")
    assert "error" not in output.lower() and "unable" not in output.lower(), output


@pytest.fixture
def x_display(tmp_path: Path) -> Iterator[str]:
    """A private X server (TigerVNC's, no network port) for GUI apps; yields its DISPLAY."""
    xserver = shutil.which("Xtigervnc")
    if xserver is None:
        pytest.skip("Xtigervnc is not installed (make deps installs tigervnc-standalone-server)")
    unix = Path("/proc/net/unix").read_text()
    number = next(
        n
        for n in range(150, 400)
        if not Path(f"/tmp/.X{n}-lock").exists() and f"/tmp/.X11-unix/X{n}" not in unix
    )
    proc = subprocess.Popen(
        [
            xserver,
            f":{number}",
            "-SecurityTypes",
            "None",
            "-rfbport",
            "-1",
            "-geometry",
            "1024x768",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                break
            time.sleep(0.1)
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_plotms_plots_the_demo_ms_with_the_shared_measures(
    demo_env: CasaEnvironment, demo_root: Path, x_display: str, tmp_path: Path
) -> None:
    """The GUI apps ignore casaconfig: without the environment's casarc plotms finds no
    Observatories table."""
    assert demo_env.python is not None
    ms = next((demo_root / "arc" / "home" / demo.DEMO_USER / demo.DEMO_PROJECT).rglob("*.ms"))
    code = (
        "import sys\nfrom casaplotms import plotms\n"
        "plotms(vis=sys.argv[1], xaxis='uvdist', yaxis='amp', plotfile=sys.argv[2], "
        "showgui=False, overwrite=True)\n"
    )
    # As in a session: no proxy variables (gRPC would send plotms' own 127.0.0.1 connection through
    # them).
    plain = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    session = {
        **plain,
        **demo_env.session_environment(),
        "HOME": str(tmp_path),
        "DISPLAY": x_display,
    }

    def plot(env: dict[str, str], name: str) -> tuple[Path, str]:
        png, log = tmp_path / name, tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            # A file, not a pipe: the plotms app it starts may outlive it.
            subprocess.run(
                [str(demo_env.python), "-c", code, str(ms), str(png)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                timeout=120,
            )
        return png, log.read_text(errors="replace")

    png, output = plot(session, "amp-uvdist.png")
    assert png.is_file() and png.stat().st_size > 5000, output[-3000:]
    assert "Cannot read table of Observatories" not in output
    without = {k: v for k, v in session.items() if k != "CASARCFILES"}
    png, output = plot(without, "without-casarc.png")
    assert not png.exists() and "Cannot read table of Observatories" in output, output[-3000:]


def test_a_cache_that_cannot_be_written_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    cache = tmp_path / "not-a-directory" / "cache"
    manager = EnvironmentManager(cache, tarball_mirror="http://127.0.0.1:9/", probe_timeout=1)
    here = next(
        (v for v in ("3.13", "3.12", "3.11", "3.10", "3.8") if manager.find_python([v])), "3.11"
    )
    rel = release(casa="6.6.5-31", role="modular", wheels=Wheels((here,), "6.6.5.31", "6.6.5.31"))
    with pytest.raises(EnvironmentBuildError) as caught:
        asyncio.run(_collect(manager, rel))
    assert (
        str(caught.value) == f"Preparing CASA 6.6.5-31 failed: Not a directory ({cache / 'envs'})."
    )


# ------------------------------------------------------------------------------ progress of long
# steps


def wheel_with(path: Path, size: int) -> Path:
    """A wheel of about ``size`` incompressible bytes, for pip to download."""
    import base64
    import zipfile

    name = "casaspawner_test_payload"
    payload = os.urandom(size)
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/payload.bin": payload,
        f"{name}-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: casaspawner-test-payload\nVersion: 1.0\n"
        ),
        f"{name}-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }

    def record(data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"sha256={digest},{len(data)}"

    lines = [f"{n},{record(d)}" for n, d in files.items()]
    lines.append(f"{name}-1.0.dist-info/RECORD,,")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for n, d in files.items():
            wheel.writestr(n, d)
        wheel.writestr(f"{name}-1.0.dist-info/RECORD", "\n".join(lines) + "\n")
    return path


@pytest.mark.integration
def test_pip_downloads_say_their_size_rate_and_time_left(
    tmp_path: Path, served: tuple[str, Path, list[str]]
) -> None:
    """pip (from 24.1: ``--progress-bar raw``) downloading a 3 MB wheel from a package index on
    127.0.0.1; the steps in between are plain sentences."""
    from casaspawner.local.environments.progress import Progress
    from casaspawner.local.environments.steps import RAW_PROGRESS_PIP, pip_install, pip_version

    if asyncio.run(pip_version(sys.executable)) < RAW_PROGRESS_PIP:
        pytest.skip("this venv's pip is older than 24.1 (make venv upgrades it)")
    url, www, _requests = served
    project = www / "simple" / "casaspawner-test-payload"
    wheel = wheel_with(project / "casaspawner_test_payload-1.0-py3-none-any.whl", 3_000_000)
    (project / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    args = ["--no-deps", "--no-cache-dir", "--index-url", f"{url}simple/"]
    args += ["--target", str(tmp_path / "target"), "casaspawner-test-payload"]

    async def install() -> list[str]:
        return [m async for m in pip_install(sys.executable, args, "Installing the payload")]

    messages = asyncio.run(install())
    plain = [m for m in messages if not isinstance(m, Progress)]
    assert any(m.startswith("Collecting casaspawner-test-payload") for m in plain), plain
    assert any(m.startswith(f"Downloading {wheel.name}") for m in plain), plain
    progress = [m for m in messages if isinstance(m, Progress)]
    size = wheel.stat().st_size
    assert progress and progress[-1].done == progress[-1].total == size, progress
    assert {p.step for p in progress} == {f"Downloading {wheel.name}"}
    assert str(progress[-1]).startswith(f"Downloading {wheel.name}: 3.0 MB of 3.0 MB"), progress
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert (tmp_path / "target" / "casaspawner_test_payload" / "payload.bin").stat().st_size == (
        3_000_000
    )


def test_a_download_says_its_rate_and_time_left() -> None:
    from casaspawner.local.environments.progress import TransferMeter

    now = [100.0]
    meter = TransferMeter("Downloading casadata", 900_000_000, clock=lambda: now[0])
    now[0] += 2.0
    first = meter.update(100_000_000)
    assert str(first) == ("Downloading casadata: 100 MB of 900 MB, 50 MB/s, about 16 s left."), (
        first
    )
    assert (first.fraction, first.rate, first.left) == (100 / 900, 50e6, 16.0)
    # The rate is that of the last seconds: a stall shows.
    now[0] += 10.0
    stalled = meter.update(110_000_000)
    assert stalled.rate == 1e6 and str(stalled).endswith("about 13 min 10 s left."), stalled


def test_a_quiet_step_is_said_to_be_still_running() -> None:
    from casaspawner.local.environments.progress import Progress, with_heartbeat

    async def steps() -> Any:
        yield "Unpacking the casaplotms GUI (no FUSE needed)."
        await asyncio.sleep(2.5)
        yield "CASA 6.7.0-31 is ready."
        await asyncio.sleep(0.2)
        raise EnvironmentBuildError("Installing CASA 6.7.0-31 failed: no space left.")

    async def collect() -> list[str]:
        said: list[str] = []
        with pytest.raises(EnvironmentBuildError, match="no space left"):
            async for message in with_heartbeat(steps(), every=1.0):
                said.append(message)
        return said

    said = asyncio.run(collect())
    assert said == [
        "Unpacking the casaplotms GUI (no FUSE needed).",
        "Unpacking the casaplotms GUI (no FUSE needed): 1 s so far.",
        "Unpacking the casaplotms GUI (no FUSE needed): 2 s so far.",
        "CASA 6.7.0-31 is ready.",
    ], said
    assert all(isinstance(m, Progress) for m in said[1:3])


def test_make_demo_redraws_one_line_per_download_in_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from casaspawner.local.environments.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "120")
    out = Terminal()
    view = demo.ProgressView(out)
    view.show("Installing casatools==6.7.0.31 (a few minutes, once per release).")
    for done in (90_000_000, 270_000_000):
        view.show(
            Progress(
                "…",
                step="Downloading casaplotms-2.6.2.whl",
                done=done,
                total=270_000_000,
                rate=30e6,
                left=(270_000_000 - done) / 30e6,
            )
        )
    view.show("Installing collected packages: casaplotms")
    lines = out.getvalue().split("\n")
    assert lines[0] == (
        "[casaspawner demo] Installing casatools==6.7.0.31 (a few minutes, once per release)."
    )
    # One line, drawn twice in place, then the next sentence on a line of its own.
    drawn = [part.rstrip() for part in lines[1].split("\r") if part]
    assert drawn == [
        "[casaspawner demo] Downloading casaplotms-2.6.2.whl  [########----------------]  "
        "90/270 MB  30 MB/s  6 s left",
        "[casaspawner demo] Downloading casaplotms-2.6.2.whl  [########################]  "
        "270/270 MB  30 MB/s  0 s left",
    ], drawn
    assert lines[2] == "[casaspawner demo] Installing collected packages: casaplotms"
    # A narrow terminal shortens the name, never the figures.
    monkeypatch.setenv("COLUMNS", "80")
    narrow = Terminal()
    demo.ProgressView(narrow).show(
        Progress(
            "…",
            step="Downloading casaplotms-2.6.2.whl",
            done=90_000_000,
            total=270_000_000,
            left=6.0,
        )
    )
    drawn = narrow.getvalue().strip("\r").rstrip()
    assert len(drawn) <= 79 and drawn.startswith("[casaspawner demo] Download"), drawn
    assert drawn.endswith("…  [########----------------]  90/270 MB  6 s left"), drawn


@pytest.mark.integration
def test_the_demo_prepared_the_sessions_jupyter_environment(
    demo_root: Path, cache_dir: Path
) -> None:
    """The first session does not wait for it: ``make demo`` prepares it before the hub starts."""
    from casaspawner.local.spawner import ui_requirements

    requirements = ui_requirements()
    if requirements is None:
        pytest.skip("sessions run the hub's own environment here; there is nothing to prepare")
    prefix = EnvironmentManager(cache_dir).ui_prefix(requirements)
    assert (prefix / "bin" / "jupyterhub-singleuser").is_file()


@pytest.mark.integration
def test_casa_logs_to_the_sessions_one_file(demo_env: CasaEnvironment, tmp_path: Path) -> None:
    """With ``CASASPAWNER_CASA_LOGFILE`` (what sessions get), CASA logs there, and leaves no
    ``casa-<time>.log`` where it started; without it, it does."""
    assert demo_env.python is not None
    code = "import casatasks\ncasatasks.casalog.post('casaspawner one log')\n"
    env = {**os.environ, **OFFLINE, "CASASITECONFIG": str(demo_env.site_config)}
    env.pop("CASASPAWNER_CASA_LOGFILE", None)
    log = tmp_path / "home" / "casa.log"
    log.parent.mkdir()
    for work, extra in (
        (tmp_path / "a", {"CASASPAWNER_CASA_LOGFILE": str(log)}),
        (tmp_path / "b", {}),
    ):
        work.mkdir()
        run = subprocess.run(
            [str(demo_env.python), "-c", code],
            env={**env, "HOME": str(log.parent), **extra},
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
    assert "casaspawner one log" in log.read_text()
    assert not list((tmp_path / "a").glob("casa-*.log"))
    assert len(list((tmp_path / "b").glob("casa-*.log"))) == 1


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_plotms_opens_the_sessions_ms_centred_within_the_screen(
    demo_env: CasaEnvironment, demo_root: Path, x_display: str, tmp_path: Path
) -> None:
    """The desktop's plotms (the launcher's and the menu's) opens the session's MeasurementSet,
    and openbox (as xstartup configures it) fits its window into a 1024x768 screen, smaller than
    a laptop's browser window."""
    from support.local import window_geometry, window_titles

    desktop, _runtime, env, kept = awkward_desktop(tmp_path)
    subprocess.run(["sh", str(desktop / "xstartup")], env=env, timeout=60, check=True)
    # The demo dataset, in a home of this test's own.
    home = tmp_path / "home"
    shutil.copytree(
        demo_root / "arc" / "home" / demo.DEMO_USER / demo.DEMO_PROJECT, home / demo.DEMO_PROJECT
    )
    dataset = home / demo.DEMO_PROJECT
    ms = next(dataset.rglob("*.ms"))
    # A headless run's output beside the dataset, sorting first: plotms still opens the dataset's.
    (dataset / "casaspawner-runs" / "20260101T000000Z-restore" / "restored.ms").mkdir(parents=True)
    plain = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    session = {
        **plain,
        **demo_env.session_environment(),
        "HOME": str(home),
        "DISPLAY": x_display,
        "XAUTHORITY": "",
        "CASASPAWNER_DATASET": f"~/{demo.DEMO_PROJECT}",
        "CASASPAWNER_CASA_LOGFILE": str(tmp_path / "casa.log"),
    }
    wm = subprocess.Popen(
        ["openbox", "--config-file", str(kept / "rc.xml")],
        env={**session, "HOME": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    plotms = subprocess.Popen(
        ["sh", str(desktop / "casa-app"), "plotms"],
        env=session,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while "PlotMS" not in window_titles(x_display, ""):
            assert time.monotonic() < deadline and plotms.poll() is None, "no PlotMS window"
            time.sleep(0.5)
        # openbox places it once it is mapped.
        time.sleep(2)
        x, y, width, height = window_geometry(x_display, "", "PlotMS")
        assert min(x, y) >= 0 and x + width <= 1024 and y + height <= 768, (x, y, width, height)
        assert abs((x + width / 2) - 512) < 40 and abs((y + height / 2) - 384) < 40
        assert _cmdline_has(plotms.pid, f"vis={ms}")
    finally:
        plotms.terminate()
        wm.terminate()
        plotms.wait(10)
        wm.wait(10)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_casa_app_runs_from_a_copy_in_an_image_casaspawner_did_not_build(
    demo_env: CasaEnvironment, x_display: str, tmp_path: Path
) -> None:
    """An app's pod runs casa-app copied out of the session's image into an image that may have
    no desktop stack and none of casaspawner's variables: it finds CASA by the python3 on PATH
    that has casatools and opens plotms; without xterm, the CASA terminal is one sentence."""
    assert demo_env.python is not None
    tools = tmp_path / "opt-casa-app"
    shutil.copytree(DESKTOP, tools)
    home = tmp_path / "home"
    home.mkdir()
    bare = {
        "PATH": f"{demo_env.python.parent}:/usr/bin:/bin",
        "HOME": str(home),
        "DISPLAY": x_display,
        "XAUTHORITY": "",
        "CASASPAWNER_KERNEL_NAME": "CASA in a bare image",
    }
    plotms = subprocess.Popen(
        ["/bin/sh", str(tools / "casa-app"), "plotms"],
        env=bare,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # No window manager here: the X server's own window tree.
    tree = ["xwininfo", "-root", "-tree"]
    try:
        deadline = time.monotonic() + 120
        while (
            '"PlotMS"' not in subprocess.run(tree, env=bare, capture_output=True, text=True).stdout
        ):
            assert time.monotonic() < deadline and plotms.poll() is None, "no PlotMS window"
            time.sleep(0.5)
    finally:
        plotms.terminate()
        plotms.wait(10)

    # No xterm (nor xmessage) on PATH: what the hub shows the desktop's user.
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("dirname", "readlink", "python3"):
        found = shutil.which(tool, path=bare["PATH"])
        assert found is not None, tool
        (path / tool).symlink_to(found)
    said = subprocess.run(
        ["/bin/sh", str(tools / "casa-app"), "terminal"],
        env={**bare, "PATH": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert said.returncode == 1
    assert said.stderr.strip() == (
        "CASA in a bare image has no xterm for its CASA terminal; its plotms and viewer need none."
    )

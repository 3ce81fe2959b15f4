"""Per-release CASA environments: finding Pythons, saying why a build cannot be installed, a monolithic
stand-in tarball served on 127.0.0.1 (verified, unpacked, built once under a lock, registered as a kernel),
and the real demo environment (offline start with the site config, extracted GUIs, the simulated MS)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from casaspawner import demo
from casaspawner.catalog.model import Release, Tarball, Wheels, load_catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.environments import (
    CasaEnvironment,
    EnvironmentBuildError,
    EnvironmentManager,
    site_config_text,
)
from casaspawner.environments.pythons import find_python, world_usable

OFFLINE = {key: "http://127.0.0.1:9" for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def release(**fields: object) -> Release:
    base: dict[str, object] = {
        "id": "test-release",
        "role": "pipeline",
        "casa": "6.6.1-17",
        "confidence": "confirmed",
    }
    return Release(**{**base, **fields})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- unit


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
    wheels_only = release(casa="6.6.6-1", role="modular", wheels=Wheels(("3.4",), "6.6.6.1", "6.6.6.1"))
    assert manager.unavailable_reason(wheels_only) == (
        "CASA 6.6.6-1 cannot be installed on this hub: its wheels need Python 3.4, which this machine does not have."
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
        "CASA 5.4.0-68 cannot be installed on this hub: ALMA published no tarball or wheels for it."
    )


def test_site_config_points_at_the_shared_measures_with_updates_off(tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(site_config_text(tmp_path / "measures"), namespace)
    assert namespace["measurespath"] == str(tmp_path / "measures")
    assert namespace["measures_auto_update"] is False and namespace["data_auto_update"] is False


# ------------------------------------------------------------------- monolithic stand-in on 127.0.0.1

STANDIN_TOP = "casa-6.6.1-17-pipeline-2024.1.0.8"
WRAPPER = """#!/bin/sh
# like CASA 6's bin/python3: its own site-packages first, then the bundled interpreter
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here/lib/py/lib/python3.11/site-packages${PYTHONPATH:+:$PYTHONPATH}"
exec /usr/bin/python3.11 "$@"
"""


@pytest.fixture
def tarball_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A stand-in monolithic tarball (+ .md5) served on 127.0.0.1; yields (base URL, file, request log)."""
    if not Path("/usr/bin/python3.11").exists():
        pytest.skip("the stand-in tarball wraps /usr/bin/python3.11")
    tree = tmp_path / "src" / STANDIN_TOP
    site = tree / "lib" / "py" / "lib" / "python3.11" / "site-packages" / "casatools"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("def version_string():\n    return '6.6.1-17'\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "python3").write_text(WRAPPER)
    (tree / "bin" / "python3").chmod(0o755)
    served = tmp_path / "www"
    served.mkdir()
    archive = served / f"{STANDIN_TOP}-py3.11.el8.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tree, arcname=STANDIN_TOP)
    (served / (archive.name + ".md5")).write_text(
        f"{hashlib.md5(archive.read_bytes()).hexdigest()}  {archive.name}\n"
    )
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(served), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            requests.append(f"{self.command} {self.path}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", archive, requests
    finally:
        server.shutdown()


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
    rel = release(pipeline="2024.1.0.8", tarball=Tarball(archive.name, url))  # no sha256: the .md5 is used

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
        [*spec["argv"][:1], "-c", "import ipykernel, casatools; print(casatools.version_string())"],
        env={**os.environ, **spec["env"]},
        capture_output=True,
        text=True,
    )
    assert run.stdout.strip() == "6.6.1-17", run.stderr
    config: dict[str, object] = {}
    exec(env.site_config.read_text(), config)
    assert config["measurespath"] == str(measures)


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
    assert not (tmp_path / "cache" / "downloads" / archive.name).exists(), "a bad download is not kept"


# ------------------------------------------------------------------------------ the real demo environment


@pytest.mark.integration
def test_casatools_starts_offline_with_the_site_config_and_not_without(
    demo_env: CasaEnvironment, tmp_path: Path
) -> None:
    assert demo_env.python is not None
    code = "import casatools; print(casatools.version_string()); print(casatools.measures().observatory('ALMA')['m2'])"
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **OFFLINE}
    good = subprocess.run(
        [str(demo_env.python), "-c", code], env={**base, "CASASITECONFIG": str(demo_env.site_config)},
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr[-2000:]
    assert good.stdout.splitlines()[0] == "6.6.5-31"
    bad = subprocess.run(
        [str(demo_env.python), "-c", code],
        env=base,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert bad.returncode != 0, "without the site config casatools would try to fetch measures data"
    assert "measurespath" in bad.stderr or "AutoUpdatesNotAllowed" in bad.stderr
    assert world_usable(demo_env.measures / "geodetic")
    assert not demo_env.measures.stat().st_mode & 0o222, "the shared measures tree is read-only"


@pytest.mark.integration
def test_gui_appimages_are_extracted_once_for_every_user(demo_env: CasaEnvironment) -> None:
    for package in ("casaplotms", "casaviewer", "casalogger"):
        appimages = list(demo_env.casa_home.glob(f"lib/python3*/site-packages/{package}/__bin__/*.AppImage"))
        assert len(appimages) == 1, package
        target = appimages[0].resolve()
        assert appimages[0].is_symlink() and target == demo_env.root / "apps" / package / "AppRun"
        assert world_usable(target) and os.stat(target).st_mode & 0o001


@pytest.mark.integration
def test_demo_dataset_is_a_real_ms_in_an_alma_tree(
    demo_root: Path, demo_env: CasaEnvironment, tmp_path: Path
) -> None:
    project = demo_root / "arc" / "home" / demo.DEMO_USER / demo.DEMO_SPEC.project
    resolution = resolve_path(project, load_catalog())
    assert (resolution.release.id, resolution.exact) == (demo.DEMO_RELEASE, True)
    ms = next(project.rglob("*.ms"))
    assert ms.parent.name == "calibrated"
    code = (
        "import sys, casatools; tb = casatools.table(); ms = sys.argv[1]\n"
        "tb.open(ms); rows = tb.nrows(); tb.close()\n"
        "tb.open(ms + '/ANTENNA'); ants = tb.nrows(); tb.close()\n"
        "tb.open(ms + '/SPECTRAL_WINDOW'); chans = tb.getcol('NUM_CHAN').tolist(); tb.close()\n"
        "print(rows, ants, chans)"
    )
    assert demo_env.python is not None
    out = subprocess.run(
        [str(demo_env.python), "-c", code, str(ms)], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "CASASITECONFIG": str(demo_env.site_config), **OFFLINE}, timeout=300,
    )  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "300 5 [16]", out.stderr[-2000:]


def test_envs_command_lists_what_this_machine_can_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
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
    assert rows["casa-6.6.5-31"]["status"] == "buildable" and rows["casa-6.6.5-31"]["reason"] is None
    assert rows["pl-2023.1.0.124"]["status"] == "unavailable"
    assert "tarball http://127.0.0.1:9/" in rows["pl-2023.1.0.124"]["reason"]
    assert main(["envs", "build", "no-such-release", *options]) == 2
    assert capsys.readouterr().err.strip() == (
        "casaspawner: 'no-such-release' is not a release in the catalog; `casaspawner catalog` lists them."
    )

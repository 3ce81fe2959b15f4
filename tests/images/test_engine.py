"""Build command lines (buildah and docker), the mmdebstrap call, build contexts, the casaspawner
wheel, and tarball verification (the SHA-256, else the published .md5) against a server on
127.0.0.1. No containers: docker's CLI may exist here but no docker engine does, so its command
line is checked, not run."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from casaspawner import __version__, net, tarballs
from casaspawner.catalog import Catalog
from casaspawner.images import engine
from casaspawner.images.cli import buildable, constraint_sources, selected_recipes
from casaspawner.images.matrix import ImageBuildError, MatrixOptions, build_matrix, release_recipe
from casaspawner.local.environments import EnvironmentManager

STANDIN = "pl-2024.1.0.8"


def _tools(builder: str, ca: Path | None) -> engine.Tools:
    runner = "podman" if builder == "buildah" else "docker"
    return engine.Tools(builder=builder, runner=runner, ca_bundle=ca)  # type: ignore[arg-type]


@pytest.mark.parametrize("builder", ["buildah", "docker"])
def test_the_ca_bundle_is_a_build_secret_on_both_engines(
    builder: str, catalog: Catalog, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    recipe = build_matrix(catalog, MatrixOptions(), ["casa-6.6.5-31"])[2]
    argv = engine.build_command(_tools(builder, ca), recipe, tmp_path, "f" * 64)
    assert argv[:2] == [builder, "bud" if builder == "buildah" else "build"]
    assert f"id=casaspawner-ca,src={ca}" == argv[argv.index("--secret") + 1]
    assert not any(a.startswith(("-v", "--volume")) for a in argv), (
        "no bind mount: nothing lands in the image"
    )
    args = [argv[i + 1] for i, a in enumerate(argv) if a == "--build-arg"]
    assert not [a for a in args if str(ca) in a or a.startswith(("PIP_CERT", "SSL_CERT_FILE"))]
    assert f"SESSION_BASE={recipe.build_args['SESSION_BASE']}" in args
    assert f"io.casaspawner.input-hash={'f' * 64}" in argv
    assert argv[-1] == str(tmp_path)
    without = engine.build_command(_tools(builder, None), recipe, tmp_path, "f" * 64)
    assert "--secret" not in without


def test_docker_builds_use_buildkit() -> None:
    if not shutil.which("docker"):
        pytest.skip("no docker CLI")
    tools = engine.detect_tools(builder="docker", ca_bundle="none")
    assert tools.env["DOCKER_BUILDKIT"] == "1" and tools.runner == "docker"


def test_recipes_mount_the_secret_in_every_step_that_downloads() -> None:
    for containerfile in sorted(engine.recipes_dir().glob("*/*Containerfile")):
        for step in containerfile.read_text().split("\nRUN ")[1:]:
            downloads = any(
                word in step for word in ("apt_install", "install_casa_runtime", "pip install -q")
            )
            if downloads:
                assert "--mount=type=secret,id=casaspawner-ca" in step, (
                    containerfile.name,
                    step[:80],
                )
        assert "casaspawner-build-ca" not in containerfile.read_text()
        # The session base is always given by the build tool: no default naming a tag it never
        # makes.
        assert re.search(r"ARG SESSION_\w+=", containerfile.read_text()) is None, (
            containerfile.name
        )


def test_mmdebstrap_call_for_http_and_https_mirrors(tmp_path: Path) -> None:
    http = ["deb http://mirror.example/debian bookworm main"]
    https = ["deb https://mirror.example/debian bookworm main"]
    target = tmp_path / "base.tar"
    plain = engine.mmdebstrap_command("bookworm", target, http, None)
    assert plain == ["mmdebstrap", "--variant=minbase", "--quiet", "bookworm", str(target), *http]
    ca = tmp_path / "ca.pem"
    secured = engine.mmdebstrap_command("bookworm", target, https, ca)
    assert "--include=ca-certificates" in secured
    assert f'--aptopt=Acquire::https::CAInfo "{ca}"' in secured
    # The CA option must not stay in the base image's apt configuration.
    assert '--customize-hook=rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"' in secured
    assert secured[-3:] == ["bookworm", str(target), *https]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return engine.casaspawner_wheel(tmp_path_factory.mktemp("wheel"))


def test_casaspawner_wheel_is_reproducible_and_carries_the_recipes(
    wheel: Path, tmp_path: Path
) -> None:
    again = engine.casaspawner_wheel(tmp_path)
    assert again.name == wheel.name and again.read_bytes() == wheel.read_bytes()
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = engine.recipes_dir()
    # The checkout's own.
    assert recipes == Path(engine.__file__).resolve().parents[2] / "images"
    data = f"casaspawner-{__version__}.data/data/{engine.INSTALLED_RECIPES.as_posix()}/"
    shipped = {
        data + p.relative_to(recipes).as_posix()
        for p in recipes.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped and shipped <= names, f"not packaged: {sorted(shipped - names)}"
    assert {
        "casaspawner/tarballs.py",
        "casaspawner/insession/desktop/xstartup",
        "casaspawner/insession/notices.py",
    } <= names


#: Run by an installed casaspawner: where its recipes are, and every build context it assembles
#: from them.
INSTALLED_CONTEXTS = """
import hashlib, json, sys, tempfile
from pathlib import Path
from casaspawner.catalog import load_catalog
from casaspawner.images import engine
from casaspawner.images.matrix import ImageBuildError, MatrixOptions, build_matrix
try:
    recipes = engine.recipes_dir()
except ImageBuildError as error:
    print(json.dumps({"error": str(error)}))
    raise SystemExit(0)
contexts = {}
for recipe in build_matrix(load_catalog(), MatrixOptions(), sys.argv[2:]):
    with tempfile.TemporaryDirectory() as into:
        files = engine.assemble_context(recipe, recipes, Path(into), Path(sys.argv[1]))
    contexts[recipe.name] = {
        name: hashlib.sha256(data).hexdigest() for name, data in files.items()
    }
print(json.dumps({"package": engine.__file__, "recipes": str(recipes), "contexts": contexts}))
"""


def _installed(
    python: Path, wheel: Path, cwd: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    result = subprocess.run(
        [str(python), "-c", INSTALLED_CONTEXTS, str(wheel), "casa-6.6.5-31", STANDIN],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def test_an_installed_wheel_builds_from_the_recipes_it_installed(
    wheel: Path, catalog: Catalog, tmp_path: Path
) -> None:
    # What the checkout assembles: every build context, byte for byte.
    expected = {}
    for recipe in build_matrix(catalog, MatrixOptions(), ["casa-6.6.5-31", STANDIN]):
        files = engine.assemble_context(
            recipe, engine.recipes_dir(), tmp_path / recipe.name, wheel
        )
        expected[recipe.name] = {
            name: hashlib.sha256(data).hexdigest() for name, data in files.items()
        }
    # No checkout on sys.path: `python -c` puts the working directory first.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pip = [sys.executable, "-m", "pip"]
    install = ["install", "--quiet", "--no-deps", "--no-index"]

    # A venv with a non-editable install (casaspawner's dependencies come from this test's
    # environment).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([*pip, "--python", str(python), *install, str(wheel)], check=True, timeout=300)
    installed = _installed(python, wheel, outside)
    assert Path(installed["package"]).is_relative_to(site)
    assert installed["recipes"] == str(venv / "share" / "casaspawner" / "images")
    assert installed["contexts"] == expected
    # Without the record of installed files (as distributions' packages ship it), sys.prefix's
    # copy.
    (record,) = site.glob("casaspawner-*.dist-info/RECORD")
    record.unlink()
    assert _installed(python, wheel, outside)["recipes"] == installed["recipes"]
    # Without the recipes: one sentence.
    shutil.rmtree(venv / "share" / "casaspawner")
    assert _installed(python, wheel, outside) == {
        "error": "the image recipes are missing: neither a source checkout's images/ nor "
        f"{venv / 'share' / 'casaspawner' / 'images'} has them (reinstall casaspawner from its "
        "wheel)."
    }

    # `pip install --target`: the recipes land beside the package, found through the record.
    target = tmp_path / "target"
    subprocess.run([*pip, *install, "--target", str(target), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    installed = _installed(Path(sys.executable), wheel, outside, env)
    assert Path(installed["package"]).is_relative_to(target)
    assert installed["recipes"] == str(target / "share" / "casaspawner" / "images")
    assert installed["contexts"] == expected


def test_a_given_wheel_must_be_a_casaspawner_wheel(tmp_path: Path) -> None:
    other = tmp_path / "other-1.0-py3-none-any.whl"
    other.write_bytes(b"")
    with pytest.raises(ImageBuildError, match="is not a casaspawner wheel"):
        engine.casaspawner_wheel(tmp_path / "x", other)


def test_build_contexts(catalog: Catalog, wheel: Path, tmp_path: Path) -> None:
    recipes = build_matrix(catalog, MatrixOptions(), ["casa-6.6.5-31", STANDIN])
    contexts = {}
    for recipe in recipes:
        into = tmp_path / recipe.name
        contexts[recipe.name] = set(
            engine.assemble_context(recipe, engine.recipes_dir(), into, wheel)
        )
    assert {
        "Containerfile",
        "common.sh",
        "requirements.txt",
        "entrypoint.sh",
        "constraints.txt",
    } <= contexts["session-base"]
    assert not any(name.startswith("wheels/") for name in contexts["session-base"])
    for name in ("session", "casa-6.6.5-31", STANDIN):
        assert f"wheels/{wheel.name}" in contexts[name]
    assert {"tarballs.py", "net.py"} <= contexts[STANDIN]
    assert "tarballs.py" not in contexts["casa-6.6.5-31"]
    assert not any(n.startswith("constraints/") for n in contexts["casa-6.6.5-31"])
    own = engine.constraints_path(recipes[2])
    assert own.name == "casa-6.6.5-31.txt"
    expected = own.read_text() if own.is_file() else "# none yet: dependencies float\n"
    assert (tmp_path / "casa-6.6.5-31" / "constraints.txt").read_text() == expected
    with pytest.raises(ImageBuildError, match="no casaspawner wheel"):
        engine.assemble_context(recipes[1], engine.recipes_dir(), tmp_path / "nowheel")


def test_build_all_says_what_it_skips(
    catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    recipes = build_matrix(
        catalog, MatrixOptions(python="3.12"), ["casa-6.6.5-31", "casa-6.7.0-31"]
    )
    kept = buildable(recipes)
    assert [r.name for r in kept] == ["session-base", "session", "casa-6.7.0-31"]
    out = capsys.readouterr().out
    assert out.startswith(
        "skipping casa-6.6.5-31: casatools 6.6.5.31 has no wheel for Python 3.12"
    )


def test_the_cli_picks_recipes_by_kind_not_by_position(
    catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ["casa-6.6.5-31", "pl-r42866", "pl-2024.1.0.8"]
    # The releases first, the session base last.
    shuffled = build_matrix(catalog, MatrixOptions(), ids)[::-1]
    one = argparse.Namespace(session=False, release=["pl-2024.1.0.8"], all=False)
    names = [r.name for r in selected_recipes(one, shuffled, base=True)]
    assert names == ["session-base", "session", "pl-2024.1.0.8"]
    assert [r.name for r in selected_recipes(one, shuffled)] == ["session", "pl-2024.1.0.8"]
    every = argparse.Namespace(session=False, release=None, all=True)
    assert [r.name for r in selected_recipes(every, shuffled)] == ["session", *ids[::-1]]
    # The session's pins are read from the session base (its venv is made there), each release's
    # from its own image; CASA 5 (no Python 3) has nothing to pin.
    both = argparse.Namespace(session=True, release=ids[:2], all=False)
    assert [r.name for r in constraint_sources(both, shuffled)] == [
        "session-base",
        "casa-6.6.5-31",
    ]
    assert (
        capsys.readouterr().out
        == "pl-r42866: nothing to pin (CASA 5.6.1-8 has no Python 3, so pip installs nothing)\n"
    )


# ---------------------------------------------------------------------------- tarball checksums on
# 127.0.0.1


class _Mirror(SimpleHTTPRequestHandler):
    """Serves the mirror's directory; ``/moved/X`` redirects to ``/good/X`` on the same origin and
    ``/away/X`` to ``/good/X`` on another (``localhost`` instead of ``127.0.0.1``: the same server,
    another origin)."""

    def do_GET(self) -> None:
        kind, _, rest = self.path.lstrip("/").partition("/")
        if kind in ("moved", "away"):
            origin = "" if kind == "moved" else f"http://localhost:{self.server.server_address[1]}"
            self.send_response(302)
            self.send_header("Location", f"{origin}/good/{rest}")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``good/`` has a tarball and its right .md5, ``wrong/`` a wrong .md5, ``none/`` no .md5 (and
    ``moved/`` and ``away/`` redirect to ``good/``, see :class:`_Mirror`)."""
    root = tmp_path_factory.mktemp("mirror")
    data = b"not really a tarball\n" * 100
    for kind, md5 in (
        ("good", hashlib.md5(data).hexdigest()),
        ("wrong", "0" * 32),
        ("none", None),
    ):
        (root / kind).mkdir()
        (root / kind / "casa.tar.xz").write_bytes(data)
        if md5:
            (root / kind / "casa.tar.xz.md5").write_text(f"{md5}  casa.tar.xz\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Mirror, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()


def test_published_md5_is_the_fallback_and_a_wrong_one_refuses(mirror: tuple[str, Path]) -> None:
    url, root = mirror
    data = (root / "good" / "casa.tar.xz").read_bytes()
    algorithm, value = tarballs.expected_checksum(f"{url}/good/casa.tar.xz", None)
    assert (algorithm, value) == ("md5", hashlib.md5(data).hexdigest())
    tarballs.verify_file(root / "good" / "casa.tar.xz", algorithm, value)
    wrong = tarballs.expected_checksum(f"{url}/wrong/casa.tar.xz", None)
    with pytest.raises(tarballs.ChecksumError, match="does not match its MD5 checksum"):
        tarballs.verify_file(root / "wrong" / "casa.tar.xz", *wrong)
    with pytest.raises(
        tarballs.ChecksumError, match="has no SHA-256 and .*casa.tar.xz.md5 is unreachable"
    ):
        tarballs.expected_checksum(f"{url}/none/casa.tar.xz", None)
    pinned = hashlib.sha256(data).hexdigest()
    assert tarballs.expected_checksum(f"{url}/none/casa.tar.xz", pinned.upper()) == (
        "sha256",
        pinned,
    )


@pytest.mark.parametrize(
    ("url", "trusted"),
    [
        ("https://casa.nrao.edu/download/distro/casa-pipeline/release/linux/casa.tar.xz", True),
        ("https://mirror.example.org/casa/casa.tar.xz", True),
        ("http://127.0.0.1:8000/casa.tar.xz", True),
        ("http://127.3.2.1/casa.tar.xz", True),
        ("http://localhost:8000/casa.tar.xz", True),
        ("http://[::1]:8000/casa.tar.xz", True),
        ("http://casa.nrao.edu/download/distro/casa.tar.xz", False),
        ("http://mirror.example.org/casa/casa.tar.xz", False),
        ("http://10.0.0.5/casa.tar.xz", False),
        ("http://127.0.0.1.example.org/casa.tar.xz", False),
        ("ftp://127.0.0.1/casa.tar.xz", False),
    ],
)
def test_the_md5_fallback_is_taken_only_over_https_or_from_this_machine(
    url: str, trusted: bool
) -> None:
    problem = tarballs.unverifiable(url, None)
    assert (problem is None) == trusted, problem
    if not trusted:
        assert problem == (
            "the catalog has no SHA-256, and an MD5 counts only over https or from this "
            f"machine, not {url}.md5"
        )
        # Refused before any request (the host does not resolve here: a request would say
        # "unreachable").
        with pytest.raises(tarballs.ChecksumError) as refused:
            tarballs.expected_checksum(url, None, timeout=2)
        assert str(refused.value) == f"casa.tar.xz cannot be verified: {problem}."
    # A pinned SHA-256 always wins: no .md5 is asked for, whatever the scheme.
    assert tarballs.unverifiable(url, "a" * 64) is None
    assert tarballs.expected_checksum(url, "A" * 64) == ("sha256", "a" * 64)


def test_the_md5_request_stays_on_the_tarballs_origin(mirror: tuple[str, Path]) -> None:
    url, root = mirror
    md5 = hashlib.md5((root / "good" / "casa.tar.xz").read_bytes()).hexdigest()
    assert tarballs.expected_checksum(f"{url}/moved/casa.tar.xz", None) == ("md5", md5)
    port = url.rsplit(":", 1)[1]
    with pytest.raises(tarballs.ChecksumError) as refused:
        tarballs.expected_checksum(f"{url}/away/casa.tar.xz", None)
    assert str(refused.value) == (
        f"casa.tar.xz cannot be verified: {url}/away/casa.tar.xz.md5 redirects to another origin "
        f"(http://localhost:{port}/good/casa.tar.xz.md5)."
    )


def test_local_environments_refuse_an_unverifiable_tarball_before_downloading(
    catalog: Catalog, tmp_path: Path
) -> None:
    release = catalog.get(STANDIN)
    assert (
        release.tarball is not None and release.tarball.sha256 is None and release.wheels is None
    )
    manager = EnvironmentManager(
        tmp_path, tarball_mirror="http://mirror.example.org/casa/", probe_timeout=1
    )
    url = f"http://mirror.example.org/casa/{release.tarball.name}"
    # Not "unreachable": the mirror was not asked (this host cannot resolve it).
    assert manager.unavailable_reason(release) == (
        f"{release.label} cannot be installed on this hub: its tarball {url} cannot be verified "
        f"({tarballs.unverifiable(url, None)})."
    )
    pinned = dataclasses.replace(
        release, tarball=dataclasses.replace(release.tarball, sha256="a" * 64)
    )
    # Pinned: it is tried.
    assert "is unreachable" in (manager.unavailable_reason(pinned) or "")


def test_image_builds_resolve_the_md5_before_building(
    catalog: Catalog, mirror: tuple[str, Path]
) -> None:
    url, root = mirror
    release = catalog.get(STANDIN)
    assert release.tarball is not None
    md5 = hashlib.md5(b"stand-in\n").hexdigest()
    for kind in ("good", "none"):
        (root / kind / release.tarball.name).write_bytes(b"stand-in\n")
    (root / "good" / (release.tarball.name + ".md5")).write_text(
        f"{md5}  {release.tarball.name}\n"
    )
    recipe = release_recipe(release, MatrixOptions(tarball_mirror=f"{url}/good/"))
    assert recipe.build_args["CASA_TARBALL_CHECKSUM"] == ""
    resolved = engine.resolve_checksum(recipe)
    assert resolved.build_args["CASA_TARBALL_CHECKSUM"] == f"md5:{md5}"
    assert (
        resolved.labels["io.casaspawner.tarball-checksum"]
        == resolved.build_args["CASA_TARBALL_CHECKSUM"]
    )
    missing = release_recipe(release, MatrixOptions(tarball_mirror=f"{url}/none/"))
    with pytest.raises(ImageBuildError) as refused:
        engine.resolve_checksum(missing)
    assert "cannot be verified" in str(refused.value) and "--checksums or --sha256" in str(
        refused.value
    )
    assert len(str(refused.value).splitlines()) == 1
    modular = build_matrix(catalog, MatrixOptions(), ["casa-6.6.5-31"])[2]
    assert engine.resolve_checksum(modular) is modular


def test_the_build_time_script_verifies_then_unpacks(
    mirror: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = mirror
    tree = tmp_path / "src" / "casa-x"
    tree.mkdir(parents=True)
    (tree / "VERSION").write_text("x\n")
    subprocess.run(
        ["tar", "-C", str(tmp_path / "src"), "-cf", str(root / "good" / "t.tar"), "casa-x"],
        check=True,
    )
    digest = hashlib.sha256((root / "good" / "t.tar").read_bytes()).hexdigest()
    # As an image build runs it: the file alone beside net.py, without casaspawner installed.
    build = tmp_path / "build"
    build.mkdir()
    for module in (tarballs, net):
        shutil.copy2(Path(str(module.__file__)), build)
    script = [sys.executable, "-S", "-E", str(build / "tarballs.py")]
    ok = subprocess.run(
        [*script, f"{url}/good/t.tar", f"sha256:{digest}", str(tmp_path / "dest")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "dest" / "VERSION").read_text() == "x\n"
    bad = subprocess.run(
        [*script, f"{url}/good/t.tar", f"sha256:{'0' * 64}", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and not (tmp_path / "bad").exists()
    assert bad.stderr == "casaspawner: t.tar does not match its SHA256 checksum.\n"
    # An MD5 is refused for a URL its .md5 could not have been trusted from, before anything is
    # downloaded.
    remote = "http://mirror.example.org/t.tar"
    plain = subprocess.run(
        [*script, remote, f"md5:{'0' * 32}", str(tmp_path / "bad")], capture_output=True, text=True
    )
    assert plain.returncode == 1 and not (tmp_path / "bad").exists()
    assert (
        plain.stderr
        == f"casaspawner: t.tar cannot be verified: {tarballs.unverifiable(remote, None)}.\n"
    )
    empty = subprocess.run(
        [*script, f"{url}/good/t.tar", "", str(tmp_path / "bad")], capture_output=True, text=True
    )
    assert empty.returncode == 1 and "is not a SHA-256 or MD5 checksum" in empty.stderr

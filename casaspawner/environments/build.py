"""Per-release CASA environments on one machine: built on demand, cached, shared by every session.

Layout under the cache directory (``~/.cache/casaspawner`` by default)::

    envs/<release tag>/            one finished environment (appears by atomic rename)
        venv/ or casa/             the wheels' virtualenv, or the unpacked monolithic tarball
        apps/<package>/AppRun      CASA GUIs extracted from their AppImages (no FUSE needed)
        kernel-site/               ipykernel for a tarball's Python, when the tarball lacks it
        casasiteconfig.py          measures at the shared read-only copy, auto-updates off
        casarc                     the same for the GUI apps (casacore's measures.directory)
        casaspawner-env.json       what was built, from what, with which Python
        jupyter/<variant>/kernels/ kernel specs, written when a session starts
    envs/<release tag>.lock        held while one hub process builds it
    measures/casadata/             the shared measures data (``casadata`` package) unless configured
    downloads/                     verified tarballs

Everything users can cause (no Python, unreachable tarball, failed pip) is an ``EnvironmentError_`` whose
``str`` is one sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from casaspawner import tarballs
from casaspawner.catalog.model import Catalog, Release
from casaspawner.environments.pythons import find_python
from casaspawner.errors import CasaspawnerError

#: Added to every wheels environment: the kernel, what casatasks imports without declaring it, the logger GUI,
#: and a protobuf the GUI tasks' generated code still loads (casaplotms/casaviewer ``*_pb2.py`` predate
#: protobuf 3.21: with a newer one ``import casaplotms`` fails with "Descriptors cannot be created directly").
EXTRA_PACKAGES: tuple[str, ...] = ("ipykernel", "six", "casalogger", "protobuf<3.21")
_META = "casaspawner-env.json"
#: Environments written by an older casaspawner are rebuilt (format 1: GUI tasks not import-checked; 2: no
#: casarc for the GUI apps).
_FORMAT = 3
#: Seconds a probe result (tarball reachable? which Python?) is reused.
PROBE_TTL = 600.0
#: ``casaspawner/desktop``: the desktop start script, the CASA launcher and the notices watcher.
DESKTOP_SOURCE = Path(__file__).resolve().parent.parent / "desktop"
#: JupyterLab settings every session starts with (no news feed; notifications themselves stay on): the file a
#: wheel installs in ``share/jupyter/lab/settings/overrides.d``, which local sessions (with an
#: ``app_settings_dir`` of their own) do not read.
LAB_OVERRIDES = DESKTOP_SOURCE.parent / "services" / "lab-overrides" / "casaspawner.json"


class EnvironmentBuildError(CasaspawnerError):
    """A CASA environment could not be built or cannot be built on this machine."""


class _NotProbed(Exception):
    """What a question needs was not probed yet, and the caller asked not to probe (``probe=False``)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/casaspawner`` (``~/.cache/casaspawner``), or ``/var/cache/casaspawner`` for root.

    Root's home is private, and sessions run as other users who must read the environments.
    """
    if os.geteuid() == 0:
        return Path("/var/cache/casaspawner")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "casaspawner"


@dataclass(frozen=True)
class CasaEnvironment:
    """A finished environment for one release."""

    release_id: str
    tag: str
    casa: str
    root: Path
    python: Path | None  # None: a CASA without Python 3 (4.x/5.x), desktop only
    casa_home: Path
    site_config: Path
    measures: Path
    kernel_site: Path | None = None
    #: Whether the build was seen to start here (casatools offline, or a CASA 4/5 ``bin/casa --nogui``).
    run_checked: bool = True

    @classmethod
    def load(cls, root: Path) -> CasaEnvironment:
        meta = json.loads((root / _META).read_text())
        return cls(
            release_id=meta["release"],
            tag=meta["tag"],
            casa=meta["casa"],
            root=root,
            python=root / meta["python"] if meta.get("python") else None,
            casa_home=root / meta["casa_home"],
            site_config=root / "casasiteconfig.py",
            measures=Path(meta["measures"]),
            kernel_site=root / meta["kernel_site"] if meta.get("kernel_site") else None,
            run_checked=bool(meta.get("run_checked", meta.get("python") is not None)),
        )

    @property
    def kernel_id(self) -> str:
        """The kernel's directory name (``casa-6.6.5-31``); the display name is per session."""
        return "casa-" + re.sub(r"[^a-z0-9.\-]", "-", self.tag.lower())

    @property
    def casarc(self) -> Path:
        """casacore's resource file pointing ``measures.directory`` at the shared measures (``CASARCFILES``):
        the GUI apps (plotms, the viewer) ignore casaconfig and otherwise find no Observatories table."""
        return self.root / "casarc"

    def kernel_environment(self) -> dict[str, str]:
        env = {
            "CASASITECONFIG": str(self.site_config),
            "CASARCFILES": str(self.casarc),
            "PYTHONNOUSERSITE": "1",
        }
        if self.kernel_site is not None:
            env["PYTHONPATH"] = str(self.kernel_site)
        return env

    def write_kernelspec(self, display_name: str) -> Path:
        """Write (idempotently) a kernel spec named ``display_name``; return the dir for ``JUPYTER_PATH``."""
        if self.python is None:
            raise EnvironmentBuildError(
                f"CASA {self.casa} has no Python 3 to run a notebook kernel; choose the desktop interface."
            )
        variant = hashlib.sha256(display_name.encode()).hexdigest()[:12]
        jupyter = self.root / "jupyter" / variant
        spec_dir = jupyter / "kernels" / self.kernel_id
        spec = {
            "argv": [str(self.python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": display_name,
            "language": "python",
            "env": self.kernel_environment(),
            "metadata": {"casaspawner": {"release": self.release_id, "casa": self.casa}},
        }
        text = json.dumps(spec, indent=1)
        target = spec_dir / "kernel.json"
        try:
            if not target.is_file() or target.read_text() != text:
                spec_dir.mkdir(parents=True, exist_ok=True)
                _atomic_write(target, text)
        except OSError as error:
            raise EnvironmentBuildError(
                f"The {display_name} kernel could not be registered: {error.strerror or error} ({spec_dir})."
            ) from None
        return jupyter

    def session_environment(self) -> dict[str, str]:
        """Variables the session (desktop start script, terminals) uses to find this CASA."""
        env = {
            "CASASPAWNER_CASA_HOME": str(self.casa_home),
            "CASASITECONFIG": str(self.site_config),
            "CASARCFILES": str(self.casarc),
            "CASA_MEASURES_PATH": str(self.measures),
        }
        if self.python is not None:
            env["CASASPAWNER_CASA_PYTHON"] = str(self.python)
        if self.kernel_site is not None:
            env["CASASPAWNER_CASA_PYTHONPATH"] = str(self.kernel_site)
        return env


@dataclass(frozen=True)
class _Method:
    kind: str  # "wheels" | "tarball"
    python: Path | None = None
    python_version: str | None = None


class EnvironmentManager:
    """Builds and finds CASA environments under one cache directory."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        *,
        measures_path: Path | None = None,
        tarball_mirror: str | None = None,
        pip_args: Sequence[str] = (),
        extra_packages: Sequence[str] = EXTRA_PACKAGES,
        search_path: str | None = None,
        probe_timeout: float = 5.0,
        shared: bool | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.configured_measures = Path(measures_path) if measures_path else None
        self.tarball_mirror = tarball_mirror.rstrip("/") + "/" if tarball_mirror else None
        self.pip_args = list(pip_args)
        self.extra_packages = list(extra_packages)
        self.search_path = search_path
        self.probe_timeout = probe_timeout
        # A hub running as root serves sessions of other users: everything must be usable by them.
        self.shared = os.geteuid() == 0 if shared is None else shared
        # What probing found (tarball HEAD requests, Python discovery), kept for ``PROBE_TTL`` seconds: forms,
        # option checks and starts ask again and again, and each probe may wait seconds for the network.
        self._reachable: dict[str, tuple[float, str | None]] = {}
        self._pythons: dict[tuple[tuple[str, ...], bool], tuple[float, tuple[Path, str] | None]] = {}

    # ------------------------------------------------------------------ lookups

    @property
    def envs_dir(self) -> Path:
        return self.cache_dir / "envs"

    def path_for(self, release: Release) -> Path:
        return self.envs_dir / release.tag

    def ready(self, release: Release) -> CasaEnvironment | None:
        """The finished environment for ``release``, or None if it was never built."""
        root = self.path_for(release)
        if not (root / _META).is_file():
            return None
        meta = json.loads((root / _META).read_text())
        if self.shared and not meta.get("shared"):
            return None  # built from a private interpreter: rebuilt for other users
        if meta.get("format", 1) < _FORMAT:
            return None  # built before its GUI tasks were checked: rebuilt
        return CasaEnvironment.load(root)

    def tarball_url(self, release: Release) -> str | None:
        if release.tarball is None:
            return None
        return (self.tarball_mirror + release.tarball.name) if self.tarball_mirror else release.tarball.url

    def _tarball_problem(self, url: str, probe: bool = True) -> str | None:
        """None if the tarball answers a HEAD request, else why not (cached for ten minutes)."""
        now = time.monotonic()
        cached = self._reachable.get(url)
        if cached and now - cached[0] < PROBE_TTL:
            return cached[1]
        if not probe:
            raise _NotProbed(url)
        problem: str | None = None
        try:
            request = urllib.request.Request(url, method="HEAD")  # noqa: S310 - catalog or operator URL
            with urllib.request.urlopen(request, timeout=self.probe_timeout) as response:  # noqa: S310
                if response.status >= 400:
                    problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError, ValueError) as error:
            problem = str(getattr(error, "reason", error)) or type(error).__name__
        self._reachable[url] = (now, problem)
        return problem

    def find_python(
        self, versions: Sequence[str], *, shared: bool | None = None, probe: bool = True
    ) -> tuple[Path, str] | None:
        """:func:`~casaspawner.environments.pythons.find_python` on this manager's search path, remembered."""
        key = (tuple(versions), self.shared if shared is None else shared)
        now = time.monotonic()
        cached = self._pythons.get(key)
        if cached and now - cached[0] < PROBE_TTL:
            return cached[1]
        if not probe:
            raise _NotProbed(str(versions))
        found = find_python(versions, self.search_path, shared=key[1])
        self._pythons[key] = (now, found)
        return found

    def _method(self, release: Release, probe: bool = True) -> _Method:
        """How ``release`` can be built here, or an ``EnvironmentBuildError`` saying why it cannot."""
        problems: list[str] = []
        url = self.tarball_url(release)
        if url is not None:
            assert release.tarball is not None
            if unverifiable := tarballs.unverifiable(url, release.tarball.sha256):
                problems.append(f"its tarball {url} cannot be verified ({unverifiable})")
            elif (problem := self._tarball_problem(url, probe)) is None:
                return _Method("tarball")
            else:
                problems.append(f"its tarball {url} is unreachable ({problem})")
        if release.wheels is not None:
            found = self.find_python(release.wheels.python, probe=probe)
            if found is not None:
                return _Method("wheels", found[0], found[1])
            wanted = f"its wheels need Python {' or '.join(release.wheels.python)}"
            private = (
                self.find_python(release.wheels.python, shared=False, probe=probe) if self.shared else None
            )
            if private is not None:
                problems.append(
                    f"{wanted}, and the only one here ({private[0]}) cannot be run by other users"
                )
            else:
                problems.append(f"{wanted}, which this machine does not have")
        if not problems:
            problems.append("ALMA published no tarball or wheels for it")
        raise EnvironmentBuildError(
            f"{release.label} cannot be installed on this hub: {'; '.join(problems)}."
        )

    def unavailable_reason(self, release: Release, *, probe: bool = True) -> str | None:
        """None if ``release`` is built or can be built here, else one sentence saying why not.

        ``probe=False``: only from what this manager found out already (a page must not wait on the network
        or on running Pythons); None also when that is not known yet.
        """
        if self.ready(release) is not None:
            return None
        try:
            self._method(release, probe)
        except EnvironmentBuildError as error:
            return str(error)
        except _NotProbed:
            return None
        return None

    def nearest_installable(self, release: Release, catalog: Catalog) -> Release | None:
        """The modular release closest in CASA version to ``release`` that this machine can run."""
        target = release.casa_version._key()
        options = [r for r in catalog.available(("modular",)) if self.unavailable_reason(r) is None]

        def distance(candidate: Release) -> tuple[int, ...]:
            key = candidate.casa_version._key()
            return (*(abs(a - b) for a, b in zip(key, target, strict=True)), -key[0], -key[1], -key[2])

        return min(options, key=distance, default=None)

    def newest_installable(self, catalog: Catalog) -> Release | None:
        """The newest modular release this machine can run (already built, or its wheels fit a Python here)."""
        options = sorted(catalog.available(("modular",)), key=lambda r: r.casa_version._key(), reverse=True)
        return next((r for r in options if self.unavailable_reason(r) is None), None)

    # ------------------------------------------------------------------ session files

    def session_files(self) -> Path:
        """The files sessions (and, on a hub running as root, the resolver run as the user) read, installed
        under the cache: sessions never read the checkout itself, which may be private (a clone in ``/root``).

        ``session/<hash>/desktop/`` is a copy of ``casaspawner/desktop``, ``session/<hash>/lab-settings/``
        holds ``overrides.json`` (a copy of :data:`LAB_OVERRIDES`) and ``session/<hash>/python/casaspawner/`` is
        the whole package (for ``python -m casaspawner``); ``<hash>`` covers the package's content, so a changed
        checkout gets a new copy.
        """
        package = DESKTOP_SOURCE.parent
        files = sorted(
            p
            for p in package.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        )
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"\0{path.relative_to(package)}\0{_executable(path)}\0".encode())
            digest.update(path.read_bytes())
        target = self.cache_dir / "session" / digest.hexdigest()[:12]
        if (target / "desktop" / "xstartup").is_file():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                for path in files:
                    relative = path.relative_to(package)
                    copies = [staging / "python" / "casaspawner" / relative]
                    if relative.parts[0] == DESKTOP_SOURCE.name:
                        copies.append(staging / relative)
                    if path == LAB_OVERRIDES:
                        copies.append(staging / "lab-settings" / "overrides.json")
                    for copy in copies:
                        copy.parent.mkdir(parents=True, exist_ok=True)
                        copy.write_bytes(path.read_bytes())
                        copy.chmod(0o755 if _executable(path) else 0o644)
                for dirpath, _dirs, _files in os.walk(staging):
                    os.chmod(dirpath, 0o755)  # noqa: S103 - every session reads it
                try:
                    os.rename(staging, target)
                except OSError:
                    if not (target / "desktop" / "xstartup").is_file():  # not another process's finished copy
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as error:
            raise EnvironmentBuildError(
                f"The session files could not be installed under {target.parent}: {error.strerror or error}."
            ) from None
        return target

    # ------------------------------------------------------------------ building

    async def ensure(self, release: Release) -> AsyncIterator[str]:
        """Build ``release``'s environment unless it exists, yielding progress sentences.

        Two hub processes (or spawns) asking at once: one builds, the other waits for the lock and then
        finds the finished environment. A cache that cannot be written is one sentence too.
        """
        async for message in _one_sentence(self._ensure(release), f"Preparing {release.label}"):
            yield message

    async def _ensure(self, release: Release) -> AsyncIterator[str]:
        if self.ready(release) is not None:
            return
        self.envs_dir.mkdir(parents=True, exist_ok=True)
        async with _locked(self.envs_dir / f"{release.tag}.lock") as waited:
            if waited:
                yield f"Waited for another session that was preparing {release.label}."
            if self.ready(release) is not None:
                return
            method = self._method(release)
            async for message in self.ensure_measures():
                yield message
            staging = Path(tempfile.mkdtemp(prefix=f".{release.tag}.", dir=self.envs_dir))
            try:
                if method.kind == "wheels":
                    steps = self._build_wheels(release, method, staging)
                else:
                    steps = self._build_tarball(release, staging)
                async for message in steps:
                    yield message
                os.chmod(staging, 0o755)  # noqa: S103 - sessions of every user read it
                _replace_dir(staging, self.path_for(release))
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        yield f"{release.label} is ready."

    async def _build_wheels(self, release: Release, method: _Method, staging: Path) -> AsyncIterator[str]:
        assert release.wheels is not None and method.python is not None
        yield f"Creating a Python {method.python_version} environment for {release.label}."
        await _run(
            [str(method.python), "-m", "venv", str(staging / "venv")], f"Creating the {release.label} venv"
        )
        python = staging / "venv" / "bin" / "python"
        packages = [*release.wheels.requirements(), *self.extra_packages]
        yield f"Installing {', '.join(release.wheels.requirements())} (a few minutes, once per release)."
        pip = [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            *self.pip_args,
        ]
        async for line in _stream([*pip, *packages], f"Installing {release.label}"):
            if line.startswith(("Collecting ", "Downloading ", "Installing collected")):
                yield line[:160]
        async for message in self._finish(release, staging, Path("venv/bin/python"), Path("venv")):
            yield message

    async def _build_tarball(self, release: Release, staging: Path) -> AsyncIterator[str]:
        assert release.tarball is not None
        url = self.tarball_url(release)
        assert url is not None
        downloads = self.cache_dir / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        archive = downloads / release.tarball.name
        if not archive.is_file():
            async for message in _download(url, archive, release.label):
                yield message
        yield f"Verifying {release.tarball.name}."
        try:
            await asyncio.to_thread(_verify, archive, url, release.tarball.sha256, self.probe_timeout)
        except EnvironmentBuildError:
            archive.unlink(missing_ok=True)
            raise
        yield f"Unpacking {release.tarball.name}."
        unpack = staging / "unpack"
        unpack.mkdir()
        await _run(["tar", "-xf", str(archive), "-C", str(unpack)], f"Unpacking {release.tarball.name}")
        tops = [p for p in unpack.iterdir() if p.is_dir()]
        if len(tops) != 1:
            raise EnvironmentBuildError(f"{release.tarball.name} does not unpack into one CASA directory.")
        tops[0].rename(staging / "casa")
        unpack.rmdir()
        python = next(
            (
                p
                for p in (Path("casa/bin/python3"), Path("casa/lib/py/bin/python3"))
                if (staging / p).exists()
            ),
            None,
        )
        async for message in self._finish(release, staging, python, Path("casa")):
            yield message

    async def _finish(
        self, release: Release, staging: Path, python: Path | None, casa_home: Path
    ) -> AsyncIterator[str]:
        """Shared tail: kernel support, GUIs, site config, an offline start check, metadata."""
        measures = self.measures_dir()
        (staging / "casasiteconfig.py").write_text(site_config_text(measures))
        (staging / "casarc").write_text(f"measures.directory: {measures}\n")
        kernel_site: Path | None = None
        if python is not None:
            interpreter = str(staging / python)
            if not await _succeeds([interpreter, "-c", "import ipykernel"]):
                yield f"Adding a Jupyter kernel to {release.label}."
                kernel_site = Path("kernel-site")
                await _run(
                    [interpreter, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
                     *self.pip_args, "--target", str(staging / kernel_site), "ipykernel"],
                    f"Adding ipykernel to {release.label}",
                )  # fmt: skip
        for appimage in sorted(staging.glob(f"{casa_home}/**/site-packages/*/__bin__/*.AppImage")):
            name = appimage.parent.parent.name
            yield f"Unpacking the {name} GUI (no FUSE needed)."
            await _extract_appimage(appimage, staging / "apps" / name)
        run_checked = True
        if python is not None:
            yield f"Checking that {release.label} starts offline with the shared measures data."
            version = await _casa_version(staging / python, staging / "casasiteconfig.py", staging / kernel_site
                                          if kernel_site else None)  # fmt: skip
            if version != release.casa:
                raise EnvironmentBuildError(
                    f"The environment built for {release.label} reports CASA {version}, not {release.casa}."
                )
        else:
            launcher = next(
                (p for p in (Path("bin/casa"), Path("casapy")) if (staging / casa_home / p).is_file()), None
            )
            if launcher is None:
                run_checked = False
                yield f"{release.label} has no Python 3 and no bin/casa to try: desktop only, not run-checked."
            else:
                yield f"Checking that {release.label} starts (desktop only: it has no Python 3)."
                await _casa_starts(staging / casa_home / launcher, release.label)
        meta = {
            "release": release.id,
            "tag": release.tag,
            "casa": release.casa,
            "python": str(python) if python else None,
            "casa_home": str(casa_home),
            "measures": str(measures),
            "kernel_site": str(kernel_site) if kernel_site else None,
            "shared": self.shared,
            "format": _FORMAT,
            "run_checked": run_checked,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / _META).write_text(json.dumps(meta, indent=1))

    # ------------------------------------------------------------------ the UI environment

    async def ensure_ui(self, requirements: Sequence[str]) -> AsyncIterator[str]:
        """A venv with the Jupyter server side (``requirements``) every user can run; see :meth:`ui_prefix`."""
        async for message in _one_sentence(
            self._ensure_ui(requirements), "Preparing the sessions' Jupyter environment"
        ):
            yield message

    async def _ensure_ui(self, requirements: Sequence[str]) -> AsyncIterator[str]:
        target = self.ui_prefix(requirements)
        if (target / "bin" / "jupyterhub-singleuser").exists():
            return
        base = target.parent
        base.mkdir(parents=True, exist_ok=True)
        async with _locked(base / f"{target.name}.lock"):
            if (target / "bin" / "jupyterhub-singleuser").exists():
                return
            found = self.find_python(["3.13", "3.12", "3.11", "3.10"])
            if found is None:
                raise EnvironmentBuildError(
                    "No Python 3.10 or newer that every user can run was found for the sessions' Jupyter server."
                )
            yield f"Preparing the sessions' Jupyter environment (Python {found[1]}, once per hub)."
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=base))
            try:
                await _run([str(found[0]), "-m", "venv", str(staging)], "Creating the Jupyter environment")
                # Scripts' shebangs name the final path: install at the staging path, then fix them on rename.
                await _run(
                    [str(staging / "bin" / "python"), "-m", "pip", "install", "--no-input",
                     "--disable-pip-version-check", *self.pip_args, *requirements],
                    "Installing the Jupyter environment",
                )  # fmt: skip
                for script in (staging / "bin").iterdir():
                    if script.is_file() and not script.is_symlink():
                        data = script.read_bytes()
                        if data.startswith(b"#!" + str(staging).encode()):
                            script.write_bytes(data.replace(str(staging).encode(), str(target).encode(), 1))
                os.chmod(staging, 0o755)  # noqa: S103 - every session runs it
                _replace_dir(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def ui_prefix(self, requirements: Sequence[str]) -> Path:
        key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
        return self.cache_dir / "ui" / key

    # ------------------------------------------------------------------ measures

    def measures_dir(self) -> Path:
        """The shared measures tree sessions read (``casadata``'s ``__data__`` unless configured)."""
        if self.configured_measures is not None:
            return self.configured_measures
        return self.cache_dir / "measures" / "casadata" / "casadata" / "__data__"

    async def ensure_measures(self) -> AsyncIterator[str]:
        """Install the ``casadata`` package once, read-only, unless an operator configured a tree."""
        target = self.measures_dir()
        if self.configured_measures is not None:
            if not (target / "geodetic").is_dir():
                raise EnvironmentBuildError(
                    f"The configured measures path {target} holds no CASA measures data."
                )
            return
        if target.is_dir():
            return
        base = self.cache_dir / "measures"
        base.mkdir(parents=True, exist_ok=True)
        async with _locked(base / "casadata.lock"):
            if target.is_dir():
                return
            yield "Fetching the CASA measures data (casadata, about 900 MB, once per hub)."
            staging = Path(tempfile.mkdtemp(prefix=".casadata.", dir=base))
            try:
                await _run(
                    [sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
                     "--no-deps", *self.pip_args, "--target", str(staging), "casadata"],
                    "Installing casadata",
                )  # fmt: skip
                _make_read_only(staging)
                os.chmod(staging, 0o555)  # noqa: S103 - shared read-only data
                os.rename(staging, base / "casadata")
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)


def site_config_text(measures: Path) -> str:
    """A ``casasiteconfig.py``: measures from the shared read-only tree, never updated from a session."""
    return (
        "# Written by casaspawner: CASA reads measures from one shared, read-only tree.\n"
        f"measurespath = {str(measures)!r}\n"
        f"datapath = [{str(measures)!r}]\n"
        "measures_auto_update = False\n"
        "data_auto_update = False\n"
    )


# ---------------------------------------------------------------------- helpers


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` by rename; a stale ``target`` is moved aside first, then removed."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rename(target, old / "env")
        shutil.rmtree(old, ignore_errors=True)
    os.rename(new, target)


async def _one_sentence(steps: AsyncIterator[str], what: str) -> AsyncIterator[str]:
    """``steps``, with a file-system error (an unwritable cache, a full disk) as one sentence."""
    try:
        async for message in steps:
            yield message
    except OSError as error:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        raise EnvironmentBuildError(f"{what} failed: {error.strerror or error}{where}.") from None


def _executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o100)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _readable_by_all(root: Path) -> None:
    """``chmod -R a+rX``: AppImages unpack with private directories, but every session user runs them."""
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)  # noqa: S103 - every session runs them
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _make_read_only(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o444)
        os.chmod(dirpath, 0o555)  # noqa: S103 - shared read-only data


@contextlib.asynccontextmanager
async def _locked(path: Path) -> AsyncIterator[bool]:
    """An exclusive ``flock`` on ``path``; yields whether it had to wait for another holder."""
    handle = open(path, "a")  # noqa: SIM115 - held for the duration of the context
    waited = False
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = True
                await asyncio.sleep(0.5)
        yield waited
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


async def _stream(
    cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> AsyncGenerator[str, None]:
    """Run ``cmd``, yielding its output lines; a failure raises one sentence ending in the last line."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd
    )
    assert proc.stdout is not None
    tail: list[str] = []
    try:
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line and not line.startswith("WARNING: Location"):
                tail = [*tail[-19:], line]
                yield line
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        errors = [t.removeprefix("ERROR: ") for t in tail if t.startswith("ERROR")] or tail or ["no output"]
        raise EnvironmentBuildError(f"{what} failed: {errors[-1][:300].rstrip('.')}.")


async def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    async for _line in _stream(cmd, what, env, cwd):
        pass


async def _succeeds(cmd: list[str]) -> bool:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait() == 0


#: The offline start check of a Python-3 CASA: casatools' version, and the GUI task packages it has import.
_START_CHECK_PY3 = """
import importlib.util, casatools
print('CASA-VERSION', casatools.version_string())
for name in ('casaplotms', 'casaviewer'):
    if importlib.util.find_spec(name) is not None:
        try:
            importlib.import_module(name)
        except Exception as error:
            raise SystemExit('%s cannot be imported (%s: %s)' % (name, type(error).__name__, str(error).splitlines()[0]))
"""


async def _casa_version(python: Path, site_config: Path, kernel_site: Path | None) -> str:
    """Start casatools offline with the site config (a throwaway HOME, proxies pointing nowhere)."""
    with tempfile.TemporaryDirectory(prefix="casaspawner-check-") as home:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "CASASITECONFIG": str(site_config),
            "PYTHONNOUSERSITE": "1",
            **{
                key: "http://127.0.0.1:9"
                for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
            },
        }
        if kernel_site is not None:
            env["PYTHONPATH"] = str(kernel_site)
        code = _START_CHECK_PY3
        check = _stream([str(python), "-c", code], "Starting casatools offline", env, Path(home))
        lines = [line async for line in check]
    version = next((line.split()[-1] for line in lines if line.startswith("CASA-VERSION ")), "unknown")
    return version


#: What ``_casa_starts`` runs inside CASA 4/5 (Python 2 and 3 alike), then leaves without a prompt.
_START_CHECK = "import os, sys\nsys.stdout.write('CASA-STARTED\\n')\nsys.stdout.flush()\nos._exit(0)\n"


async def _casa_starts(launcher: Path, label: str, timeout: float = 600) -> None:
    """Run a Python-2 CASA's ``bin/casa --nogui --nologger -c <script>`` offline (a throwaway HOME)."""
    with tempfile.TemporaryDirectory(prefix="casaspawner-check-") as home:
        script = Path(home) / "casaspawner_check.py"
        script.write_text(_START_CHECK)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            **{
                key: "http://127.0.0.1:9"
                for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
            },
        }
        cmd = [str(launcher), "--nogui", "--nologger", "--log2term", "-c", str(script)]

        async def lines() -> list[str]:
            # Closed on a timeout too, which kills the hung CASA (``_stream``'s ``finally``).
            async with contextlib.aclosing(_stream(cmd, f"Starting {label}", env, Path(home))) as stream:
                return [line async for line in stream]

        try:
            output = await asyncio.wait_for(lines(), timeout)
        except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11 on, not on 3.10
            raise EnvironmentBuildError(f"{label} did not start within {int(timeout)} seconds.") from None
    if "CASA-STARTED" not in output:
        raise EnvironmentBuildError(
            f"{label} started but did not run a script: {(output or ['no output'])[-1][:300]}."
        )


async def _download(url: str, target: Path, label: str) -> AsyncIterator[str]:
    """Download ``url`` to ``target`` (via a partial file), yielding progress about every 10%."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def fetch() -> None:
        partial = target.with_name(target.name + ".partial")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:  # noqa: S310
                total = int(response.headers.get("Content-Length") or 0)
                done, next_report = 0, 0.0
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    if total and done / total >= next_report:
                        message = f"Downloading {label}: {done >> 20} of {total >> 20} MB."
                        loop.call_soon_threadsafe(queue.put_nowait, message)
                        next_report += 0.1
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = asyncio.create_task(asyncio.to_thread(fetch))
    while (message := await queue.get()) is not None:
        yield message
    try:
        await task
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise EnvironmentBuildError(f"Downloading {url} failed: {reason}.") from None


def _verify(archive: Path, url: str, sha256: str | None, timeout: float) -> None:
    """Check the catalog's SHA-256, else the ``.md5`` published next to the tarball (``casaspawner.tarballs``)."""
    try:
        tarballs.verify_file(archive, *tarballs.expected_checksum(url, sha256, timeout))
    except tarballs.ChecksumError as error:
        raise EnvironmentBuildError(str(error)) from None


async def _extract_appimage(appimage: Path, target: Path) -> None:
    """``--appimage-extract`` into ``target`` and point the AppImage's path at the extracted ``AppRun``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".extract.", dir=target.parent))
    try:
        os.chmod(appimage, 0o755)  # noqa: S103 - an executable every user runs
        await _run([str(appimage), "--appimage-extract"], f"Extracting {appimage.name}", cwd=work)
        (work / "squashfs-root").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _readable_by_all(target)
    appimage.unlink()
    appimage.symlink_to(os.path.relpath(target / "AppRun", appimage.parent))

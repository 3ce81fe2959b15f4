"""Per-release CASA environments on one machine, built on demand and cached.

Every session of a release shares its environment. The layout under the cache directory,
``~/.cache/casaspawner`` by default::

    envs/<release tag>/            one finished environment (appears by atomic rename)
        venv/ or casa/             the wheels' virtualenv, or the unpacked monolithic tarball
        apps/<package>/AppRun      CASA GUIs extracted from their AppImages (no FUSE needed)
        kernel-site/               ipykernel for a tarball's Python, when the tarball lacks it
        casasiteconfig.py          measures at the shared read-only copy, auto-updates off
        casarc                     the same for the GUI apps (casacore's measures.directory)
        casaspawner-env.json       what was built, from what, with which Python
        jupyter/<variant>/kernels/ kernel specs, written when a session starts
    envs/<release tag>.lock        held while one hub process builds it
    measures/casadata/             the shared measures data (``casadata``) unless configured
    downloads/                     verified tarballs

Everything users can cause is an ``EnvironmentBuildError`` whose ``str`` is one sentence: no
Python, an unreachable tarball, a failed pip.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from casaspawner import runtime, tarballs
from casaspawner.catalog.model import Catalog, Release
from casaspawner.local.environments.model import FORMAT, META, CasaEnvironment
from casaspawner.local.environments.progress import with_heartbeat
from casaspawner.local.environments.pythons import find_python
from casaspawner.local.environments.session_files import install_session_files
from casaspawner.local.environments.steps import (
    EnvironmentBuildError,
    atomic_write,
    casa_starts,
    casa_version,
    download,
    extract_appimage,
    locked,
    make_read_only,
    one_sentence,
    pip_install,
    replace_dir,
    run,
    succeeds,
    verify,
)
from casaspawner.runtime import EXTRA_PACKAGES, site_config_text

#: Seconds a probe result (tarball reachable? which Python?) is reused.
PROBE_TTL = 600.0


def session_site_config_text(measures: Path | str) -> str:
    """A local environment's ``casasiteconfig.py``: the shared measures, and the session's log.

    CASA logs to ``$CASASPAWNER_CASA_LOGFILE`` when a session sets it (one file in the home), not
    to a new ``casa-<time>.log`` wherever a kernel or terminal starts.
    """
    return site_config_text(measures) + (
        "# The session's one CASA log file, when it names one.\n"
        "import os as _os\n\n"
        "if _os.environ.get('CASASPAWNER_CASA_LOGFILE'):\n"
        "    logfile = _os.environ['CASASPAWNER_CASA_LOGFILE']\n"
    )


class _NotProbed(Exception):
    """A needed answer was not probed yet, and the caller forbade probing."""


@dataclass(frozen=True)
class _Method:
    #: "wheels" or "tarball".
    kind: str
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
        self.cache_dir = Path(cache_dir) if cache_dir else runtime.cache_dir()
        self.configured_measures = Path(measures_path) if measures_path else None
        self.tarball_mirror = tarball_mirror.rstrip("/") + "/" if tarball_mirror else None
        self.pip_args = list(pip_args)
        self.extra_packages = list(extra_packages)
        self.search_path = search_path
        self.probe_timeout = probe_timeout
        # A hub running as root serves sessions of other users: everything must be usable by them.
        self.shared = os.geteuid() == 0 if shared is None else shared
        # What probing found, from tarball HEAD requests and Python discovery, is kept for
        # ``PROBE_TTL`` seconds. Forms, option checks and starts ask again and again, and each
        # probe may wait seconds for the network.
        self._reachable: dict[str, tuple[float, str | None]] = {}
        self._pythons: dict[
            tuple[tuple[str, ...], bool], tuple[float, tuple[Path, str] | None]
        ] = {}

    # Lookups
    @property
    def envs_dir(self) -> Path:
        return self.cache_dir / "envs"

    def path_for(self, release: Release) -> Path:
        return self.envs_dir / release.tag

    def ready(self, release: Release) -> CasaEnvironment | None:
        """The finished environment for ``release``, or None if it was never built."""
        root = self.path_for(release)
        if not (root / META).is_file():
            return None
        meta = json.loads((root / META).read_text())
        # Built from a private interpreter: rebuilt for other users.
        if self.shared and not meta.get("shared"):
            return None
        # Built before its GUI tasks were checked: rebuilt.
        if meta.get("format", 1) < FORMAT:
            return None
        env = CasaEnvironment.load(root)
        # An older casaspawner wrote another site config; the current one costs no rebuild.
        text = session_site_config_text(env.measures)
        try:
            if env.site_config.read_text() != text:
                atomic_write(env.site_config, text)
        except OSError:
            # A cache this process may not write keeps the site config it has.
            pass
        return env

    def tarball_url(self, release: Release) -> str | None:
        if release.tarball is None:
            return None
        return (
            (self.tarball_mirror + release.tarball.name)
            if self.tarball_mirror
            else release.tarball.url
        )

    def _tarball_problem(self, url: str, probe: bool = True) -> str | None:
        """Say why the tarball at ``url`` does not answer a HEAD request.

        None if it does. The answer is cached for ``PROBE_TTL`` seconds, ten minutes.
        """
        now = time.monotonic()
        cached = self._reachable.get(url)
        if cached and now - cached[0] < PROBE_TTL:
            return cached[1]
        if not probe:
            raise _NotProbed(url)
        problem: str | None = None
        try:
            # The URL is the catalog's or the operator's.
            request = urllib.request.Request(url, method="HEAD")  # noqa: S310
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=self.probe_timeout
            ) as response:
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
        """Find a Python on this manager's search path, remembering the answer.

        See :func:`~casaspawner.local.environments.pythons.find_python`.
        """
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
        """Choose how ``release`` can be built here.

        Raises an ``EnvironmentBuildError`` saying why it cannot.
        """
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
                self.find_python(release.wheels.python, shared=False, probe=probe)
                if self.shared
                else None
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
        """Say in one sentence why ``release`` cannot be built here.

        None if it is built or can be built. ``probe=False`` answers only from what this manager
        found out already: a page must not wait on the network or on running Pythons. None also
        when that is not known yet.
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
        """The installable modular release closest in CASA version to ``release``."""
        target = release.casa_version._key()
        options = [
            r for r in catalog.available(("modular",)) if self.unavailable_reason(r) is None
        ]

        def distance(candidate: Release) -> tuple[int, ...]:
            key = candidate.casa_version._key()
            return (
                *(abs(a - b) for a, b in zip(key, target, strict=True)),
                -key[0],
                -key[1],
                -key[2],
            )

        return min(options, key=distance, default=None)

    def newest_installable(self, catalog: Catalog) -> Release | None:
        """The newest modular release this machine can run.

        It is already built, or its wheels fit a Python here.
        """
        options = sorted(
            catalog.available(("modular",)), key=lambda r: r.casa_version._key(), reverse=True
        )
        return next((r for r in options if self.unavailable_reason(r) is None), None)

    # Session files
    def session_files(self) -> Path:
        """Install the files sessions read under the cache, and return their directory.

        See :func:`install_session_files`.
        """
        return install_session_files(self.cache_dir)

    # Building
    async def ensure(self, release: Release) -> AsyncIterator[str]:
        """Build ``release``'s environment unless it exists, yielding progress sentences.

        When two hub processes or spawns ask at once, one builds. The other waits for the lock and
        then finds the finished environment. A cache that cannot be written is one sentence too.
        Downloads report their progress (:class:`~.progress.Progress`), and a step quiet for a
        few seconds is said to be still running.
        """
        steps = one_sentence(self._ensure(release), f"Preparing {release.label}")
        async for message in with_heartbeat(steps):
            yield message

    async def _ensure(self, release: Release) -> AsyncIterator[str]:
        if self.ready(release) is not None:
            return
        self.envs_dir.mkdir(parents=True, exist_ok=True)
        async with locked(self.envs_dir / f"{release.tag}.lock") as waited:
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
                # Sessions of every user read it.
                os.chmod(staging, 0o755)  # noqa: S103
                replace_dir(staging, self.path_for(release))
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        yield f"{release.label} is ready."

    async def _build_wheels(
        self, release: Release, method: _Method, staging: Path
    ) -> AsyncIterator[str]:
        assert release.wheels is not None and method.python is not None
        yield f"Creating a Python {method.python_version} environment for {release.label}."
        await run(
            [str(method.python), "-m", "venv", str(staging / "venv")],
            f"Creating the {release.label} venv",
        )
        python = staging / "venv" / "bin" / "python"
        packages = [*release.wheels.requirements(), *self.extra_packages]
        # A recent pip reports each download's progress; an older one still installs.
        yield f"Updating pip in the {release.label} environment."
        pip = [str(python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
        await succeeds([*pip, "--quiet", *self.pip_args, "--upgrade", "pip"])
        yield (
            f"Installing {', '.join(release.wheels.requirements())} "
            "(a few minutes, once per release)."
        )
        async for line in pip_install(
            python, [*self.pip_args, *packages], f"Installing {release.label}"
        ):
            yield line
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
            async for message in download(url, archive, release.label):
                yield message
        yield f"Verifying {release.tarball.name}."
        try:
            await asyncio.to_thread(
                verify, archive, url, release.tarball.sha256, self.probe_timeout
            )
        except EnvironmentBuildError:
            archive.unlink(missing_ok=True)
            raise
        yield f"Unpacking {release.tarball.name}."
        unpack = staging / "unpack"
        unpack.mkdir()
        await run(
            ["tar", "-xf", str(archive), "-C", str(unpack)], f"Unpacking {release.tarball.name}"
        )
        tops = [p for p in unpack.iterdir() if p.is_dir()]
        if len(tops) != 1:
            raise EnvironmentBuildError(
                f"{release.tarball.name} does not unpack into one CASA directory."
            )
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
        """Finish a build the same way for wheels and tarballs.

        Adds kernel support, GUIs, the site config, an offline start check and the metadata.
        """
        measures = self.measures_dir()
        (staging / "casasiteconfig.py").write_text(session_site_config_text(measures))
        (staging / "casarc").write_text(f"measures.directory: {measures}\n")
        kernel_site: Path | None = None
        if python is not None:
            interpreter = str(staging / python)
            if not await succeeds([interpreter, "-c", "import ipykernel"]):
                yield f"Adding a Jupyter kernel to {release.label}."
                kernel_site = Path("kernel-site")
                await run(
                    [
                        interpreter,
                        "-m",
                        "pip",
                        "install",
                        "--no-input",
                        "--disable-pip-version-check",
                        *self.pip_args,
                        "--target",
                        str(staging / kernel_site),
                        "ipykernel",
                    ],
                    f"Adding ipykernel to {release.label}",
                )
        for appimage in sorted(staging.glob(f"{casa_home}/**/site-packages/*/__bin__/*.AppImage")):
            name = appimage.parent.parent.name
            yield f"Unpacking the {name} GUI (no FUSE needed)."
            await extract_appimage(appimage, staging / "apps" / name)
        run_checked = True
        if python is not None:
            yield f"Checking that {release.label} starts offline with the shared measures data."
            version = await casa_version(
                staging / python,
                staging / "casasiteconfig.py",
                staging / kernel_site if kernel_site else None,
            )
            if version != release.casa:
                raise EnvironmentBuildError(
                    f"The environment built for {release.label} reports CASA {version}, "
                    f"not {release.casa}."
                )
        else:
            launcher = next(
                (
                    p
                    for p in (Path("bin/casa"), Path("casapy"))
                    if (staging / casa_home / p).is_file()
                ),
                None,
            )
            if launcher is None:
                run_checked = False
                yield (
                    f"{release.label} has no Python 3 and no bin/casa to try: "
                    "desktop only, not run-checked."
                )
            else:
                yield f"Checking that {release.label} starts (desktop only: it has no Python 3)."
                await casa_starts(staging / casa_home / launcher, release.label)
        meta = {
            "release": release.id,
            "tag": release.tag,
            "casa": release.casa,
            "python": str(python) if python else None,
            "casa_home": str(casa_home),
            "measures": str(measures),
            "kernel_site": str(kernel_site) if kernel_site else None,
            "shared": self.shared,
            "format": FORMAT,
            "run_checked": run_checked,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / META).write_text(json.dumps(meta, indent=1))

    # The UI environment
    async def ensure_ui(self, requirements: Sequence[str]) -> AsyncIterator[str]:
        """Build a venv with the Jupyter server side that every user can run.

        ``requirements`` are its packages. See :meth:`ui_prefix`.
        """
        steps = one_sentence(
            self._ensure_ui(requirements), "Preparing the sessions' Jupyter environment"
        )
        async for message in with_heartbeat(steps):
            yield message

    async def _ensure_ui(self, requirements: Sequence[str]) -> AsyncIterator[str]:
        target = self.ui_prefix(requirements)
        if (target / "bin" / "jupyterhub-singleuser").exists():
            return
        base = target.parent
        base.mkdir(parents=True, exist_ok=True)
        async with locked(base / f"{target.name}.lock"):
            if (target / "bin" / "jupyterhub-singleuser").exists():
                return
            found = self.find_python(["3.13", "3.12", "3.11", "3.10"])
            if found is None:
                raise EnvironmentBuildError(
                    "No Python 3.10 or newer that every user can run "
                    "was found for the sessions' Jupyter server."
                )
            yield f"Preparing the sessions' Jupyter environment (Python {found[1]}, once per hub)."
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=base))
            try:
                await run(
                    [str(found[0]), "-m", "venv", str(staging)], "Creating the Jupyter environment"
                )
                # Scripts' shebangs name the final path. Install at the staging path, then fix the
                # shebangs on rename.
                async for line in pip_install(
                    staging / "bin" / "python",
                    [*self.pip_args, *requirements],
                    "Installing the Jupyter environment",
                ):
                    yield line
                for script in (staging / "bin").iterdir():
                    if script.is_file() and not script.is_symlink():
                        data = script.read_bytes()
                        if data.startswith(b"#!" + str(staging).encode()):
                            script.write_bytes(
                                data.replace(str(staging).encode(), str(target).encode(), 1)
                            )
                # Every session runs it.
                os.chmod(staging, 0o755)  # noqa: S103
                replace_dir(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def ui_prefix(self, requirements: Sequence[str]) -> Path:
        key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
        return self.cache_dir / "ui" / key

    # Measures
    def measures_dir(self) -> Path:
        """The shared measures tree sessions read.

        That is ``casadata``'s ``__data__``, unless an operator configured a tree.
        """
        if self.configured_measures is not None:
            return self.configured_measures
        return self.cache_dir / "measures" / "casadata" / "casadata" / "__data__"

    async def ensure_measures(self) -> AsyncIterator[str]:
        """Install the ``casadata`` package once, read-only.

        Nothing is installed when an operator configured a measures tree.
        """
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
        async with locked(base / "casadata.lock"):
            if target.is_dir():
                return
            yield "Fetching the CASA measures data (casadata, about 900 MB, once per hub)."
            staging = Path(tempfile.mkdtemp(prefix=".casadata.", dir=base))
            try:
                async for line in pip_install(
                    sys.executable,
                    ["--no-deps", *self.pip_args, "--target", str(staging), "casadata"],
                    "Installing casadata",
                ):
                    yield line
                make_read_only(staging)
                # Shared read-only data.
                os.chmod(staging, 0o555)  # noqa: S103
                os.rename(staging, base / "casadata")
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

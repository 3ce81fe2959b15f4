"""A finished CASA environment for one release, as sessions use it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from casaspawner import runtime
from casaspawner.local.environments.steps import EnvironmentBuildError, atomic_write

#: The metadata file of a finished environment.
META = "casaspawner-env.json"
#: The environment format. Environments written by an older casaspawner are rebuilt.
#:
#: Format 1 did not import-check GUI tasks. Format 2 had no casarc for the GUI apps.
FORMAT = 3
#: The desktop's apps (``casa-app`` tools) and the programs that make them, in menu order.
#:
#: A GUI is there when its AppImage was extracted under ``apps/`` (wheels, or a CASA 6 tarball's
#: site-packages) or the CASA tree has it in ``bin/`` (CASA 4 and 5). casabrowser exists only in
#: the monolithic trees.
DESKTOP_GUIS = (
    ("plotms", "casaplotms"),
    ("viewer", "casaviewer"),
    ("browser", "casabrowser"),
    ("logger", "casalogger"),
)


@dataclass(frozen=True)
class CasaEnvironment:
    """A finished environment for one release."""

    release_id: str
    tag: str
    casa: str
    root: Path
    #: None for CASA 4.x and 5.x, which have no Python 3 and are desktop only.
    python: Path | None
    casa_home: Path
    site_config: Path
    measures: Path
    kernel_site: Path | None = None
    #: Whether the build was seen to start here.
    #:
    #: That is casatools offline, or a CASA 4/5 ``bin/casa --nogui``.
    run_checked: bool = True

    @classmethod
    def load(cls, root: Path) -> CasaEnvironment:
        meta = json.loads((root / META).read_text())
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
        """The kernel's directory name, such as ``casa-6.6.5-31``.

        The display name is per session.
        """
        return runtime.kernel_id(self.tag)

    @property
    def casarc(self) -> Path:
        """casacore's resource file, pointing ``measures.directory`` at the shared measures.

        Sessions get it as ``CASARCFILES``. The GUI apps, plotms and the viewer, ignore casaconfig
        and otherwise find no Observatories table.
        """
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
        """Write a kernel spec named ``display_name``, idempotently.

        Returns the directory for ``JUPYTER_PATH``.
        """
        if self.python is None:
            raise EnvironmentBuildError(
                f"CASA {self.casa} has no Python 3 to run a notebook kernel; "
                "choose the desktop interface."
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
                atomic_write(target, text)
        except OSError as error:
            raise EnvironmentBuildError(
                f"The {display_name} kernel could not be registered: "
                f"{error.strerror or error} ({spec_dir})."
            ) from None
        return jupyter

    def content_digest(self) -> str:
        """The sha256 of the environment's package list: what a session's record names.

        The list is the release, the CASA build, the CASA directory's name and every installed
        distribution (``name-version.dist-info``) under the environment, sorted. Two
        environments with the same packages have the same digest, wherever they are.
        """
        lines = [
            f"release {self.release_id}",
            f"casa {self.casa}",
            f"casa_home {self.casa_home.name}",
        ]
        for site in sorted(self.root.glob("**/site-packages")):
            if not site.is_dir() or site.is_symlink():
                continue
            lines += sorted(
                f"package {entry.name}"
                for entry in site.iterdir()
                if entry.name.endswith((".dist-info", ".egg-info"))
            )
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def desktop_apps(self) -> list[str]:
        """The desktop's ``casa-app`` tools this environment can run, in menu order.

        The CASA terminal needs a Python 3 or a CASA tree's ``bin/casa`` (or ``casapy``).
        """
        apps = []
        if self.python is not None or any(
            (self.casa_home / name).is_file() for name in ("bin/casa", "casapy")
        ):
            apps.append("terminal")
        for app, program in DESKTOP_GUIS:
            if (self.root / "apps" / program).is_dir() or (
                self.casa_home / "bin" / program
            ).is_file():
                apps.append(app)
        return apps

    def session_environment(self) -> dict[str, str]:
        """Variables the session uses to find this CASA.

        The desktop start script and terminals use them.
        """
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

"""Prepare CASA on Binder: run once by postBuild, as the notebook user.

repo2docker has installed ``requirements.txt`` into the Python running this script. This script
then does what a casaspawner CASA environment or image has, in the same ways:

1. finds the catalog release of the installed casatools;
2. points CASA at the ``casadata`` measures with auto-updates off (``casasiteconfig.py``, and a
   ``casarc`` for the GUIs), so CASA starts offline;
3. extracts the GUIs' AppImages (plotms, the viewer): Binder has no FUSE;
4. checks that casatools starts offline and that the GUI tasks import;
5. registers the CASA kernel and makes it JupyterLab's default;
6. simulates the demo MeasurementSet and writes it into an ALMA product tree in the home
   directory, as ``make demo`` does, and resolves that dataset;
7. writes ``~/.casaspawner/binder-env.sh``, which ``start`` reads: CASA's settings and what the
   CASA desktop needs.

Every step can run again: what is done already is kept.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import casaspawner
from casaspawner import runtime
from casaspawner.catalog import Catalog, load_catalog
from casaspawner.catalog.model import Release
from casaspawner.datasets.resolve import resolve_target
from casaspawner.datasets.synth import SIMULATE_MS
from casaspawner.local.demo import DEMO_PROJECT, demo_spec, write_demo_dataset
from casaspawner.local.environments.steps import casa_version, extract_appimage

#: Where the CASA settings and the start script's variables go.
STATE = Path.home() / ".casaspawner"


def say(message: str) -> None:
    print(f"[casaspawner binder] {message}", flush=True)


def installed_release(catalog: Catalog) -> Release:
    """The catalog's modular release whose casatools is installed here."""
    version = importlib.metadata.version("casatools")
    for release in catalog.available(("modular",)):
        if release.wheels is not None and release.wheels.casatools == version:
            return release
    raise SystemExit(f"casatools {version} is no modular release of casaspawner's catalog.")


def measures_dir() -> Path:
    """The measures tree of the ``casadata`` package."""
    spec = importlib.util.find_spec("casadata")
    if spec is None or spec.origin is None:
        raise SystemExit("The casadata package is not installed (binder/requirements.txt).")
    data = Path(spec.origin).parent / "__data__"
    if not (data / "geodetic").is_dir():
        raise SystemExit(f"{data} holds no CASA measures data.")
    return data


def extract_guis() -> None:
    """Extract every AppImage of the installed CASA GUIs, beside it.

    The AppImage's path becomes a link to the extracted ``AppRun``, as in the images.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    for appimage in sorted(site.glob("*/__bin__/*.AppImage")):
        if appimage.is_symlink():
            continue
        say(f"Extracting {appimage.name} (no FUSE on Binder).")
        target = appimage.with_name(appimage.stem + ".AppDir")
        shutil.rmtree(target, ignore_errors=True)
        asyncio.run(extract_appimage(appimage, target))


def write_kernel(release: Release, env: dict[str, str]) -> None:
    """Register the CASA kernel for this user and make it JupyterLab's default."""
    from jupyter_core.paths import jupyter_config_dir, jupyter_data_dir

    kernel_id = runtime.kernel_id(release.tag)
    spec_dir = Path(jupyter_data_dir()) / "kernels" / kernel_id
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": release.kernel_name,
        "language": "python",
        "env": env,
        "metadata": {"casaspawner": {"release": release.id, "casa": release.casa}},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    config = Path(jupyter_config_dir()) / "jupyter_server_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    settings.setdefault("MappingKernelManager", {})["default_kernel_name"] = kernel_id
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(settings, indent=1) + "\n")
    say(f"Registered the {release.kernel_name} kernel ({kernel_id}), JupyterLab's default.")


def write_demo(release: Release, env: dict[str, str]) -> Path:
    """Simulate the demo MeasurementSet and write the demo dataset in the home directory."""
    home = Path.home()
    spec = demo_spec(release)
    ms_name = f"{spec.eb}.ms"
    if any(home.glob(f"{DEMO_PROJECT}/**/calibrated/{ms_name}")):
        say(f"The demo dataset ~/{DEMO_PROJECT} is there already.")
        return home / DEMO_PROJECT
    say(f"Simulating a small MeasurementSet with casatools {release.casa}.")
    with tempfile.TemporaryDirectory(prefix="casaspawner-ms-") as work:
        ms = Path(work) / ms_name
        result = subprocess.run(
            [sys.executable, "-c", SIMULATE_MS, str(ms)],
            capture_output=True,
            text=True,
            cwd=work,
            env={**os.environ, **env},
            timeout=600,
        )
        if result.returncode != 0 or "ROWS" not in result.stdout:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"Simulating the demo MeasurementSet failed: {tail}")
        write_demo_dataset(home, ms, spec)
    say(f"Wrote the demo dataset ~/{DEMO_PROJECT} with {ms_name}.")
    return home / DEMO_PROJECT


def main() -> None:
    catalog = load_catalog()
    release = installed_release(catalog)
    say(f"Preparing {release.label} ({release.id}).")
    measures = measures_dir()
    STATE.mkdir(exist_ok=True)
    site_config = STATE / "casasiteconfig.py"
    site_config.write_text(runtime.site_config_text(measures))
    casarc = STATE / "casarc"
    casarc.write_text(f"measures.directory: {measures}\n")
    casa_env = {"CASASITECONFIG": str(site_config), "CASARCFILES": str(casarc)}

    extract_guis()
    say(f"Checking that {release.label} starts offline with the casadata measures.")
    version = asyncio.run(casa_version(Path(sys.executable), site_config, None))
    if version != release.casa:
        raise SystemExit(f"casatools reports CASA {version}, not {release.casa}.")
    write_kernel(release, casa_env)

    dataset = write_demo(release, casa_env)
    label = f"~/{dataset.name}"
    resolution = resolve_target(str(dataset), catalog)
    if resolution.release.id != release.id:
        raise SystemExit(
            f"The demo dataset resolves to {resolution.release.label}, not {release.label}."
        )
    say(f"{label}: {resolution.reason}")

    desktop = Path(casaspawner.__file__).parent / "insession" / "desktop"
    session = {
        **casa_env,
        "CASA_MEASURES_PATH": str(measures),
        "CASASPAWNER_RELEASE": release.id,
        "CASASPAWNER_CASA": release.casa,
        "CASASPAWNER_KERNEL_NAME": release.kernel_name,
        "CASASPAWNER_CASA_PYTHON": sys.executable,
        "CASASPAWNER_CASA_HOME": sys.prefix,
        "CASASPAWNER_DATASET": label,
        "CASASPAWNER_EXACT": "true" if resolution.exact else "false",
        "CASASPAWNER_APPROXIMATE": "false",
        "CASASPAWNER_REASON": resolution.reason,
        "JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP": str(desktop / "xstartup"),
        # gRPC between casatools and the GUIs stays on this machine, past any proxy.
        "no_grpc_proxy": "0.0.0.0,127.0.0.1,localhost",
    }
    lines = ["# Written by binder/setup_casa.py; binder/start reads it."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in session.items()]
    # casaspawner's vncserver first: it picks a free X display.
    lines.append(f'export PATH={shlex.quote(str(desktop / "bin"))}:"$PATH"')
    (STATE / "binder-env.sh").write_text("\n".join(lines) + "\n")
    say(f"{release.label} is ready: the {release.kernel_name} kernel and the CASA desktop.")


if __name__ == "__main__":
    main()

"""The embedded demo: a real JupyterHub, CASA and ALMA dataset on one machine.

``python -m casaspawner.local.demo``, what ``make demo`` runs:

1. Chooses the demo's CASA release: the newest modular release of the catalog that this machine
   can install, because its wheels support a Python found here. Builds its environment if needed.
2. Simulates a small MeasurementSet with casatools' simulator: five 12 m antennas at ALMA, one
   spectral window, five minutes. The MS is cached under the environments cache. Writes it, as
   the demo user, into an ALMA product tree in that user's home, whose pipeline manifest names
   that CASA build (``casaspawner.datasets.synth``).
3. Starts JupyterHub on http://127.0.0.1:8000 with ``hub-config/local/jupyterhub_config.py``:
   LocalCASASpawner and one demo user with a shared password. Prints the URL, the login and the
   dataset to type.

Run as root, the demo keeps its state in ``/var/lib/casaspawner/demo`` and its storage at
``/arc``: the sessions' local account ``jupyter-demo`` cannot read a checkout under ``/root``.
Otherwise both live in ``<repo>/demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from casaspawner import runtime
from casaspawner.catalog.model import Catalog, Release, load_catalog
from casaspawner.datasets.synth import SIMULATE_MS, DatasetSpec, write_dataset
from casaspawner.errors import CasaspawnerError
from casaspawner.local.environments import CasaEnvironment, EnvironmentManager

DEMO_USER = "demo"
DEMO_PROJECT = "2023.1.01234.S"
REPO = Path(__file__).resolve().parents[2]
HUB_CONFIG = REPO / "hub-config" / "local" / "jupyterhub_config.py"
#: The hub also binds the next two ports (proxy API, hub API).
MAX_PORT = 65533


def demo_spec(release: Release) -> DatasetSpec:
    """The demo dataset: a pipeline manifest naming ``release``'s CASA build.

    The build is written dotted, as ALMA writes it.
    """
    return DatasetSpec(
        project=DEMO_PROJECT,
        mous="uid___A001_X3621_X4d1b",
        casa=release.casa.replace("-", "."),
        pipeline=None,
        evidence=("manifest",),
        eb="uid___A002_X10d5a8a_X3c21",
    )


def demo_release(manager: EnvironmentManager, catalog: Catalog | None = None) -> Release:
    """The newest modular release this machine can install.

    If there is none, the error is one sentence saying how to get a Python.
    """
    catalog = catalog or load_catalog()
    release = manager.newest_installable(catalog)
    if release is None:
        wanted = sorted(
            {v for r in catalog.available(("modular",)) if r.wheels for v in r.wheels.python},
            key=lambda v: tuple(int(p) for p in v.split(".")),
        )
        who = " that every user can run" if manager.shared else ""
        raise CasaspawnerError(
            "No CASA release can be installed here: "
            f"its wheels need Python {', '.join(wanted)}, and no such "
            f"Python{who} was found on PATH, in pyenv or through uv; "
            f"install one (e.g. `apt install python{wanted[-1]}` where the distribution has it, "
            f"or `uv python install {wanted[-1]}`) and run `make demo` again."
        )
    return release


def demo_dir() -> Path:
    """Where the demo keeps its hub state.

    That is ``CASASPAWNER_DEMO_DIR``, else ``/var/lib/casaspawner/demo`` as root, because a
    checkout may be private, else ``<repo>/demo``.
    """
    default = Path("/var/lib/casaspawner/demo") if os.geteuid() == 0 else REPO / "demo"
    return Path(os.environ.get("CASASPAWNER_DEMO_DIR") or default).resolve()


def storage_root(state: Path) -> Path:
    """Where the sessions' storage lives.

    That is ``CASASPAWNER_STORAGE_ROOT``, else ``/arc`` as root, the pods' paths and the spawner's
    default, else ``<state>/arc``.
    """
    default = Path("/arc") if os.geteuid() == 0 else state / "arc"
    return Path(os.environ.get("CASASPAWNER_STORAGE_ROOT") or default).resolve()


def say(message: str) -> None:
    print(f"[casaspawner demo] {message}", flush=True)


async def ensure_environment(manager: EnvironmentManager, release: Release) -> CasaEnvironment:
    async for message in manager.ensure(release):
        say(message)
    env = manager.ready(release)
    if env is None:
        raise CasaspawnerError(f"The environment for {release.label} did not appear.")
    return env


def simulate_ms(env: CasaEnvironment, cache_dir: Path) -> Path:
    """The demo MeasurementSet, simulated once per CASA build and script.

    It is cached under ``cache_dir``.
    """
    key = hashlib.sha256(f"{env.casa}\n{SIMULATE_MS}".encode()).hexdigest()[:16]
    target = cache_dir / "demo" / key / "uid___A002_X10d5a8a_X3c21.ms"
    if target.is_dir():
        return target
    assert env.python is not None
    staging = target.parent / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    say(f"Simulating a small MeasurementSet with casatools {env.casa}.")
    result = subprocess.run(
        [str(env.python), "-c", SIMULATE_MS, str(staging / target.name)],
        capture_output=True,
        text=True,
        cwd=staging,
        env={**os.environ, "CASASITECONFIG": str(env.site_config), "HOME": str(staging)},
        timeout=600,
    )
    if result.returncode != 0 or "ROWS" not in result.stdout:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CasaspawnerError(f"Simulating the demo MeasurementSet failed: {tail}")
    os.replace(staging / target.name, target)
    shutil.rmtree(staging, ignore_errors=True)
    _readable(target.parent)
    return target


def _readable(root: Path) -> None:
    """Make a tree of the cache readable by all, like ``chmod -R a+rX``.

    The cache is the hub's own directory, so no link in it is a user's.
    """
    for dirpath, _dirs, files in os.walk(root):
        # The demo user's session reads it.
        os.chmod(dirpath, 0o755)  # noqa: S103
        for name in files:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), 0o644)


def as_owner_of(home: Path, work: Callable[..., object], *args: Any) -> None:
    """Run ``work(*args)`` with the rights of ``home``'s owner.

    As root, the work runs in a child process that has dropped to that uid and gid, with no
    supplemental groups. So nothing a user placed in their home, such as links, can make root
    write elsewhere. Otherwise, not root or root's own directory, it runs right here. Errors come
    back as a ``CasaspawnerError`` with the child's sentence.

    **Single-threaded callers only**, such as the demo's ``prepare`` and tests. The child is a
    ``fork()`` that runs Python, which is unsafe while other threads may hold locks. A hub never
    calls this.
    """
    info = os.lstat(home)
    if os.geteuid() != 0 or info.st_uid == 0:
        work(*args)
        return
    read, write = os.pipe()
    pid = os.fork()
    # The child drops root for good, does the work, reports, and leaves without cleanup handlers.
    if pid == 0:
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(info.st_gid)
            os.setuid(info.st_uid)
            work(*args)
            code = 0
        except BaseException as exc:
            # Everything goes back to the parent as one sentence.
            os.write(write, (str(exc) or type(exc).__name__).encode(errors="replace")[:2000])
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise CasaspawnerError(
            f"Writing in {home} as its owner failed: {message or 'no reason given'}."
        )


def write_demo_dataset(home: Path, ms: Path, spec: DatasetSpec) -> None:
    """Write an ALMA product tree in ``home``, with the MS under ``calibrated/``.

    Run as ``home``'s owner.
    """
    member = write_dataset(home, spec=spec)
    calibrated = member / "calibrated"
    calibrated.mkdir(exist_ok=True)
    target = calibrated / ms.name
    if not target.is_dir():
        # The user's own files, with their umask.
        shutil.copytree(ms, target, copy_function=shutil.copyfile)


def prepare_home(storage: Path, username: str = DEMO_USER) -> Path:
    """Prepare the hub user's home in ``storage`` as a session will own it.

    As root, its owner is the user's local account, created now as the spawner would create it on
    first login.
    """
    from casaspawner.local.accounts import ensure_account, local_name, prepare_owned_dir
    from casaspawner.local.spawner import LocalCASASpawner

    home = storage / "home" / username
    if os.geteuid() == 0:
        template = LocalCASASpawner.class_traits()["system_username_template"].default_value
        account = ensure_account(local_name(template, "username", username), username, str(home))
        prepare_owned_dir(home, account.pw_uid, account.pw_gid, 0o750)
    else:
        prepare_owned_dir(home, os.getuid(), os.getgid(), 0o750)
    return home


def find_proxy() -> str | None:
    """Find configurable-http-proxy on PATH or in the repository.

    ``make`` installs it in the repository, under ``.cache/npm``.
    """
    local = REPO / ".cache" / "npm" / "node_modules" / ".bin" / "configurable-http-proxy"
    return shutil.which("configurable-http-proxy") or (str(local) if local.exists() else None)


def parse_port(text: str) -> int:
    """Read a port the demo can use, with the next two.

    Anything else is refused with one sentence.
    """
    try:
        port = int(text.strip())
    except ValueError:
        raise CasaspawnerError(
            f"The port {text.strip()[:20]!r} is not a number; "
            f"give one from 1 to {MAX_PORT} with --port "
            "(the hub also uses the next two)."
        ) from None
    if not 1 <= port <= MAX_PORT:
        raise CasaspawnerError(
            f"Port {port} is out of range; give one from 1 to {MAX_PORT} with --port "
            "(the hub also uses the next two)."
        )
    return port


#: How a port is chosen, run directly or through make.
ANOTHER_PORT = "choose another port with --port (make demo DEMO_PORT=8100)"


def port_problem(port: int) -> str | None:
    """Say in one sentence why 127.0.0.1:``port`` cannot be bound.

    None if it can.
    """
    with socket.socket() as sock:
        # Bind as the hub and proxy do.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno == errno.EACCES:
                return (
                    f"Port {port} on 127.0.0.1 needs root (ports below 1024 do); {ANOTHER_PORT}."
                )
            return (
                f"Port {port} on 127.0.0.1 is already in use; stop what uses it or {ANOTHER_PORT}."
            )
    return None


def prepare(storage: Path, cache_dir: Path) -> tuple[Release, Path]:
    """Prepare the environment, the MS and the dataset tree.

    Returns the release and the dataset directory in the demo home.
    """
    manager = EnvironmentManager(cache_dir)
    release = demo_release(manager)
    env = asyncio.run(ensure_environment(manager, release))
    ms = simulate_ms(env, cache_dir)
    home = prepare_home(storage)
    as_owner_of(home, write_demo_dataset, home, ms, demo_spec(release))
    return release, home / DEMO_PROJECT


def hub_environment(
    root: Path, port: int, password: str, cache_dir: Path, storage: Path
) -> dict[str, str]:
    proxy = find_proxy()
    if proxy is None:
        raise CasaspawnerError(
            "configurable-http-proxy is not installed; run `make demo`, which installs it."
        )
    path = os.pathsep.join(
        [str(Path(proxy).parent), str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")]
    )
    return {
        **os.environ,
        "PATH": path,
        "CASASPAWNER_DEMO_DIR": str(root),
        "CASASPAWNER_STORAGE_ROOT": str(storage),
        "CASASPAWNER_DEMO_PORT": str(port),
        "CASASPAWNER_DEMO_PASSWORD": password,
        "CASASPAWNER_ENVIRONMENTS_DIR": str(cache_dir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m casaspawner.local.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", nargs="?", choices=("run", "prepare"), default="run")
    parser.add_argument(
        "--port", default=None, help="the hub's port (default 8000, or CASASPAWNER_DEMO_PORT)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="demo state directory (see demo_dir)"
    )
    parser.add_argument(
        "--storage", type=Path, default=None, help="the sessions' storage root (see storage_root)"
    )
    args = parser.parse_args(argv)
    root = (args.dir or demo_dir()).resolve()
    storage = (args.storage or storage_root(root)).resolve()
    cache_dir = Path(os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR") or runtime.cache_dir())
    try:
        port = parse_port(
            args.port if args.port is not None else os.environ.get("CASASPAWNER_DEMO_PORT", "8000")
        )
        for candidate in (port, port + 1, port + 2) if args.command == "run" else ():
            problem = port_problem(candidate)
            if problem:
                raise CasaspawnerError(problem)
        release, dataset = prepare(storage, cache_dir)
        if args.command == "prepare":
            say(f"Demo dataset ready at {dataset} ({release.label}).")
            return 0
        state = root / "hub"
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(0o700)
        password_file = state / "password"
        if not password_file.exists():
            password_file.write_text(
                os.environ.get("CASASPAWNER_DEMO_PASSWORD") or secrets.token_urlsafe(9)
            )
            password_file.chmod(0o600)
        password = os.environ.get("CASASPAWNER_DEMO_PASSWORD") or password_file.read_text().strip()
        env = hub_environment(root, port, password, cache_dir, storage)
    except CasaspawnerError as exc:
        print(f"casaspawner demo: {exc}", file=sys.stderr)
        return 2
    say(f"Open http://127.0.0.1:{port}/ and log in as {DEMO_USER!r} with password {password!r}.")
    say(
        f"Dataset to type on the form: ~/{DEMO_PROJECT}  "
        f"(an ALMA product tree with a simulated MS, {release.label})"
    )
    say("Stop the hub with Ctrl-C; sessions keep running and are found again when it restarts.")
    jupyterhub = str(Path(sys.prefix) / "bin" / "jupyterhub")
    os.chdir(state)
    # The hub replaces this process.
    os.execve(jupyterhub, [jupyterhub, "-f", str(HUB_CONFIG)], env)  # noqa: S606


if __name__ == "__main__":
    sys.exit(main())

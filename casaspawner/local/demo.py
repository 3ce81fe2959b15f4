"""The embedded demo: a real JupyterHub, CASA and ALMA dataset on one machine.

``python -m casaspawner.local.demo``, what ``make demo`` runs:

1. Chooses the demo's CASA release: the newest modular release of the catalog that this machine
   can install, because its wheels support a Python found here. Builds its environment if needed,
   with the downloads' progress.
2. Simulates a small MeasurementSet with casatools' simulator: five 12 m antennas at ALMA, one
   spectral window, five minutes. The MS is cached under the environments cache. Writes it, as
   the demo user, into an ALMA product tree in that user's home, whose pipeline manifest names
   that CASA build (``casaspawner.datasets.synth``).
3. Prepares the sessions' Jupyter environment when sessions cannot run the hub's own, so that the
   first session does not wait for it.
4. Starts JupyterHub on http://127.0.0.1:8000 with ``hub-config/local/jupyterhub_config.py``:
   LocalCASASpawner, a user and an operator with a shared password, the casa-sessions page.
   Once the hub's start-up lines are out, prints the URL, the logins and the dataset to type,
   and again when the hub stops (Ctrl-C).

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
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import IO, Any

from casaspawner import runtime
from casaspawner.catalog.model import Catalog, Release, load_catalog
from casaspawner.datasets.synth import SIMULATE_MS, DatasetSpec, write_dataset
from casaspawner.errors import CasaspawnerError
from casaspawner.local.environments import CasaEnvironment, EnvironmentManager
from casaspawner.local.environments.progress import Progress, duration, megabytes

DEMO_USER = "demo"
#: Logs in with the same password, in the administrators' and the operators' groups.
OPERATOR = "operator"
DEMO_PROJECT = "2023.1.01234.S"
#: What the demo user types on the form (which suggests it).
DEMO_DATASET = f"~/{DEMO_PROJECT}"
REPO = Path(__file__).resolve().parents[2]
HUB_CONFIG = REPO / "hub-config" / "local" / "jupyterhub_config.py"
#: The hub also binds the next three ports (proxy API, hub API, casa-sessions).
MAX_PORT = 65532
#: How the port's neighbours are said in a refusal.
NEIGHBOURS = "the hub also uses the next three"


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


PREFIX = "[casaspawner demo]"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


class ProgressView:
    """Shows a build's sentences in the terminal, one per line.

    A download's progress is one line redrawn in place, with a bar, its size, rate and time left;
    a heartbeat of a quiet step likewise. Without a terminal, a long step is said every ten
    seconds instead.
    """

    #: Seconds between two lines of one long step when the output is not a terminal.
    QUIET = 10.0

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.open = False
        self.step = ""
        self.said = 0.0

    def show(self, message: str) -> None:
        if not isinstance(message, Progress):
            self.close()
            print(f"{PREFIX} {message}", file=self.out, flush=True)
            return
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            line = f"{PREFIX} {self.line(message, width - len(PREFIX) - 1)}"[:width]
            print(f"\r{line.ljust(width)}", end="", file=self.out, flush=True)
            self.open = True
            return
        now = time.monotonic()
        if message.step != self.step or now - self.said >= self.QUIET or message.fraction == 1:
            self.step, self.said = message.step, now
            print(f"{PREFIX} {message}", file=self.out, flush=True)

    @staticmethod
    def line(progress: Progress, width: int = 200) -> str:
        """``Downloading x  [#####-----]  120/270 MB  25 MB/s  6 s left``, or the sentence.

        In fewer than ``width`` characters the step's name is shortened, not the figures.
        """
        fraction = progress.fraction
        if fraction is None:
            return str(progress)
        filled = round(fraction * 24)
        parts = [f"[{'#' * filled}{'-' * (24 - filled)}]"]
        parts.append(f"{megabytes(progress.done).removesuffix(' MB')}/{megabytes(progress.total)}")
        if progress.rate > 0:
            parts.append(f"{megabytes(progress.rate)}/s")
        if progress.left is not None:
            parts.append(f"{duration(progress.left)} left")
        figures = "  ".join(parts)
        room = max(width - len(figures) - 2, 10)
        step = progress.step if len(progress.step) <= room else progress.step[: room - 1] + "…"
        return f"{step}  {figures}"

    def close(self) -> None:
        """End a line being redrawn."""
        if self.open:
            print(file=self.out, flush=True)
            self.open = False


async def show_steps(steps: AsyncIterator[str], view: ProgressView) -> None:
    """Show each of a build's ``steps`` in ``view``, ending a line left open."""
    try:
        async for message in steps:
            view.show(message)
    finally:
        view.close()


async def ensure_environment(manager: EnvironmentManager, release: Release) -> CasaEnvironment:
    await show_steps(manager.ensure(release), ProgressView())
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
    say(f"Simulating a small MeasurementSet with casatools {env.casa} (a few seconds, once).")
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
    """Read a port the demo can use, with the next three.

    Anything else is refused with one sentence.
    """
    try:
        port = int(text.strip())
    except ValueError:
        raise CasaspawnerError(
            f"The port {text.strip()[:20]!r} is not a number; "
            f"give one from 1 to {MAX_PORT} with --port ({NEIGHBOURS})."
        ) from None
    if not 1 <= port <= MAX_PORT:
        raise CasaspawnerError(
            f"Port {port} is out of range; give one from 1 to {MAX_PORT} with --port "
            f"({NEIGHBOURS})."
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
    """Prepare the environment, the MS, the dataset tree and the sessions' Jupyter environment.

    Returns the release and the dataset directory in the demo home.
    """
    from casaspawner.local.spawner import ui_requirements

    manager = EnvironmentManager(cache_dir)
    release = demo_release(manager)
    state = "ready" if manager.ready(release) else "being prepared (a few minutes, once)"
    say(f"The demo runs {release.label}, the newest CASA this machine can install; it is {state}.")
    env = asyncio.run(ensure_environment(manager, release))
    ms = simulate_ms(env, cache_dir)
    home = prepare_home(storage)
    as_owner_of(home, write_demo_dataset, home, ms, demo_spec(release))
    requirements = ui_requirements()
    if requirements is not None:
        asyncio.run(show_steps(manager.ensure_ui(requirements), ProgressView()))
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
        "CASASPAWNER_DEMO_DATASET": DEMO_DATASET,
        "CASASPAWNER_ENVIRONMENTS_DIR": str(cache_dir),
    }


def banner(port: int, password: str, release: Release) -> list[str]:
    """What a person needs to use the demo: the URL, the logins and the dataset."""
    url = f"http://127.0.0.1:{port}/"
    return [
        f"Open {url} and log in with the password {password!r} as",
        f"  {DEMO_USER!r:10} a user: name a dataset, get CASA in JupyterLab or on a desktop;",
        f"  {OPERATOR!r:10} an operator: the admin page ({url}hub/admin) and the "
        f"casa-sessions page ({url}services/casa-sessions/).",
        f"Dataset to start with (the form suggests it): {DEMO_DATASET}  "
        f"(an ALMA product tree with a simulated MS, {release.label}).",
    ]


def answers(port: int) -> bool:
    """Whether the hub answers through its proxy on ``port``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hub/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


#: The hub's last start-up line; its services may log a few more right after.
RUNNING = b"JupyterHub is now running at"
#: Seconds of quiet after the start-up lines before the banner shows.
SETTLE = 1.0


def run_hub(
    command: list[str], env: dict[str, str], cwd: Path, port: int, lines: list[str]
) -> int:
    """Run the hub until it stops, passing its output on; returns its exit status.

    ``lines`` are said once the hub answers and its start-up lines are out, and again when it
    stops: Ctrl-C reaches the hub too (it is in the same process group), which stops it while
    sessions keep running. SIGTERM is passed on to the hub.
    """
    hub = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lock = threading.Lock()
    seen = {"last": time.monotonic(), "running": False}

    def relay(out: Iterable[bytes]) -> None:
        for raw in out:
            with lock:
                sys.stdout.buffer.write(raw)
                sys.stdout.flush()
                seen["last"] = time.monotonic()
                seen["running"] = seen["running"] or RUNNING in raw

    def tell(first: str) -> None:
        with lock:
            say(first)
            for line in lines:
                say(line)

    assert hub.stdout is not None
    relaying = threading.Thread(target=relay, args=(hub.stdout,), daemon=True)
    relaying.start()
    signal.signal(signal.SIGTERM, lambda *_: hub.terminate())
    told = interrupted = False
    try:
        while hub.poll() is None:
            time.sleep(0.2)
            quiet = time.monotonic() - seen["last"] >= SETTLE
            if not told and seen["running"] and quiet and answers(port):
                tell("The hub is running.")
                told = True
    except KeyboardInterrupt:
        interrupted = True
        with lock:
            say("Stopping the hub and its services; sessions keep running.")
        # The hub has its own Ctrl-C.
        try:
            hub.wait(60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            hub.terminate()
            hub.wait(30)
    relaying.join(5)
    if not (told or interrupted):
        say(
            f"JupyterHub stopped (status {hub.returncode}) before it answered; "
            "see its lines above."
        )
        return hub.returncode or 1
    tell(
        "The hub has stopped; sessions keep running, and it finds them again when `make demo` "
        "starts it. Then:"
    )
    return 0 if interrupted else hub.returncode


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
    # Started in the background (`make demo &`), a shell leaves SIGINT ignored, and the hub and its
    # services would inherit that (the idle culler then stops only when killed): Ctrl-C is ours.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root = (args.dir or demo_dir()).resolve()
    storage = (args.storage or storage_root(root)).resolve()
    cache_dir = Path(os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR") or runtime.cache_dir())
    try:
        port = parse_port(
            args.port if args.port is not None else os.environ.get("CASASPAWNER_DEMO_PORT", "8000")
        )
        for candidate in range(port, port + 4) if args.command == "run" else ():
            problem = port_problem(candidate)
            if problem:
                raise CasaspawnerError(problem)
        try:
            release, dataset = prepare(storage, cache_dir)
        except KeyboardInterrupt:
            print(flush=True)
            say("Stopped; `make demo` starts again, keeping what is finished.")
            return 130
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
    say(
        "Starting JupyterHub; the URL and the logins follow its start-up lines. "
        "Stop it with Ctrl-C: sessions keep running."
    )
    jupyterhub = str(Path(sys.prefix) / "bin" / "jupyterhub")
    lines = banner(port, password, release)
    return run_hub([jupyterhub, "-f", str(HUB_CONFIG)], env, state, port, lines)


if __name__ == "__main__":
    sys.exit(main())

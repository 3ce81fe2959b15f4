"""``casaspawner run``: a script in a dataset's CASA build, headless, here.

The script (ALMA's ``scriptForPI.py``, a pipeline re-run, any user script) runs as the calling
user, in the release's local environment (:mod:`casaspawner.local.environments`), as a
background process with a virtual X display of its own. The dataset resolves as for a session
(:func:`~casaspawner.datasets.resolve.resolve_target`, then :func:`~casaspawner.plan.make_plan`).

Each run has a directory, by default ``<dataset>/casaspawner-runs/<UTC time>-<script>``:

* ``output.log``: the script's output; ``casa-<UTC time>.log``: CASA's log;
* ``ro-crate-metadata.json``: the run's record (:func:`casaspawner.session.record.run_record`),
  completed with the end, the outcome and the files the run left there;
* ``casaspawner-run.json``: what ran, the supervising process and, at the end, the result;
* whatever the script writes: it runs in this directory (``*scriptForPI.py`` runs from its own
  ``script/`` directory, as ALMA's README says).

The run's supervising process (``python -m casaspawner.local.headless supervise DIR``) starts
the display and the script, forwards a stop to the script's process group and writes the
result; the command line follows ``output.log`` until that result is there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import casaspawner
from casaspawner.catalog.model import Catalog, Release, load_catalog
from casaspawner.datasets.model import Resolution
from casaspawner.errors import InvalidInput, shown
from casaspawner.insession import record as run_records
from casaspawner.local.environments import CasaEnvironment, EnvironmentManager
from casaspawner.local.environments.steps import atomic_write
from casaspawner.local.processes import ProcessHandle
from casaspawner.plan import (
    DEFAULT_SIZES,
    Identity,
    PlanConfig,
    Resources,
    SessionOptions,
    SessionPlan,
    StorageLayout,
    Substitution,
    chosen_release,
    make_plan,
    release_for,
)
from casaspawner.runtime import (
    RECORD_ACTION_ID,
    RECORD_DIR_ENV,
    RECORD_ENV,
    RECORD_FILE,
    cache_dir,
    record_text,
)
from casaspawner.session.record import RecordFacts, Runtime, run_record
from casaspawner.session.runs import (
    ERROR_FILE,
    EXIT_STOPPED,
    OUTPUT_LOG,
    RUN_FILE,
    RUNS_DIR,
    casa_command,
    ending,
    read_run,
    resolve,
    run_name,
    script_directory,
)

#: The sizes a run accepts: this machine's (no limits) and the sessions' sizes (CPU only).
SIZES: dict[str, Resources] = {
    "machine": Resources(0, 0, "", "", "no limits: the run shares this machine's CPUs"),
    **DEFAULT_SIZES,
}
#: A resolved and planned run: its plan, the environments, the script and the dataset's directory.
Planned = tuple[SessionPlan, EnvironmentManager, Path, Path | None]
#: Seconds a stopped script has before it is killed.
STOP_GRACE = 10.0
#: Seconds a new run's supervising process has to say it runs.
START_WAIT = 60.0

#: The private directory of a run's X display (its cookie), under the temporary directory.
DISPLAY_PREFIX = "casaspawner-run-"
#: ``prctl``'s option asking for a signal when the parent process ends.
PR_SET_PDEATHSIG = 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``run`` to the ``casaspawner`` command line."""
    p = subparsers.add_parser(
        "run",
        help="run a script (scriptForPI.py, a pipeline re-run…) headless in a dataset's CASA",
        description=(
            "Run a script in the CASA build ALMA's rule picks for a dataset, as a background "
            "process on this machine, and follow its output."
        ),
    )
    p.add_argument("--dataset", metavar="TARGET", help="the dataset's directory (or ALMA id)")
    p.add_argument("--release", help="run this catalog release instead of the resolved one")
    p.add_argument(
        "--size",
        default=None,
        help=(
            f"one of {', '.join(SIZES)}; a session size sets the CPU threads (default: machine; "
            "on Kubernetes, medium)"
        ),
    )
    p.add_argument(
        "--approximate",
        action="store_true",
        help="when the build cannot be installed here, run the nearest installable release",
    )
    p.add_argument(
        "--runs-dir",
        type=Path,
        metavar="DIR",
        help=f"where runs go (default: <dataset>/{RUNS_DIR})",
    )
    p.add_argument("--detach", action="store_true", help="print the run's id and return")
    p.add_argument("--follow", metavar="RUN", help="follow a run (its id or directory)")
    p.add_argument("--stop", metavar="RUN", help="stop a run (its id or directory)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="CASA environments (default: $CASASPAWNER_ENVIRONMENTS_DIR, else the cache)",
    )
    p.add_argument("--catalog", default=None, help="catalog file instead of the bundled one")
    p.add_argument(
        "--archive-url",
        default=os.environ.get("CASASPAWNER_ARCHIVE_URL", "https://almascience.org"),
        help="ALMA archive for identifiers (default: %(default)s)",
    )
    p.add_argument("command", nargs="*", metavar="-- SCRIPT [ARGS]", help="the script to run")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    args.size = args.size or "machine"
    if args.follow:
        return follow(find_run(args.follow))
    if args.stop:
        return stop(find_run(args.stop))
    try:
        run_dir = start(args)
    except KeyboardInterrupt:
        print("casaspawner: interrupted before the run started; nothing ran.", file=sys.stderr)
        return EXIT_STOPPED
    if args.detach:
        print(run_dir.name)
        return 0
    return follow(run_dir)


# Starting a run
def start(args: argparse.Namespace, planned: Planned | None = None) -> Path:
    """Resolve, plan (unless ``planned`` by :func:`plan_run`), prepare, start the supervisor."""
    if not args.dataset:
        raise InvalidInput("Give the dataset with --dataset (its directory or ALMA identifier).")
    if not args.command:
        raise InvalidInput("Give the script to run after --, e.g. -- scriptForPI.py.")
    plan, manager, script, dataset_dir = planned or plan_run(args)
    runs = args.runs_dir or (dataset_dir / RUNS_DIR if dataset_dir else None)
    if runs is None:
        raise InvalidInput(
            f"{shown(args.dataset)} is not a directory here; give --runs-dir for the run's files."
        )
    env = environment(manager, plan)
    started = datetime.now(timezone.utc)
    run_dir = make_run_dir(Path(runs).expanduser().absolute(), script, started)
    write_record(run_dir, plan, env, script, args.command[1:], started, dataset_dir)
    description = describe(run_dir, plan, env, script, args.command[1:], started)
    atomic_write(run_dir / RUN_FILE, json.dumps(description, indent=1))
    launch(run_dir)
    return run_dir


def plan_run(args: argparse.Namespace) -> Planned:
    """Resolve and plan a run (the spawn form's preview too): plan, environments, script, dataset.

    Nothing is written or started.
    """
    catalog = load_catalog(args.catalog) if args.catalog else load_catalog()
    if args.release is not None:
        chosen_release(catalog, args.release)
    if args.size not in SIZES:
        raise InvalidInput(
            f"{shown(args.size)!r} is not a size; choose one of {', '.join(SIZES)}."
        )
    dataset_dir = dataset_directory(args.dataset)
    resolution = resolve(args, catalog, dataset_dir)
    script = find_script(args.command[0], dataset_dir, resolution)
    identity = caller_identity()
    options = SessionOptions(dataset=args.dataset, size=args.size, release=args.release)
    manager = EnvironmentManager(
        args.cache_dir or Path(os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR") or cache_dir())
    )
    release, _, _ = release_for(options, resolution, catalog)
    substitution = substitute(manager, release, catalog, args.approximate)
    home = str(Path.home()).replace("{", "{{").replace("}", "}}")
    config = PlanConfig(sizes=SIZES, storage=StorageLayout(home_mount=home))
    plan = make_plan(identity, options, catalog, resolution, config, substitution)
    return plan, manager, script, dataset_dir


def dataset_directory(text: str) -> Path | None:
    """The dataset's directory, absolute, or None when ``text`` names no directory here."""
    path = Path(text).expanduser()
    return path.resolve() if path.is_dir() else None


def find_script(name: str, dataset: Path | None, resolution: Resolution) -> Path:
    """The script: as given, else in the dataset or its ``script/`` directory, as a file."""
    given = Path(name).expanduser()
    candidates = [given]
    if dataset is not None and not given.is_absolute():
        candidates += [dataset / given, dataset / "script" / given]
        evidence = resolution.evidence.path.partition("!")[0]
        if evidence:
            candidates.append((dataset / evidence).parent / given)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise InvalidInput(
        f"There is no script {shown(name)} here, in the dataset or in its script directory."
    )


def caller_identity() -> Identity:
    """Who the run runs as: the calling user, never root."""
    uid = os.getuid()
    if uid == 0 or os.geteuid() == 0:
        raise InvalidInput("casaspawner run never runs CASA as root; run it as your own user.")
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid{uid}"
    try:
        return Identity(name, uid, os.getgid())
    except InvalidInput:
        return Identity(f"uid{uid}", uid, os.getgid())


def substitute(
    manager: EnvironmentManager, release: Release, catalog: Catalog, approximate: bool
) -> Substitution | None:
    """The nearest installable release when this machine cannot install ``release``."""
    problem = manager.unavailable_reason(release)
    if problem is None:
        return None
    if not approximate:
        raise InvalidInput(
            f"{problem.rstrip('.')}; add --approximate to run the nearest installable release."
        )
    nearest = manager.nearest_installable(release, catalog)
    if nearest is None:
        raise InvalidInput(
            f"{problem.rstrip('.')}, and no other CASA release can be installed here either."
        )
    return Substitution(nearest, f"{problem.rstrip('.')}; the run uses {nearest.label} instead")


def environment(manager: EnvironmentManager, plan: SessionPlan) -> CasaEnvironment:
    """The release's environment, built now (progress on stderr) if it was not."""
    env = manager.ready(plan.release)
    if env is None:

        async def build() -> None:
            async for message in manager.ensure(plan.release):
                print(f"casaspawner: {message}", file=sys.stderr, flush=True)

        asyncio.run(build())
        env = manager.ready(plan.release)
    if env is None:
        raise InvalidInput(f"The environment for {plan.release.label} did not appear.")
    return env


def make_run_dir(runs: Path, script: Path, started: datetime) -> Path:
    """A new run directory, named by UTC time and script, and indexed."""
    index = runs_index()
    try:
        runs.mkdir(exist_ok=True)
        index.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(
            f"The runs directory {shown(str(runs))} cannot be made ({exc.strerror or exc}); "
            "give --runs-dir a directory of yours."
        ) from None
    for number in range(1, 100):
        name = run_name(script.name, started, number)
        try:
            (runs / name).mkdir()
        except FileExistsError:
            continue
        try:
            os.symlink(runs / name, index / name)
        except FileExistsError:
            (runs / name).rmdir()
            continue
        return runs / name
    raise InvalidInput(f"Too many runs of {script.name} this second in {shown(str(runs))}.")


def runs_index() -> Path:
    """Where run ids lead to run directories: ``~/.local/state/casaspawner/runs``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "casaspawner" / "runs"


def write_record(
    run_dir: Path,
    plan: SessionPlan,
    env: CasaEnvironment,
    script: Path,
    arguments: Sequence[str],
    started: datetime,
    dataset: Path | None,
) -> None:
    """Write the run's record, with the evidence's sha256 and the measures' version."""
    digest = hashlib.sha256(script.read_bytes()).hexdigest()
    runtime = Runtime(
        "environment", str(env.root), env.content_digest(), "sha256 of the environment's packages"
    )
    facts = RecordFacts(
        started,
        runtime,
        dataset_path=str(dataset) if dataset is not None else None,
        measures_path=str(env.measures),
    )
    record = run_record(plan, facts, str(script), digest, tuple(arguments))
    run_records.start(
        {
            RECORD_ENV: record_text(record),
            RECORD_DIR_ENV: str(run_dir),
            "CASA_MEASURES_PATH": str(env.measures),
        }
    )


def describe(
    run_dir: Path,
    plan: SessionPlan,
    env: CasaEnvironment,
    script: Path,
    arguments: Sequence[str],
    started: datetime,
) -> dict[str, Any]:
    """What the supervisor runs: the command, its directory and the CASA variables."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    casa_log = run_dir / f"casa-{stamp}.log"
    variables = {
        k: v
        for k, v in plan.environment.items()
        if k not in ("SCRATCH", "HOME") and not k.startswith("JUPYTER")
    }
    variables.update(env.session_environment())
    variables.update(env.kernel_environment())
    # The caller's PYTHONPATH reaches the script (analysis utilities, say), after the build's own.
    paths = [variables.get("PYTHONPATH"), os.environ.get("PYTHONPATH")]
    variables.pop("PYTHONPATH", None)
    if any(paths):
        variables["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    variables["CASASPAWNER_CASA_LOGFILE"] = str(casa_log)
    variables["CASASPAWNER_RUN_ERROR"] = str(run_dir / ERROR_FILE)
    if plan.resources.cpu_limit:
        variables["OMP_NUM_THREADS"] = str(int(plan.resources.cpu_limit))
    monolithic = env.casa_home / "bin" / "casa"
    modular = env.python is not None and not monolithic.is_file()
    command = casa_command(
        str(script),
        arguments,
        str(casa_log),
        casa=None if modular else str(monolithic),
        python=str(env.python) if env.python is not None else None,
        pipeline=bool(plan.release.pipeline),
    )
    cwd = script_directory(script, run_dir)
    return {
        "id": run_dir.name,
        "dataset": plan.options.dataset,
        "release": plan.release.id,
        "label": plan.release.label,
        "reason": plan.reason,
        "script": str(script),
        "command": command,
        "cwd": str(cwd),
        "environment": variables,
        "casa_log": casa_log.name,
        "started": run_records.now_text(),
    }


def launch(run_dir: Path) -> None:
    """Start the run's supervising process, in a session of its own, logging to the run."""
    package_parent = str(Path(casaspawner.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    log = os.open(run_dir / OUTPUT_LOG, flags, 0o644)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "casaspawner.local.headless", "supervise", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=run_dir,
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(log)


# Following and stopping
def find_run(text: str) -> Path:
    """A run's directory, from its id or its directory."""
    candidates = [Path(text).expanduser()]
    if "/" not in text and text not in (".", ".."):
        candidates.insert(0, runs_index() / text)
    for candidate in candidates:
        if (candidate / RUN_FILE).is_file():
            return candidate.resolve()
    raise InvalidInput(
        f"There is no run {shown(text)}; give the id casaspawner run printed, or its directory."
    )


def supervisor(run: dict[str, Any]) -> ProcessHandle | None:
    """The run's supervising process while it lives, else None."""
    found = run.get("supervisor") or {}
    if not found.get("pid"):
        return None
    return ProcessHandle.open(int(found["pid"]), found.get("start"))


def lost(run_dir: Path, run: dict[str, Any]) -> bool:
    """Whether the run ended without a result: its supervisor is gone, or never started."""
    if run.get("result"):
        return False
    handle = supervisor(run)
    if handle is not None:
        handle.close()
        return False
    if run.get("supervisor"):
        # Gone, unless it wrote its result meanwhile.
        return not read_run(run_dir).get("result")
    try:
        age = time.time() - (run_dir / RUN_FILE).stat().st_mtime
    except OSError:
        return True
    return age > START_WAIT


def follow(run_dir: Path) -> int:
    """Print the run's output as it comes, then its end; Ctrl-C stops the run."""
    stopping = False
    position = 0
    while True:
        try:
            position = copy_output(run_dir, position)
            run = read_run(run_dir)
            if not run.get("result") and lost(run_dir, run):
                end_lost(run_dir, run)
                run = read_run(run_dir)
            if run.get("result"):
                copy_output(run_dir, position)
                return ending(run_dir, run)
            time.sleep(0.2)
        except KeyboardInterrupt:
            if not stopping:
                stopping = True
                print(f"casaspawner: stopping run {run_dir.name}…", file=sys.stderr)
                signal_supervisor(run_dir, signal.SIGTERM)


def copy_output(run_dir: Path, position: int) -> int:
    """Copy the run's output from ``position`` to stdout; the new position."""
    try:
        with open(run_dir / OUTPUT_LOG, "rb") as handle:
            handle.seek(position)
            while chunk := handle.read(1 << 16):
                sys.stdout.buffer.write(chunk)
                position += len(chunk)
    except FileNotFoundError:
        return position
    sys.stdout.flush()
    return position


def signal_supervisor(run_dir: Path, sig: int) -> bool:
    handle = supervisor(read_run(run_dir))
    if handle is None:
        return False
    try:
        return handle.signal(sig)
    finally:
        handle.close()


def stop(run_dir: Path) -> int:
    """Stop a run and wait for its end; a run already ended is said so."""
    run = read_run(run_dir)
    if not run.get("result") and signal_supervisor(run_dir, signal.SIGTERM):
        deadline = time.monotonic() + STOP_GRACE + 20
        while time.monotonic() < deadline and not read_run(run_dir).get("result"):
            time.sleep(0.2)
        run = read_run(run_dir)
    if not run.get("result") and lost(run_dir, run):
        end_lost(run_dir, run)
        run = read_run(run_dir)
    result = run.get("result")
    if not result:
        raise InvalidInput(f"Run {run_dir.name} did not stop within {STOP_GRACE + 20:.0f} s.")
    print(f"casaspawner: run {run_dir.name} ended: {result['status']}.", file=sys.stderr)
    return 0


def end_lost(run_dir: Path, run: dict[str, Any]) -> None:
    """Record a run whose supervisor vanished as lost, and stop what it left running."""
    child = run.get("child") or {}
    if child.get("pid"):
        handle = ProcessHandle.open(int(child["pid"]), child.get("start"))
        if handle is not None:
            try:
                os.killpg(handle.pid, signal.SIGKILL)
            except OSError:
                handle.signal(signal.SIGKILL)
            handle.close()
    shown_on = run.get("display") or {}
    if shown_on.get("pid"):
        handle = ProcessHandle.open(int(shown_on["pid"]), shown_on.get("start"))
        if handle is not None:
            handle.signal(signal.SIGTERM)
            handle.close()
    directory = Path(str(shown_on.get("directory", "")))
    if directory.name.startswith(DISPLAY_PREFIX) and directory.parent == Path(
        tempfile.gettempdir()
    ):
        shutil.rmtree(directory, ignore_errors=True)
    error = "the run's process ended without a result"
    finish(run_dir, run, {"status": "lost", "error": error})


def finish(run_dir: Path, run: dict[str, Any], result: dict[str, Any]) -> None:
    """Write the result, and complete the record with the end and the files the run left."""
    result["ended"] = run_records.now_text()
    ok = result["status"] == "finished"
    status = run_records.COMPLETED if ok else run_records.FAILED
    try:
        run_records.complete(run_dir, status, None if ok else str(result.get("error")))
        add_results(run_dir)
    except OSError as exc:
        print(f"casaspawner: the run's record could not be completed: {exc}", file=sys.stderr)
    atomic_write(run_dir / RUN_FILE, json.dumps({**run, "result": result}, indent=1))


def add_results(run_dir: Path) -> None:
    """Name what the run left in its directory as the action's results."""
    record = run_records.read_record(run_dir)
    action = run_records.entity(record, RECORD_ACTION_ID) if record is not None else None
    if record is None or action is None:
        return
    skip = {RECORD_FILE, RUN_FILE, ERROR_FILE}
    parts = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name in skip or entry.name.startswith(".") or entry.is_symlink():
            continue
        kind = "Dataset" if entry.is_dir() else "File"
        name = entry.name + ("/" if entry.is_dir() else "")
        parts.append({"@id": name, "@type": kind, "name": entry.name})
    known = {e.get("@id") for e in record["@graph"]}
    record["@graph"] += [p for p in parts if p["@id"] not in known]
    action["result"] = [{"@id": p["@id"]} for p in parts]
    root = run_records.entity(record, "./")
    if root is not None:
        root["hasPart"] = [{"@id": p["@id"]} for p in parts]
    run_records.write_record(run_dir, record)


# The supervising process
class Display:
    """A private virtual X display: TigerVNC's Xtigervnc, else Xvfb."""

    def __init__(self) -> None:
        # Looked up before any fork: the server ends when the supervising process does (Linux).
        self.prctl = getattr(ctypes.CDLL(None), "prctl", None)
        self.directory = Path(tempfile.mkdtemp(prefix=DISPLAY_PREFIX))
        self.authority = self.directory / "Xauthority"
        self.process: subprocess.Popen[bytes] | None = None
        self.name = ""

    def start(self) -> bool:
        """Start the server on a free display number; whether one started."""
        server = shutil.which("Xtigervnc") or shutil.which("Xvfb")
        if server is None:
            return False
        cookie = secrets.token_bytes(16)
        first = 100 + os.getuid() % 200
        for number in range(first, first + 20):
            self.authority.write_bytes(xauthority(number, cookie))
            read, write = os.pipe()
            command = [
                server,
                f":{number}",
                "-displayfd",
                str(write),
                "-auth",
                str(self.authority),
            ]
            if Path(server).name == "Xtigervnc":
                # No VNC port: nobody watches a headless run.
                command += ["-rfbport", "-1", "-SecurityTypes", "None"]
                command += ["-geometry", "1680x1050", "-depth", "24"]
            else:
                command += ["-screen", "0", "1680x1050x24", "-nolisten", "tcp"]
            process = subprocess.Popen(
                command,
                pass_fds=(write,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=self.die_with_parent,
            )
            os.close(write)
            ready, _, _ = select.select([read], [], [], 10)
            said = os.read(read, 32) if ready else b""
            os.close(read)
            if said.strip():
                self.process, self.name = process, f":{number}"
                return True
            process.kill()
            process.wait()
        return False

    def die_with_parent(self) -> None:
        """In the server's process: end with SIGTERM when the supervisor ends, even killed."""
        if self.prctl is not None:
            self.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def describe(self) -> dict[str, Any]:
        """The server's process and directory, for whoever ends a lost run."""
        held = ProcessHandle.open(self.process.pid) if self.process else None
        found = {
            "pid": held.pid if held else None,
            "start": held.start if held else None,
            "directory": str(self.directory),
        }
        if held is not None:
            held.close()
        return found

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def xauthority(number: int, cookie: bytes) -> bytes:
    """An Xauthority file with one MIT cookie for display ``number`` on any host."""

    def field(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    wild = struct.pack(">H", 0xFFFF)
    return (
        wild
        + field(b"")
        + field(str(number).encode())
        + field(b"MIT-MAGIC-COOKIE-1")
        + field(cookie)
    )


def supervise(run_dir: Path) -> int:
    """Run the script with a display, stop it on SIGTERM, and write how it ended."""
    run = read_run(run_dir)
    me = ProcessHandle.open(os.getpid())
    run["supervisor"] = {"pid": os.getpid(), "start": me.start if me else None}
    if me is not None:
        me.close()
    # First, so that a stop from now on reaches this process.
    atomic_write(run_dir / RUN_FILE, json.dumps(run, indent=1))
    stopped: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(number: int, _frame: object) -> None:
        stopped.append(number)
        if child is not None:
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except OSError:
                child.terminate()

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, on_signal)
    display = Display()
    failure = None
    code = None
    try:
        # The caller's PYTHONPATH, if any, is in the run's variables; this process's is not CASA's.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(run["environment"])
        if display.start():
            env.update(DISPLAY=display.name, XAUTHORITY=str(display.authority))
            run["display"] = display.describe()
        else:
            env.pop("DISPLAY", None)
            print("casaspawner: no Xtigervnc or Xvfb here; the script runs without a display.")
        print(f"casaspawner: {run['label']} runs {Path(run['script']).name}", flush=True)
        if not stopped:
            try:
                child = subprocess.Popen(
                    run["command"],
                    cwd=run["cwd"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                failure = f"the script could not be started ({exc.strerror or exc})"
        if child is not None:
            held = ProcessHandle.open(child.pid)
            run["child"] = {"pid": child.pid, "start": held.start if held else None}
            if held is not None:
                held.close()
        atomic_write(run_dir / RUN_FILE, json.dumps(run, indent=1))
        code = wait(child, stopped) if child is not None else None
    finally:
        display.close()
    if failure is not None and not stopped:
        finish(run_dir, run, {"status": "failed", "exit_code": None, "error": failure})
    else:
        finish(run_dir, run, outcome(run_dir, code, bool(stopped)))
    return 0


def wait(child: subprocess.Popen[bytes], stopped: list[int]) -> int:
    """Wait for the script; after a stop, kill its process group past ``STOP_GRACE``."""
    deadline: float | None = None
    while True:
        try:
            code = child.wait(0.5)
            break
        except subprocess.TimeoutExpired:
            if stopped and deadline is None:
                deadline = time.monotonic() + STOP_GRACE
                # Again, in case the stop came before the script's process existed.
                with contextlib.suppress(OSError):
                    os.killpg(child.pid, signal.SIGTERM)
            if deadline is not None and time.monotonic() > deadline:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except OSError:
                    child.kill()
    # What the script left running in its process group goes with it (if anything).
    with contextlib.suppress(OSError):
        os.killpg(child.pid, signal.SIGKILL)
    return code


def outcome(run_dir: Path, code: int | None, stopped: bool) -> dict[str, Any]:
    """The run's result from the script's exit status and what its runner said."""
    if stopped:
        return {"status": "stopped", "exit_code": code, "error": "stopped"}
    if code == 0:
        return {"status": "finished", "exit_code": 0}
    try:
        said = (run_dir / ERROR_FILE).read_text(errors="replace").strip()
    except OSError:
        said = ""
    if not said and code is not None and code < 0:
        said = f"the script was killed by signal {-code}"
    return {
        "status": "failed",
        "exit_code": code,
        "error": said or f"the script exited with status {code}",
    }


def main(argv: list[str] | None = None) -> int:
    """``supervise DIR``: the run's supervising process."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "supervise":
        print("usage: python -m casaspawner.local.headless supervise <run directory>")
        return 2
    return supervise(Path(args[1]))


if __name__ == "__main__":
    sys.exit(main())

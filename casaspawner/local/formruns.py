"""Headless runs from the spawn form, on one machine: ``casaspawner run`` as the user's account.

The hub's run pages (:mod:`casaspawner.services.runs`) ask :class:`LocalRuns`, which runs this
module's worker, ``python -m casaspawner.local.formruns ACTION …``, as the user's local account
(the account, groups and home their sessions get), never as root. The worker calls
:mod:`casaspawner.local.headless` itself, so a run from the form resolves, plans, lands in
``<dataset>/casaspawner-runs/`` and ends exactly as ``casaspawner run`` does; it prints one JSON
object: the answer, or ``{"error": sentence}``.

Actions: ``preview`` (what would run: dataset, build, exact or approximate and why, script),
``start``, ``list`` (the runs in the user's run index), ``show ID`` (status, its sentence, the
output's tail, the run's files) and ``stop ID``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

from casaspawner.datasets.worker import RunAs, limited
from casaspawner.errors import CasaspawnerError, InvalidInput, shown
from casaspawner.local import headless
from casaspawner.local.accounts import prepare_owned_dir, running_as_root
from casaspawner.session import runs as shared

#: A run's id as ``casaspawner run`` names it: ``<UTC time>-<script stem>[-<n>]``.
RUN_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[A-Za-z0-9._-]{1,70}")
#: Seconds a worker may take; a start may wait for a stop or a slow archive.
WORKER_TIMEOUT = 180.0
#: What keeps the user's own Python (user site-packages) out of the worker; a run goes without.
WORKER_ENV = {"PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
#: The hub's variables a worker gets, as the resolution worker: identifiers behind a proxy.
PASSED_ON = ("https_proxy", "http_proxy", "no_proxy", "SSL_CERT_FILE", "CASASPAWNER_ARCHIVE_URL")
#: What the hub's user has in flight: one start at a time each, so a re-sent Start waits.
_STARTING: dict[str, asyncio.Lock] = {}


# The worker, run as the user
def run_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace :func:`headless.start` reads, from the worker's arguments."""
    return argparse.Namespace(
        dataset=args.dataset,
        command=[args.script],
        release=args.release or None,
        size=args.size,
        approximate=args.approximate,
        runs_dir=None,
        cache_dir=None,
        catalog=args.catalog,
        archive_url=os.environ.get("CASASPAWNER_ARCHIVE_URL", "https://almascience.org"),
    )


def planned(args: argparse.Namespace) -> headless.Planned:
    """Resolve and plan as ``casaspawner run`` does, for a dataset directory the user can write.

    A run from the form writes beside its dataset; these are checked before anything is looked up.
    """
    dataset_dir = headless.dataset_directory(args.dataset)
    if dataset_dir is None:
        raise InvalidInput(
            f"{shown(args.dataset)} is not a directory in your storage; a run from the form "
            "writes beside its dataset, so name the dataset's directory."
        )
    runs = dataset_dir / shared.RUNS_DIR
    if not os.access(runs if runs.is_dir() else dataset_dir, os.W_OK | os.X_OK):
        raise InvalidInput(
            f"Your account cannot write in {shown(str(runs if runs.is_dir() else dataset_dir))}, "
            "where a run from the form keeps its files; copy the dataset to a directory of "
            "yours and name that directory."
        )
    return headless.plan_run(run_arguments(args))


def preview(args: argparse.Namespace) -> dict[str, Any]:
    """What a run would run, resolved as ``casaspawner run`` resolves it; nothing starts."""
    plan, manager, script, dataset_dir = planned(args)
    assert dataset_dir is not None
    return {
        "dataset": str(dataset_dir),
        "release": plan.release.id,
        "label": plan.release.label,
        "exact": plan.exact,
        "approximate": plan.approximate,
        "reason": plan.reason,
        "script": str(script),
        "runs_dir": str(dataset_dir / shared.RUNS_DIR),
        "ready": manager.ready(plan.release) is not None,
    }


def start(args: argparse.Namespace) -> dict[str, Any]:
    """Start the run as ``casaspawner run --detach`` does; its id.

    The resolution runs within the worker's limits; the run itself does not: its supervisor gets
    this account's own limits and environment, as from a shell.
    """
    found = planned(args)
    for limit in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_CORE):
        resource.setrlimit(limit, (resource.getrlimit(limit)[1],) * 2)
    for name in WORKER_ENV:
        os.environ.pop(name, None)
    run_dir = headless.start(run_arguments(args), found)
    return {"id": run_dir.name}


def find(run_id: str) -> Path:
    """The caller's run ``run_id``, through their own run index only."""
    if not RUN_ID.fullmatch(run_id):
        raise InvalidInput(f"There is no run {shown(run_id)}.")
    return headless.find_run(run_id)


def summary(run_dir: Path, tail: bool = False) -> dict[str, Any]:
    """A run's status and its sentence; with ``tail``, the output's end and the run's files."""
    run = shared.read_run(run_dir)
    if run and not run.get("result") and headless.lost(run_dir, run):
        headless.end_lost(run_dir, run)
        run = shared.read_run(run_dir)
    result = run.get("result") or {}
    status = str(result.get("status") or "running")
    if result:
        _, sentence = shared.ending_sentence(run_dir.name, run, str(run_dir))
    else:
        sentence = f"run {run_dir.name} is running; its output and CASA log go to {run_dir}."
    found = {
        "id": run_dir.name,
        "status": status,
        "sentence": sentence[:1].upper() + sentence[1:],
        "directory": str(run_dir),
        "dataset": run.get("dataset", ""),
        "label": run.get("label", ""),
        "reason": run.get("reason", ""),
        "script": run.get("script", ""),
        "started": run.get("started", ""),
        "ended": result.get("ended", ""),
    }
    if tail:
        found["output"] = output_tail(run_dir / shared.OUTPUT_LOG)
        found["casa_log"] = run.get("casa_log", "")
        found["files"] = sorted(
            entry.name + ("/" if entry.is_dir() else "")
            for entry in run_dir.iterdir()
            if not entry.name.startswith(".")
        )
    return found


def output_tail(path: Path) -> str:
    """The end of a run's log, from a line's start; empty when there is none."""
    try:
        with open(path, "rb") as handle:
            return shared.log_tail(handle)
    except OSError:
        return ""


def list_runs() -> dict[str, Any]:
    """The caller's runs, newest first, from their run index."""
    index = headless.runs_index()
    try:
        names = sorted((p.name for p in index.iterdir() if RUN_ID.fullmatch(p.name)), reverse=True)
    except OSError:
        names = []
    runs = []
    for name in names[: shared.LIST_LIMIT]:
        run_dir = index / name
        if (run_dir / shared.RUN_FILE).is_file():
            runs.append(summary(run_dir.resolve()))
    return {"runs": runs}


def stop(run_id: str) -> dict[str, Any]:
    """Stop the caller's run and wait for its end, as ``casaspawner run --stop``."""
    run_dir = find(run_id)
    with contextlib.redirect_stderr(io.StringIO()):
        headless.stop(run_dir)
    return summary(run_dir, tail=True)


def worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m casaspawner.local.formruns")
    actions = parser.add_subparsers(dest="action", required=True)
    for name in ("preview", "start"):
        action = actions.add_parser(name)
        action.add_argument("--dataset", required=True)
        action.add_argument("--script", required=True)
        action.add_argument("--size", default="machine")
        action.add_argument("--release", default="")
        action.add_argument("--approximate", action="store_true")
        action.add_argument("--catalog", default=None)
    actions.add_parser("list")
    for name in ("show", "stop"):
        actions.add_parser(name).add_argument("run_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The worker: one action, one JSON object on stdout."""
    args = worker_parser().parse_args(argv)
    # Started in "/" (never the user's directory on sys.path); names are the user's, from home.
    with contextlib.suppress(OSError):
        os.chdir(Path.home())
    try:
        if args.action == "preview":
            answer = preview(args)
        elif args.action == "start":
            answer = start(args)
        elif args.action == "list":
            answer = list_runs()
        elif args.action == "show":
            answer = summary(find(args.run_id), tail=True)
        else:
            answer = stop(args.run_id)
    except CasaspawnerError as exc:
        answer = {"error": str(exc)}
    print(json.dumps(answer), flush=True)
    return 0


# The hub's side
class WorkerError(RuntimeError):
    """The worker ended without an answer; the hub's log has what it said."""


class LocalRuns:
    """Headless runs of one hub user on this machine, as their local account.

    ``spawner`` is the user's :class:`~casaspawner.local.spawner.LocalCASASpawner`: its account
    mapping, home, catalog, environments and ``allow_approximate`` are the run's.
    """

    def __init__(self, spawner: Any) -> None:
        self.spawner = spawner

    async def preview(self, dataset: str, script: str, size: str, release: str) -> dict[str, Any]:
        found = await self._worker("preview", *self._run_options(dataset, script, size, release))
        # The hub builds what the worker names as root: only a release of its catalog.
        chosen = self.spawner.casa_catalog().get(str(found.get("release")))
        return {**found, "release": chosen.id}

    async def start(self, dataset: str, script: str, size: str, release: str) -> str:
        """Start the run and return its id; the build's environment is prepared first.

        One start of a user's at a time; the same script running on the same dataset is refused.
        """
        options = self._run_options(dataset, script, size, release)
        lock = _STARTING.setdefault(self.spawner.user.name, asyncio.Lock())
        async with lock:
            found = await self.preview(dataset, script, size, release)
            for run in await self.runs():
                if (
                    run.get("status") == "running"
                    and run.get("script") == found["script"]
                    and Path(str(run.get("directory"))).parent == Path(found["runs_dir"])
                ):
                    raise InvalidInput(
                        f"{Path(found['script']).name} is already running on this dataset "
                        f"(run {run['id']}); stop it or wait for its end before starting "
                        "it again."
                    )
            if not found.get("ready"):
                # As the spawner does: the hub builds the environment, the user only reads it.
                manager = self.spawner.environment_manager()
                chosen = self.spawner.casa_catalog().get(found["release"])
                async for message in manager.ensure(chosen):
                    self.spawner.log.info("Run of %s: %s", self.spawner.user.name, message)
            return run_id((await self._worker("start", *options)).get("id"))

    async def runs(self) -> list[dict[str, Any]]:
        found = (await self._worker("list")).get("runs")
        if not isinstance(found, list):
            raise WorkerError("the run's worker gave no list of runs")
        return [r for r in found if isinstance(r, dict) and RUN_ID.fullmatch(str(r.get("id")))]

    async def show(self, run_id: str) -> dict[str, Any]:
        return await self._worker("show", run_id)

    async def stop(self, run_id: str) -> dict[str, Any]:
        return await self._worker("stop", run_id)

    def _run_options(self, dataset: str, script: str, size: str, release: str) -> list[str]:
        """The worker's options, each ``--name=value``: a value is never taken for an option."""
        found = [f"--dataset={dataset}", f"--script={script}", f"--size={size or 'machine'}"]
        if release:
            found.append(f"--release={release}")
        if self.spawner.allow_approximate:
            found.append("--approximate")
        return found

    async def _worker(self, *args: str) -> dict[str, Any]:
        """Run the worker as the user's account; its answer, or its sentence.

        The operator's catalog, which the user may not read, goes to the worker as a copy.
        """
        with tempfile.TemporaryDirectory(prefix="casaspawner-run-") as scratch:
            if self.spawner.catalog_path and args[0] in ("preview", "start"):
                # The worker reads it; only the hub writes it.
                os.chmod(scratch, 0o755)  # noqa: S103
                copy = Path(scratch) / "releases.yaml"
                copy.write_bytes(Path(self.spawner.catalog_path).read_bytes())
                copy.chmod(0o644)
                args = (*args, f"--catalog={copy}")
            return await self._as_user(*args)

    async def _as_user(self, *args: str) -> dict[str, Any]:
        """The worker as the resolution worker runs: as the user, limited, in "/", with ``-s -P``.

        Neither the user's site-packages nor a ``casaspawner`` in a directory of theirs can stand
        in for the worker's code; its answer is still checked by the callers.
        """
        spawner = self.spawner
        identity = await spawner.session_identity()
        home = Path(spawner.home_mount_template.format(username=spawner.user.name))
        await asyncio.to_thread(prepare_owned_dir, home, identity.uid, identity.gid, 0o750)
        manager = spawner.environment_manager()
        files = await asyncio.to_thread(manager.session_files)
        python = await spawner._resolver_python()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(files / "python"),
            "CASASPAWNER_ENVIRONMENTS_DIR": str(manager.cache_dir),
            **WORKER_ENV,
        }
        env.update({name: os.environ[name] for name in PASSED_ON if name in os.environ})
        user = None
        if running_as_root():
            user = RunAs(identity.uid, identity.gid, tuple(identity.supplemental_gids))
            env["USER"] = env["LOGNAME"] = spawner.system_username()
        limits = spawner.resolver_limits()
        process = await asyncio.create_subprocess_exec(
            python,
            "-s",
            "-P",
            "-m",
            "casaspawner.local.formruns",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd="/",
            env=env,
            preexec_fn=limited(limits, user, soft_only=True),
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), WORKER_TIMEOUT)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise WorkerError(f"the run's worker took over {WORKER_TIMEOUT:.0f} s") from None
        try:
            answer = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
        except (IndexError, ValueError):
            answer = None
        if not isinstance(answer, dict):
            spawner.log.error(
                "The run worker of %s (%s) failed: %s",
                spawner.user.name,
                args[0],
                err.decode(errors="replace")[-3000:],
            )
            raise WorkerError("the run's worker ended without an answer") from None
        if "error" in answer:
            raise InvalidInput(str(answer["error"]))
        if "id" in answer:
            answer["id"] = run_id(answer["id"])
        return answer


def run_id(found: object) -> str:
    """A run id from a worker's answer, which must be one: the hub redirects to it."""
    if not isinstance(found, str) or not RUN_ID.fullmatch(found):
        raise WorkerError("the run's worker answered with no run id")
    return found


if __name__ == "__main__":
    sys.exit(main())

"""What a headless run is, wherever it runs: its directory, files, command and end.

``casaspawner run`` runs a script in a dataset's CASA build on one machine
(:mod:`casaspawner.local.headless`) or as a Kubernetes Job (:mod:`casaspawner.kube.runs`). Both
name a run and its files the same way, run CASA with the same command, resolve the dataset the
same way and say how a run ended in the same sentence, with the same exit status: this module.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import casaspawner
from casaspawner.catalog.model import Catalog
from casaspawner.datasets.archive import AlmaDataLinkClient
from casaspawner.datasets.model import Evidence, Resolution
from casaspawner.datasets.resolve import resolve_target
from casaspawner.errors import InvalidInput, VersionUnknown
from casaspawner.plan import chosen_release

#: The directory beside the dataset holding its runs.
RUNS_DIR = "casaspawner-runs"
#: What ran and how it ended, in the run's directory.
RUN_FILE = "casaspawner-run.json"
#: The script's standard output and error, in the run's directory.
OUTPUT_LOG = "output.log"
#: Where the script's runner leaves the one sentence of an exception.
ERROR_FILE = ".casaspawner-error"
#: The variable carrying a run's description to its Kubernetes pod (base64-encoded JSON).
RUN_ENV = "CASASPAWNER_RUN"
#: Exit statuses beside 0 (finished) and 2 (bad input).
EXIT_FAILED, EXIT_LOST, EXIT_STOPPED = 1, 3, 130
#: How much of the end of ``output.log`` a run's page shows, in bytes.
TAIL_BYTES = 16_384
#: How many runs the run pages list, newest first.
LIST_LIMIT = 50
#: The runner of scripts in modular CASA's Python.
CASA_RUNNER = Path(casaspawner.__file__).resolve().parent / "insession" / "casa_run.py"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def run_name(script: str, started: datetime, number: int = 1) -> str:
    """A run's id: ``<UTC time>-<script stem>``, with ``-<number>`` past the first."""
    stamp = started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = _UNSAFE.sub("_", Path(script).stem).strip("._-")[:60] or "script"
    return f"{stamp}-{slug}" + (f"-{number}" if number > 1 else "")


def resolve(args: argparse.Namespace, catalog: Catalog, directory: Path | None) -> Resolution:
    """Resolve the dataset; a chosen release runs a dataset that tells no version."""
    archive = AlmaDataLinkClient(args.archive_url, timeout=10.0)
    target = str(directory) if directory is not None else args.dataset
    try:
        resolution = resolve_target(target, catalog, archive=archive)
    except VersionUnknown as exc:
        if args.release is None:
            raise
        chosen = chosen_release(catalog, args.release)
        reason = f"{exc.finding}; you chose {chosen.label}."
        return Resolution(args.dataset, Evidence("none", "", None, None), chosen, False, reason)
    return resolution


def casa_command(
    script: str,
    arguments: Sequence[str],
    casa_log: str,
    *,
    casa: str | None,
    python: str | None,
    pipeline: bool,
    processes: int = 1,
    mpicasa: str | None = None,
    runner: str = str(CASA_RUNNER),
) -> list[str]:
    """The command that runs ``script`` in a CASA build.

    A modular build (``casa`` None) runs it with :mod:`~casaspawner.insession.casa_run` in its
    ``python``; a monolithic one runs ``casa --nologger --nogui -c`` (``--pipeline`` for a
    pipeline build), under ``mpicasa -n processes`` when there are several and ``mpicasa``.
    """
    if casa is None:
        if python is None:
            raise InvalidInput("This CASA build has neither a casa command nor a Python.")
        return [python, "-s", runner, script, *arguments]
    command = [casa, "--nologger", "--nogui", "--logfile", casa_log]
    command += ["--pipeline"] if pipeline else []
    command += ["-c", script, *arguments]
    if processes > 1 and mpicasa:
        command = [mpicasa, "-n", str(processes), *command]
    return command


def script_directory(script: Path, run_dir: Path) -> Path:
    """Where the script runs: ``*scriptForPI.py`` in its own directory, else the run's."""
    return script.parent if script.name.endswith("scriptForPI.py") else run_dir


def read_run(run_dir: Path) -> dict[str, Any]:
    try:
        found = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def ending(run_dir: Path, run: dict[str, Any], where: str | None = None) -> int:
    """Say how the run ended, in one sentence on stderr; the exit status.

    ``where`` is the run's directory as the user sees it (``run_dir`` when None).
    """
    status, sentence = ending_sentence(run_dir.name, run, where or str(run_dir))
    print(f"casaspawner: {sentence}", file=sys.stderr)
    return status


def ending_sentence(run_id: str, run: dict[str, Any], where: str) -> tuple[int, str]:
    """How the run ended, as ``casaspawner run`` says it, and its exit status.

    ``where`` is the run's directory as the user sees it.
    """
    result = run["result"]
    status = result.get("status")
    if status == "finished":
        return 0, (f"run {run_id} finished; its CASA log, output and record are in {where}.")
    if status == "stopped":
        why = f": {result['why']}" if result.get("why") else ""
        return EXIT_STOPPED, f"run {run_id} was stopped{why}; what it wrote is in {where}."
    if status == "lost":
        why = (
            result.get("why")
            or "its process ended without a result (killed, or the machine restarted)"
        )
        return EXIT_LOST, f"run {run_id} was lost: {why}; what it wrote is in {where}."
    return EXIT_FAILED, (
        f"run {run_id} failed: {result.get('error')}; its CASA log and output are in {where}."
    )


def log_tail(handle: BinaryIO, size: int = TAIL_BYTES) -> str:
    """The last ``size`` bytes of a run's log, from a line's start, as text."""
    end = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, end - size))
    data = handle.read(size)
    if end > size:
        data = data.partition(b"\n")[2]
    return data.decode("utf-8", errors="replace")

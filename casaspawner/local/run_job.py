"""What a headless run's Kubernetes Job runs: ``casaspawner run``'s run, in the pod.

``python -m casaspawner.local.run_job`` reads the run (``$CASASPAWNER_RUN``, from
:func:`casaspawner.kube.jobs.run_spec`) and its record (``$CASASPAWNER_RECORD``), makes the
run's directory in the user's storage, writes the record and ``casaspawner-run.json`` there with
the command this image runs (``mpicasa -n N`` when the size has several cores and the image
has ``mpicasa``), then runs the supervising process of one machine
(:func:`casaspawner.local.headless.supervise`: a virtual X display if the image has one, the
script, the result, the completed record). The output goes to ``output.log`` and to the pod's
log. The exit status is the run's, as ``casaspawner run`` exits; the termination message is its
one sentence. A SIGTERM (the Job deleted, ``--stop``) stops the script.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from casaspawner.insession import record as run_records
from casaspawner.local.environments.steps import atomic_write
from casaspawner.local.headless import end_lost, finish
from casaspawner.runtime import RECORD_DIR_ENV, RUN_IMAGE_KEY_ENV, RUN_IMAGE_URL_ENV
from casaspawner.session.runs import (
    CASA_RUNNER,
    EXIT_FAILED,
    EXIT_LOST,
    EXIT_STOPPED,
    OUTPUT_LOG,
    RUN_ENV,
    RUN_FILE,
    casa_command,
    read_run,
)

#: Where Kubernetes reads a container's last word (``terminationMessagePath``).
TERMINATION_LOG = Path("/dev/termination-log")
#: How long a run waits at its start for its image's digest, and how often it asks, in seconds.
DIGEST_WAIT = 30.0
DIGEST_EVERY = 1.0
#: The exit status of each way a run ends, as ``casaspawner run`` exits.
EXIT_STATUS = {"finished": 0, "failed": EXIT_FAILED, "stopped": EXIT_STOPPED}


def image_command(spec: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[list[str], str]:
    """The command this image runs the script with, and how it uses the cores, in words.

    The image names its CASA in ``CASASPAWNER_CASA_HOME`` and ``CASASPAWNER_CASA_PYTHON``; a
    monolithic build has ``bin/casa``, and maybe ``bin/mpicasa``.
    """
    home = Path(environ.get("CASASPAWNER_CASA_HOME", "/nonexistent"))
    casa = home / "bin" / "casa"
    python = environ.get("CASASPAWNER_CASA_PYTHON") or None
    monolithic = casa.is_file()
    mpicasa = shutil.which("mpicasa", path=str(home / "bin")) or shutil.which("mpicasa")
    processes = int(spec.get("processes", 1))
    run_dir = str(spec["run_dir"])
    command = casa_command(
        str(spec["script"]),
        spec.get("arguments", []),
        f"{run_dir}/{spec['casa_log']}",
        casa=str(casa) if monolithic or python is None else None,
        python=python,
        pipeline=bool(spec.get("pipeline")),
        processes=processes,
        mpicasa=mpicasa if monolithic else None,
        runner=str(CASA_RUNNER),
    )
    if command[0] == mpicasa:
        how = f"mpicasa -n {processes}"
    elif processes > 1:
        how = f"one process: this image has no mpicasa for {processes} cores"
    else:
        how = "one process"
    return command, how


def describe(spec: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``casaspawner-run.json`` of the run: what the supervising process runs."""
    command, how = image_command(spec, environ)
    variables = dict(spec.get("environment", {}))
    if how.startswith("mpicasa"):
        # Each MPI process uses one core.
        variables["OMP_NUM_THREADS"] = "1"
    return {
        "id": spec["id"],
        "dataset": spec.get("dataset"),
        "release": spec.get("release"),
        "label": spec.get("label"),
        "reason": spec.get("reason"),
        "script": spec["script"],
        "command": command,
        "parallel": how,
        "cwd": spec["cwd"],
        "environment": variables,
        "casa_log": spec["casa_log"],
        "started": spec.get("started") or run_records.now_text(),
        "kubernetes": {"pod": environ.get("HOSTNAME", "")},
    }


def say(text: str, log: int) -> None:
    """One line to the pod's log and to ``output.log``."""
    data = (text.rstrip("\n") + "\n").encode()
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    if log >= 0:
        os.write(log, data)


def terminate(sentence: str) -> None:
    """Leave the run's one sentence where Kubernetes shows it (the pod's status)."""
    # Not in a pod (a test), or no termination log: the output says it already.
    with contextlib.suppress(OSError):
        TERMINATION_LOG.write_text(sentence[:3000] + "\n")


def prepare(spec: Mapping[str, Any], environ: Mapping[str, str]) -> Path:
    """Make the run's directory and write its record and run file; the directory."""
    run_dir = Path(str(spec["run_dir"]))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir()
    run_records.start({**environ, RECORD_DIR_ENV: str(run_dir)})
    atomic_write(run_dir / RUN_FILE, json.dumps(describe(spec, environ), indent=1))
    return run_dir


def note_image_digest(
    run_dir: Path, environ: Mapping[str, str], log: int, stopping: threading.Event
) -> None:
    """Put the image's digest on the run's record: the hub reads it from the pod's status.

    A run the hub created asks it (:func:`casaspawner.insession.record.run_image_digest`)
    before the script starts, for :data:`DIGEST_WAIT` seconds at most or until ``stopping`` is
    set; one without a hub (``casaspawner run --kubernetes``) has its record completed by the
    command.
    """
    if not environ.get(RUN_IMAGE_URL_ENV):
        return
    if run_records.watch_image_digest(
        run_dir,
        lambda: run_records.run_image_digest(environ),
        stopping,
        wait=DIGEST_WAIT,
        every=DIGEST_EVERY,
    ):
        say("casaspawner: the record names the image by its digest", log)
    elif not stopping.is_set() and run_records.needs_image_digest(run_dir):
        say(
            f"casaspawner: the hub gave no image digest in {DIGEST_WAIT:.0f} s; the record "
            "names the image by its tag",
            log,
        )


def supervise(run_dir: Path, log: int) -> None:
    """Run the supervising process, copying its output to the pod's log and ``output.log``.

    SIGTERM and SIGINT go on to it: it stops the script and writes the result.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "casaspawner.local.headless", "supervise", str(run_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=run_dir,
        # The script does not need the key that asked the hub for the digest.
        env={
            k: v for k, v in os.environ.items() if k not in (RUN_IMAGE_KEY_ENV, RUN_IMAGE_URL_ENV)
        },
    )

    def forward(number: int, _frame: object) -> None:
        # Unless it has ended already.
        with contextlib.suppress(OSError):
            process.send_signal(signal.SIGTERM)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, forward)
    assert process.stdout is not None
    while chunk := os.read(process.stdout.fileno(), 1 << 16):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        os.write(log, chunk)
    process.wait()


def record_lost(run_dir: Path, why: str) -> int:
    """Record a run whose pod ended without a result as lost, its record as failed."""
    run = read_run(run_dir)
    if not run:
        print(f"casaspawner: there is no run in {run_dir}", file=sys.stderr)
        return EXIT_FAILED
    if not run.get("result"):
        finish(run_dir, run, {"status": "lost", "error": why, "why": why})
    return 0


def main(environ: Mapping[str, str] | None = None, argv: list[str] | None = None) -> int:
    """Prepare the run, supervise it, and exit as the run ended.

    ``lost DIR WHY``: record the run in ``DIR`` as lost, for ``WHY``; ``digest DIR SHA256``:
    name the run's image by its digest in its record (the kubelet's, after the run).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "lost":
        return record_lost(Path(args[1]), args[2])
    if len(args) == 3 and args[0] == "digest":
        if not re.fullmatch(r"[0-9a-f]{64}", args[2]):
            print(f"casaspawner: {args[2][:80]!r} is not a sha256 digest", file=sys.stderr)
            return EXIT_FAILED
        run_records.add_image_digest(Path(args[1]), args[2])
        return EXIT_FAILED if run_records.needs_image_digest(Path(args[1])) else 0
    env = dict(os.environ if environ is None else environ)
    try:
        spec = json.loads(base64.b64decode(env[RUN_ENV], validate=True))
    except (KeyError, ValueError) as exc:
        sentence = f"the run's description (${RUN_ENV}) is missing or unreadable ({exc})"
        print(f"casaspawner: {sentence}", file=sys.stderr)
        terminate(sentence)
        return EXIT_FAILED
    try:
        run_dir = prepare(spec, env)
    except OSError as exc:
        sentence = (
            f"the run's directory {spec.get('run_dir')} could not be made ({exc.strerror or exc})"
        )
        print(f"casaspawner: {sentence}", file=sys.stderr)
        terminate(sentence)
        return EXIT_FAILED
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    log = os.open(run_dir / OUTPUT_LOG, flags, 0o644)
    try:
        say(f"casaspawner: run {run_dir.name} in {run_dir}", log)
        # Stopped while it waits for the digest, the run ends before its script starts.
        stopping = threading.Event()
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, lambda _number, _frame: stopping.set())
        note_image_digest(run_dir, env, log, stopping)
        if stopping.is_set():
            stopped = {"status": "stopped", "exit_code": None, "error": "stopped"}
            finish(run_dir, read_run(run_dir), stopped)
        else:
            supervise(run_dir, log)
    finally:
        os.close(log)
    run = read_run(run_dir)
    if not run.get("result"):
        # The supervising process was killed: what it left goes, the record says so.
        end_lost(run_dir, run)
    result = read_run(run_dir).get("result") or {}
    status = str(result.get("status", "lost"))
    terminate(status if status == "finished" else f"{status}: {result.get('error')}")
    return EXIT_STATUS.get(status, EXIT_LOST)


if __name__ == "__main__":
    sys.exit(main())

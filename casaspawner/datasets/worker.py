"""Resolution in a worker process, with a deadline and limits on CPU time and memory.

A hub resolves every dataset of a spawn here, off its event loop: a hostile dataset can cost the
worker its limits, never the hub its time or memory. The parent, :func:`resolve_in_worker`, runs
``python -m casaspawner.datasets.worker`` and hands it the dataset directory as an open
descriptor, so the worker reads the very directory the hub's storage reader checked. A hub
running as root runs the worker as the session's user (``user``): root never reads a user's
files itself.

The child prints one JSON object on stdout: the resolution, or the error's kind and sentence.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casaspawner.catalog.model import Catalog, load_catalog
from casaspawner.datasets.archive import AlmaDataLinkClient, ArchiveClient
from casaspawner.datasets.cache import Key, ResolutionCache, recording
from casaspawner.datasets.layout import MEMBER_DIR
from casaspawner.datasets.model import Evidence, Resolution
from casaspawner.datasets.resolve import resolve_path, resolve_target
from casaspawner.datasets.storage import STORAGE
from casaspawner.errors import (
    ArchiveUnavailable,
    CasaspawnerError,
    InvalidInput,
    ResolutionError,
    VersionUnknown,
    shown,
)

#: The error classes a worker may name, so that the parent raises the same kind.
ERRORS: dict[str, type[CasaspawnerError]] = {
    cls.__name__: cls
    for cls in (InvalidInput, ResolutionError, ArchiveUnavailable, CasaspawnerError)
}


@dataclass(frozen=True)
class WorkerLimits:
    """What one resolution may cost: wall time, CPU time and address space."""

    deadline: float = 60.0
    cpu_seconds: int = 30
    memory_bytes: int = 2 << 30


@dataclass(frozen=True)
class RunAs:
    """The user a worker runs as, on a hub running as root."""

    uid: int
    gid: int
    supplemental_gids: tuple[int, ...] = ()


class WorkerFailed(RuntimeError):
    """The worker ended without an answer; ``stderr`` is the end of what it wrote."""

    def __init__(self, detail: str, stderr: str) -> None:
        super().__init__(detail)
        self.stderr = stderr


async def resolve_in_worker(
    target: Path | str,
    label: str,
    catalog: Catalog,
    *,
    catalog_path: str | None = None,
    archive: ArchiveClient | None = None,
    limits: WorkerLimits = WorkerLimits(),
    user: RunAs | None = None,
    python: str = sys.executable,
    pythonpath: str | None = None,
    cache: ResolutionCache | None = None,
) -> Resolution:
    """Resolve a dataset directory (a ``Path``) or an ALMA identifier in a worker process.

    ``label`` names the dataset in sentences and in the result. The worker gets ``limits``;
    past the deadline it is killed and the user gets one sentence. ``archive`` is how the worker
    looks identifiers up; ``catalog_path`` is the operator's catalog, if any (copied for the
    worker, which may run as another user). An operator's own archive client, an object a worker
    cannot be given, looks identifiers up in a thread of this process instead. With ``cache``, a
    dataset directory resolved before and unchanged since is answered from it, and no worker
    starts (:mod:`casaspawner.datasets.cache`).
    """
    name = shown(label)
    if (
        isinstance(target, str)
        and archive is not None
        and not isinstance(archive, AlmaDataLinkClient)
    ):
        return await asyncio.wait_for(
            asyncio.to_thread(_in_thread, target, catalog, archive), limits.deadline
        )
    with contextlib.ExitStack() as stack:
        args = ["--label", label]
        fds: tuple[int, ...] = ()
        link: Path | None = None
        key: Key | None = None
        if isinstance(target, Path):
            # The directory is opened, and its kept resolution looked up, from the hub's
            # storage threads.
            opened = functools.partial(
                _open_and_look, target, cache, label, catalog, catalog_path, user
            )
            fd, key, kept = await STORAGE.call(
                opened,
                deadline=limits.deadline,
                what=repr(name),
                late=lambda result: os.close(result[0]),
            )
            stack.callback(os.close, fd)
            fds = (fd,)
            if kept is not None:
                return kept
            if cache is not None:
                args.append("--footprint")
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="casaspawner-")))
        # The worker reads it; only the hub writes it.
        os.chmod(scratch, 0o755)  # noqa: S103
        if isinstance(target, Path):
            # The directory under its own name when that matters to the resolver.
            link = scratch / (target.name if MEMBER_DIR.fullmatch(target.name) else "dataset")
            link.symlink_to(f"/proc/self/fd/{fd}")
            args += ["--dir", str(link)]
        else:
            args += ["--identifier", target]
            if isinstance(archive, AlmaDataLinkClient):
                args += ["--archive-url", archive.base_url, "--archive-timeout"]
                args += [str(archive.timeout), "--archive-cache", str(archive.cache_dir)]
        if catalog_path:
            copy = scratch / "releases.yaml"
            copy.write_bytes(Path(catalog_path).read_bytes())
            copy.chmod(0o644)
            args += ["--catalog", str(copy)]
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "LC_ALL": "C.UTF-8",
            "HOME": "/",
        }
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        for proxy in ("https_proxy", "http_proxy", "no_proxy", "SSL_CERT_FILE"):
            if proxy in os.environ:
                env[proxy] = os.environ[proxy]
        started = time.time()
        process = await asyncio.create_subprocess_exec(
            python,
            "-s",
            "-m",
            "casaspawner.datasets.worker",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd="/",
            env=env,
            pass_fds=fds,
            preexec_fn=limited(limits, user),
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), limits.deadline)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise InvalidInput(
                f"Reading {name} took longer than {limits.deadline:g} seconds; give the "
                "directory of one ALMA dataset (a member.uid___… directory)."
            ) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
    answer = stdout.decode(errors="replace")
    if link is not None:
        # Sentences name the dataset as the user did, never the worker's link.
        answer = answer.replace(json.dumps(str(link))[1:-1], json.dumps(name)[1:-1])
    resolution = _answer(process.returncode, answer, stderr, label, catalog)
    if cache is not None and key is not None:
        cache.store(key, _footprint(answer), started, resolution, catalog)
    return resolution


def look_up(
    cache: ResolutionCache,
    fd: int,
    name: str,
    label: str,
    catalog: Catalog,
    catalog_path: str | None = None,
    user: RunAs | None = None,
) -> tuple[Key | None, Resolution | None]:
    """The cache's key of the dataset directory open as ``fd``, and its kept resolution.

    The key is None if it cannot be had, the resolution None unless kept and unchanged. The
    arguments are :func:`resolve_in_worker`'s. Blocking: for the hub's storage threads.
    """
    ids = None if user is None else (user.uid, user.gid, user.supplemental_gids)
    try:
        key = cache.key(fd, name, label, catalog_path, ids)
    except OSError:
        return None, None
    return key, cache.peek(key, fd, catalog)


def _open_and_look(
    target: Path,
    cache: ResolutionCache | None,
    label: str,
    catalog: Catalog,
    catalog_path: str | None,
    user: RunAs | None,
) -> tuple[int, Key | None, Resolution | None]:
    """Open the dataset directory, and look up its key and kept resolution in ``cache``.

    Blocking, as it looks at the storage: for the hub's storage threads.
    """
    fd = os.open(target, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
    if cache is None:
        return fd, None, None
    try:
        return fd, *look_up(cache, fd, target.name, label, catalog, catalog_path, user)
    except BaseException:
        os.close(fd)
        raise


def _footprint(answer: str) -> object:
    """The footprint in a worker's answer, unchecked; None if there is none."""
    try:
        found = json.loads(answer)
    except ValueError:
        return None
    return found.get("footprint") if isinstance(found, dict) else None


def _in_thread(target: str, catalog: Catalog, archive: ArchiveClient) -> Resolution:
    with tempfile.TemporaryDirectory() as empty:
        return resolve_target(target, catalog, archive=archive, base=Path(empty))


def limited(
    limits: WorkerLimits, user: RunAs | None, *, soft_only: bool = False
) -> Callable[[], None]:
    """What the worker runs before Python starts: its limits, then the user's ids.

    ``soft_only`` leaves the hard limits as they were, for a worker that lifts its limits before
    it starts what outlives it (:mod:`casaspawner.local.formruns`).
    """

    def preexec() -> None:
        cpu = max(int(limits.cpu_seconds), 1)
        if soft_only:
            for kind, value in (
                (resource.RLIMIT_CPU, cpu),
                (resource.RLIMIT_AS, limits.memory_bytes),
                (resource.RLIMIT_CORE, 0),
            ):
                hard = resource.getrlimit(kind)[1]
                unlimited = hard == resource.RLIM_INFINITY
                resource.setrlimit(kind, (value if unlimited else min(value, hard), hard))
        else:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if user is not None:
            os.setgroups(list(user.supplemental_gids))
            os.setgid(user.gid)
            os.setuid(user.uid)

    return preexec


def _answer(
    status: int | None, stdout: str, stderr: bytes, label: str, catalog: Catalog
) -> Resolution:
    """The worker's answer as a ``Resolution``, or its sentence as the error it was."""
    name = shown(label)
    text = stderr.decode(errors="replace")[-2000:]
    if status in (-signal.SIGXCPU, -signal.SIGKILL) or "MemoryError" in text:
        raise InvalidInput(
            f"Reading {name} needed more computing time or memory than the evidence of an ALMA "
            "dataset ever does; give the directory of one ALMA dataset."
        )
    try:
        found = json.loads(stdout) if stdout.strip() else {}
    except ValueError:
        found = {}
    if not isinstance(found, dict):
        found = {}
    error = found.get("error")
    if status == 2 and isinstance(error, dict):
        if error.get("kind") == "VersionUnknown":
            raise VersionUnknown(str(error.get("finding")), str(error.get("advice")))
        kind = ERRORS.get(str(error.get("kind")), CasaspawnerError)
        raise kind(str(error.get("sentence")))
    try:
        if status != 0:
            raise ValueError(f"exit status {status}")
        evidence = found["evidence"]
        return Resolution(
            label,
            Evidence(
                evidence["kind"],
                evidence["path"],
                evidence["casa"],
                evidence["pipeline"],
                evidence["pipeline_unreadable"],
                evidence["sha256"],
            ),
            catalog.get(str(found["release"])),
            found["exact"] is True,
            str(found["reason"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise WorkerFailed(f"the resolver's answer is unusable ({exc})", text) from None


# The worker itself


def _print_resolution(resolution: Resolution, footprint: list[Any] | None = None) -> None:
    evidence = resolution.evidence
    answer: dict[str, Any] = {
        "evidence": {
            "kind": evidence.kind,
            "path": evidence.path,
            "casa": evidence.casa,
            "pipeline": evidence.pipeline,
            "pipeline_unreadable": evidence.pipeline_unreadable,
            "sha256": evidence.sha256,
        },
        "release": resolution.release.id,
        "exact": resolution.exact,
        "reason": resolution.reason,
    }
    if footprint is not None:
        answer["footprint"] = footprint
    print(json.dumps(answer))


def _print_error(exc: CasaspawnerError) -> None:
    error: dict[str, Any] = {"kind": type(exc).__name__, "sentence": str(exc)}
    if isinstance(exc, VersionUnknown):
        error.update(finding=exc.finding, advice=exc.advice)
    else:
        kinds = [cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in ERRORS]
        error["kind"] = kinds[0] if kinds else "CasaspawnerError"
    print(json.dumps({"error": error}))


def main(argv: Sequence[str] | None = None) -> int:
    """Resolve one dataset as the parent asked; exit 0 with the resolution, 2 with an error."""
    parser = argparse.ArgumentParser(prog="python -m casaspawner.datasets.worker")
    parser.add_argument("--label", required=True)
    parser.add_argument("--dir")
    parser.add_argument("--identifier")
    parser.add_argument("--catalog")
    parser.add_argument("--archive-url")
    parser.add_argument("--archive-timeout", type=float, default=10.0)
    parser.add_argument("--archive-cache")
    # Record what the resolution looked at (datasets.cache).
    parser.add_argument("--footprint", action="store_true")
    args = parser.parse_args(argv)
    footprint = None
    try:
        catalog = load_catalog(args.catalog)
        if args.dir and args.footprint:
            with recording() as recorder:
                resolution = resolve_path(args.dir, catalog, label=args.label)
            footprint = recorder.footprint()
        elif args.dir:
            resolution = resolve_path(args.dir, catalog, label=args.label)
        else:
            archive = None
            if args.archive_url:
                cache = Path(args.archive_cache) if args.archive_cache else None
                archive = AlmaDataLinkClient(
                    args.archive_url, timeout=args.archive_timeout, cache_dir=cache
                )
            with tempfile.TemporaryDirectory() as empty:
                resolution = resolve_target(
                    args.identifier, catalog, archive=archive, base=Path(empty)
                )
    except CasaspawnerError as exc:
        _print_error(exc)
        return 2
    _print_resolution(resolution, footprint)
    return 0


if __name__ == "__main__":
    sys.exit(main())

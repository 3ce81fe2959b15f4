"""Write the session's reproducibility record into the user's storage, as the user.

The hub puts the record (an RO-Crate's JSON-LD, built by ``casaspawner.session.record``) in
``$CASASPAWNER_RECORD``, compressed and base64-encoded, and its directory in
``$CASASPAWNER_RECORD_DIR``. This Jupyter server extension, running as the session's user, writes
``ro-crate-metadata.json`` there when the server starts, then adds what only the session can see:
the sha256 and size of the evidence file that decided the build, and the version of the measures
data it reads. On Kubernetes it then asks the hub for the image's digest, which the hub reads from
the pod's status once the pod runs. When the server stops it completes the record with the end
time. ``python -m casaspawner.insession.record stop <dir>`` completes a record whose session could
not (the local spawner runs it, as the user, after the session's process ended).

Nothing here imports the hub side of casaspawner. A record that cannot be written is logged and
the session runs on.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote
from urllib.request import ProxyHandler, Request, build_opener

from casaspawner.runtime import (
    RECORD_ACTION_ID,
    RECORD_DIR_ENV,
    RECORD_ENV,
    RECORD_EVIDENCE_ID,
    RECORD_FILE,
    RECORD_MEASURES_ID,
    RECORD_RUNTIME_ID,
    RUN_IMAGE_KEY_ENV,
    RUN_IMAGE_KEY_HEADER,
    RUN_IMAGE_URL_ENV,
    record_from_text,
)

ACTIVE = "http://schema.org/ActiveActionStatus"
COMPLETED = "http://schema.org/CompletedActionStatus"
FAILED = "http://schema.org/FailedActionStatus"
#: The largest evidence file hashed, in bytes: a packed weblog is tens to hundreds of MiB.
HASH_LIMIT = 2 << 30
_VERSION_LINE = re.compile(r"^\s*#?\s*version\s*[:=]\s*(\S.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_LOCK = threading.Lock()
_SHA256 = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
#: How long a session asks the hub for its image's digest, and how often, in seconds.
DIGEST_WAIT = 300.0
DIGEST_EVERY = 3.0


def now_text() -> str:
    """The time now in UTC, as the record writes times."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def entity(record: Mapping[str, Any], entity_id: str) -> dict[str, Any] | None:
    """The record's entity with this ``@id``, or None."""
    for item in record.get("@graph", []):
        if isinstance(item, dict) and item.get("@id") == entity_id:
            return item
    return None


def local_path(url: object) -> Path | None:
    """The path of a ``file://`` URL, or None for anything else."""
    if isinstance(url, str) and url.startswith("file:///"):
        return Path(unquote(url[len("file://") :]))
    return None


def file_sha256(path: Path, limit: int = HASH_LIMIT) -> tuple[str, int] | None:
    """The sha256 and size of a regular file, or None when it cannot be read or is too large.

    A FIFO or a device in its place is opened without waiting and never read: it could block
    or never end.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as handle:
        try:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        except OSError:
            return None
    return digest.hexdigest(), size


def measures_version(path: Path) -> str | None:
    """The version of a CASA measures tree, from what its installers leave beside it.

    casaconfig and casarundata write ``readme.txt`` files naming their version; the ``casadata``
    package is named by its ``.dist-info``. None when nothing says.
    """
    for readme, what in (
        (path / "readme.txt", "data"),
        (path / "geodetic/readme.txt", "measures"),
    ):
        try:
            text = readme.read_text(errors="replace")[:4096]
        except OSError:
            continue
        found = _VERSION_LINE.search(text)
        if found:
            return f"{what} {found.group(1)}"
    for parent in list(path.parents)[:2]:
        try:
            infos = sorted(parent.glob("casadata-*.dist-info"))
        except OSError:
            infos = []
        if infos:
            return "casadata " + infos[-1].name.removeprefix("casadata-").removesuffix(
                ".dist-info"
            )
    return None


def write_record(directory: Path, record: Mapping[str, Any]) -> Path:
    """Write the record's file atomically, creating its directory private to the user."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = directory / RECORD_FILE
    fd, temporary = tempfile.mkstemp(prefix=".record-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, ensure_ascii=False)
            handle.write("\n")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def read_record(directory: Path) -> dict[str, Any] | None:
    """The record in ``directory``, or None when there is none to read."""
    try:
        record = json.loads((directory / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def observe(record: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Add what the session sees: the evidence file's sha256 and the measures' version."""
    evidence = entity(record, RECORD_EVIDENCE_ID)
    if evidence is not None and "sha256" not in evidence:
        path = local_path(evidence.get("contentUrl"))
        hashed = file_sha256(path) if path is not None else None
        if hashed is not None:
            evidence["sha256"], evidence["contentSize"] = hashed[0], str(hashed[1])
        elif path is not None:
            evidence["description"] = (
                f"{evidence.get('description', '')} The session could not read it to hash it."
            ).strip()
    measures = entity(record, RECORD_MEASURES_ID)
    if measures is not None:
        path = local_path(measures.get("contentUrl"))
        seen = environ.get("CASA_MEASURES_PATH")
        if seen:
            path = Path(seen)
            measures["contentUrl"] = "file://" + seen.rstrip("/") + "/"
        version = measures_version(path) if path is not None else None
        measures["version"] = version or "unknown: the measures tree names no version"
    return record


def start(environ: Mapping[str, str]) -> Path | None:
    """Write the record when the session starts, then add what the session sees.

    Returns the record's directory, or None when the hub asked for no record. A record already
    there (the server started again in the same session) is kept, and is open again until the
    server stops.
    """
    text, directory = environ.get(RECORD_ENV), environ.get(RECORD_DIR_ENV)
    if not text or not directory:
        return None
    where = Path(directory)
    with _LOCK:
        record = read_record(where)
        if record is None:
            record = record_from_text(text)
        action = entity(record, RECORD_ACTION_ID)
        if action is not None and action.pop("endTime", None) is not None:
            action["actionStatus"] = {"@id": ACTIVE}
        write_record(where, record)
    observed = observe(record, environ)
    with _LOCK:
        write_record(where, observed)
    return where


def complete(directory: Path, status: str = COMPLETED, error: str | None = None) -> bool:
    """Add the end time to the record in ``directory``, once.

    A failed action (``FAILED``) also says why in ``error``. Returns whether the record was
    changed.
    """
    with _LOCK:
        record = read_record(directory)
        action = entity(record, RECORD_ACTION_ID) if record is not None else None
        if record is None or action is None or action.get("endTime"):
            return False
        action["endTime"] = now_text()
        action["actionStatus"] = {"@id": status}
        if error:
            action["error"] = error
        write_record(directory, record)
        return True


def hub_image_digest(environ: Mapping[str, str], timeout: float = 5.0) -> str | None:
    """The image digest the hub read from the pod's status, as 64 hex digits, or None.

    The session asks the hub's REST API for its own server's model with its own
    ``$JUPYTERHUB_API_TOKEN`` (``CASASpawner`` gives it ``read:servers!server``); the hub puts the
    digest beside the summary, ``user_options["casaspawner"]["image_digest"]``, once the pod runs.
    """
    api, token = environ.get("JUPYTERHUB_API_URL"), environ.get("JUPYTERHUB_API_TOKEN")
    user = environ.get("JUPYTERHUB_USER")
    if not api or not token or not user:
        return None
    url = f"{api.rstrip('/')}/users/{quote(user, safe='')}"
    model = _ask_hub(url, {"Authorization": f"token {token}"}, timeout)
    try:
        server = model["servers"][environ.get("JUPYTERHUB_SERVER_NAME", "")]
        digest = server["user_options"]["casaspawner"]["image_digest"]
    except (KeyError, TypeError):
        return None
    return _sha256(digest)


def run_image_digest(environ: Mapping[str, str], timeout: float = 5.0) -> str | None:
    """A Kubernetes run's image digest, which the hub read from its pod's status, or None.

    The run's pod asks ``$CASASPAWNER_RUN_IMAGE_URL`` with ``$CASASPAWNER_RUN_IMAGE_KEY``, which
    the hub put in the pod's spec (``casaspawner.services.runs.RunImageHandler``).
    """
    url, key = environ.get(RUN_IMAGE_URL_ENV), environ.get(RUN_IMAGE_KEY_ENV)
    if not url or not key:
        return None
    answer = _ask_hub(url, {RUN_IMAGE_KEY_HEADER: key}, timeout)
    return _sha256(answer.get("digest")) if isinstance(answer, dict) else None


def _ask_hub(url: str, headers: Mapping[str, str], timeout: float) -> Any:
    """The JSON the hub answers ``url`` with, or None when it does not answer with 200."""
    if not url.startswith(("http://", "https://")):
        return None
    # http or https only, checked above.
    request = Request(url, headers=dict(headers))  # noqa: S310
    # The hub is asked directly, never through a proxy the session's environment names.
    opener = build_opener(ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            if response.status != 200:
                return None
            return json.loads(response.read(1 << 20))
    except (OSError, ValueError):
        return None


def _sha256(digest: object) -> str | None:
    """The 64 hex digits of a ``sha256:…`` digest, or None."""
    found = _SHA256.fullmatch(digest) if isinstance(digest, str) else None
    return found.group(1) if found else None


def add_image_digest(directory: Path, digest: str) -> bool:
    """Put the image's digest on the record's image, once; whether the record changed."""
    with _LOCK:
        record = read_record(directory)
        image = entity(record, RECORD_RUNTIME_ID) if record is not None else None
        if record is None or image is None or image.get("@type") != "ContainerImage":
            return False
        if image.get("sha256"):
            return False
        image["sha256"] = digest
        image["description"] = (
            "The image that ran; sha256 is its digest, from the pod's status (imageID)."
        )
        write_record(directory, record)
        return True


def needs_image_digest(directory: Path) -> bool:
    """Whether the record names a container image without its digest."""
    record = read_record(directory)
    image = entity(record, RECORD_RUNTIME_ID) if record is not None else None
    return bool(image and image.get("@type") == "ContainerImage" and not image.get("sha256"))


def watch_image_digest(
    directory: Path,
    ask: Callable[[], str | None],
    stopping: threading.Event,
    wait: float = DIGEST_WAIT,
    every: float = DIGEST_EVERY,
) -> bool:
    """Ask the hub for the image's digest until it answers, the session stops or time is up."""
    deadline = time.monotonic() + wait
    while needs_image_digest(directory) and not stopping.is_set():
        digest = ask()
        if digest is not None:
            return add_image_digest(directory, digest)
        if time.monotonic() > deadline:
            return False
        stopping.wait(every)
    return False


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "casaspawner.insession.record"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Start writing the record beside the server, and complete it when the server exits."""
    environ = dict(os.environ)
    directory = environ.get(RECORD_DIR_ENV)
    if not environ.get(RECORD_ENV) or not directory:
        return
    log = serverapp.log
    stopping = threading.Event()

    def run() -> None:
        try:
            start(environ)
            log.info("The session's record is in %s", directory)
            if watch_image_digest(Path(directory), lambda: hub_image_digest(environ), stopping):
                log.info("The session's record names its image's digest")
        except Exception as exc:
            log.warning("The session's record could not be written in %s: %s", directory, exc)

    thread = threading.Thread(target=run, name="casaspawner-record", daemon=True)
    thread.start()

    def finish() -> None:
        stopping.set()
        thread.join(timeout=10)
        try:
            complete(Path(directory))
        except Exception as exc:
            log.warning("The session's record could not be completed: %s", exc)

    atexit.register(finish)


def main(argv: list[str] | None = None) -> int:
    """``stop <directory>``: complete a record whose session ended without doing so."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "stop":
        print("usage: python -m casaspawner.insession.record stop <directory>", file=sys.stderr)
        return 2
    try:
        complete(Path(args[1]))
    except OSError as exc:
        print(f"The record in {args[1]} could not be completed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

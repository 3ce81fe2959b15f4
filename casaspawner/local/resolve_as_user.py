"""Reading a dataset as the session's user, for a hub running as root.

Root never reads a user's dataset itself: ``casaspawner resolve DIR --json`` runs as the user,
with their groups, on the directory the storage reader checked (handed over as an open
descriptor). A link the user swaps in after the reader's checks, or a file they could not read
themselves, can then never make root read anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from casaspawner.catalog.model import Catalog
from casaspawner.datasets.layout import MEMBER_DIR
from casaspawner.datasets.model import Evidence, Resolution
from casaspawner.errors import InvalidInput, ResolutionError, VersionUnknown, shown
from casaspawner.plan import Identity


class ResolverFailed(RuntimeError):
    """The resolver run as the user failed without a sentence for the user.

    ``stderr`` holds the end of what it wrote, for the hub's log.
    """

    def __init__(self, detail: str, stderr: str) -> None:
        super().__init__(detail)
        self.stderr = stderr


def resolve_as_user(
    path: Path,
    label: str,
    identity: Identity,
    *,
    python: str,
    package_dir: Path,
    catalog: Catalog,
    catalog_path: str | None,
    timeout: float,
) -> Resolution:
    """Resolve the dataset directory ``path`` in a child process running as ``identity``.

    ``package_dir`` holds a copy of casaspawner the user can read. ``catalog_path`` is the
    operator's own catalog, copied for the user when set.
    """
    name = shown(label)
    # The directory the reader checked, held open and handed to the child. The child sees it under
    # its own name when that matters to the resolver, for a member.uid___… directory.
    fd = os.open(path, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with tempfile.TemporaryDirectory(prefix="casaspawner-resolve-") as scratch:
            # The user reads it; only the hub writes it.
            os.chmod(scratch, 0o755)  # noqa: S103
            link = Path(scratch) / (path.name if MEMBER_DIR.fullmatch(path.name) else "dataset")
            link.symlink_to(f"/proc/self/fd/{fd}")
            cmd = [
                python,
                "-s",
                "-m",
                "casaspawner",
                "resolve",
                str(link),
                "--json",
                "--error-json",
            ]
            # The operator's catalog may be private: a copy the user can read.
            if catalog_path:
                copy = Path(scratch) / "releases.yaml"
                copy.write_bytes(Path(catalog_path).read_bytes())
                copy.chmod(0o644)
                cmd += ["--catalog", str(copy)]
            env = {
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(package_dir),
                "PYTHONNOUSERSITE": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                "LC_ALL": "C.UTF-8",
                "HOME": "/",
            }
            try:
                result = subprocess.run(
                    cmd,
                    env=env,
                    cwd="/",
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    user=identity.uid,
                    group=identity.gid,
                    extra_groups=list(identity.supplemental_gids),
                    pass_fds=(fd,),
                )
            except subprocess.TimeoutExpired:
                raise InvalidInput(
                    f"Reading {name} took longer than {timeout:g} seconds; give the directory of "
                    "one ALMA dataset (a member.uid___… directory)."
                ) from None
    finally:
        os.close(fd)
    return _resolution(result, label, str(link), catalog)


def _resolution(
    result: subprocess.CompletedProcess[str], label: str, link: str, catalog: Catalog
) -> Resolution:
    """Turn the child's answer into a ``Resolution``, or raise its sentence.

    The sentence is raised as the error it was.
    """
    name = shown(label)

    # The sentences name the dataset as the user did, as they read in the hub.
    def relabel(text: str) -> str:
        return text.replace(link, name)

    try:
        answer = json.loads(result.stdout) if result.stdout.strip() else {}
    except ValueError:
        answer = {}
    if result.returncode == 2:
        sentence = str(answer.get("error") or result.stderr.strip().removeprefix("casaspawner: "))
        if answer.get("kind") == "VersionUnknown":
            raise VersionUnknown(relabel(str(answer.get("finding"))), str(answer.get("advice")))
        if answer.get("kind") == "ResolutionError":
            raise ResolutionError(relabel(sentence))
        raise InvalidInput(relabel(sentence) or f"{name} could not be read as a dataset.")
    try:
        if result.returncode != 0:
            raise ValueError(f"exit status {result.returncode}")
        evidence = Evidence(
            answer["evidence"]["kind"],
            answer["evidence"]["path"],
            answer["processed_with"]["casa"],
            answer["processed_with"]["pipeline"],
        )
        release = catalog.get(str(answer["release"]))
        return Resolution(label, evidence, release, answer["exact"] is True, str(answer["reason"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ResolverFailed(
            f"the resolver's answer is unusable ({exc})", result.stderr[-2000:]
        ) from None

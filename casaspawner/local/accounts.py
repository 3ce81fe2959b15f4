"""Local accounts and groups for sessions on a hub running as root.

A hub running as root gives each user a local account on first login, with ``useradd``, as The
Littlest JupyterHub does. Each project gets a local group. Session directories are handed to them.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from casaspawner.errors import CasaspawnerError, InvalidInput

#: What ``useradd`` and ``groupadd`` accept as a name.
SYSTEM_NAME = re.compile(r"[a-z_][a-z0-9_.\-]{0,31}")


def running_as_root() -> bool:
    """Whether the hub runs as root, and so manages local accounts."""
    return os.geteuid() == 0


#: Held while this hub process creates or changes local accounts and groups.
#:
#: Hub requests do that in worker threads (``asyncio.to_thread``), and two useradd, groupadd or
#: usermod runs at once fail on each other's locks.
_ACCOUNTS_LOCK = threading.Lock()


class AccountError(CasaspawnerError):
    """A local account or group could not be created or joined.

    Only a hub running as root creates or joins them.
    """


def _passwd(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _group(name: str) -> grp.struct_group | None:
    try:
        return grp.getgrnam(name)
    except KeyError:
        return None


def _administer(cmd: list[str], done: Callable[[], bool], failure: str) -> None:
    """Run ``cmd`` a few times, unless or until ``done()``.

    ``cmd`` is useradd, groupadd or usermod. Another program may hold the lock of ``/etc/passwd``
    or ``/etc/group`` for a moment, or have made the same change meanwhile ("already exists"). A
    failure is an ``AccountError``: ``failure`` and the tool's last line.
    """
    why = "no reason given"
    for attempt in range(4):
        if done():
            return
        if attempt:
            time.sleep(0.25 * attempt)
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            lines = result.stderr.strip().splitlines() or [
                f"{cmd[0]} exited with status {result.returncode}"
            ]
            why = lines[-1]
        except (OSError, subprocess.SubprocessError) as exc:
            why = f"{cmd[0]}: {getattr(exc, 'strerror', None) or exc}"
    if not done():
        raise AccountError(f"{failure}: {why.rstrip('.')}.")


def ensure_account(name: str, home: str, comment: str) -> pwd.struct_passwd:
    """Return the local account ``name``, created if missing.

    Root only. ``useradd`` creates the account with the home ``home``, but not the directory.
    """
    account = _passwd(name)
    if account is not None:
        return account
    if not SYSTEM_NAME.fullmatch(name):
        raise InvalidInput(f"{name!r} cannot be a local account name.")
    cmd = [
        "useradd",
        "--home-dir",
        home,
        "--no-create-home",
        "--shell",
        "/bin/bash",
        "--user-group",
    ]
    with _ACCOUNTS_LOCK:
        _administer(
            [*cmd, "--comment", comment, name],
            lambda: _passwd(name) is not None,
            f"The local account {name} could not be created",
        )
    return pwd.getpwnam(name)


def ensure_group(name: str, member: str) -> int:
    """Return the gid of the local group ``name``, with ``member`` in it.

    Root only. ``groupadd`` creates the group if missing, and ``usermod -a -G`` adds the account
    ``member``.
    """
    entry = _group(name)
    if entry is not None and member in entry.gr_mem:
        return entry.gr_gid
    with _ACCOUNTS_LOCK:
        _administer(
            ["groupadd", name],
            lambda: _group(name) is not None,
            f"The local group {name} could not be created",
        )
        _administer(
            ["usermod", "-a", "-G", name, member],
            lambda: member in (_group(name) or grp.struct_group(("", "", 0, []))).gr_mem,
            f"{member} could not be added to the local group {name}",
        )
    return grp.getgrnam(name).gr_gid


def prepare_owned_dir(path: Path, uid: int, gid: int, mode: int) -> None:
    """Create the directory ``path`` and, as root, give it to ``uid:gid``.

    Its parents are the hub's. ``mode`` is set only on a directory the hub creates or, as root,
    takes over, one that was not ``uid:gid``'s. A user's own ``chmod`` of their directory stays.
    Never through a link: a link there is refused, not followed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Private until it has its owner and mode.
            path.mkdir(mode=0o700)
            created = True
        except FileExistsError:
            created = False
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise InvalidInput(
                f"{path} is not a directory (a link?); the session's storage cannot be prepared."
            )
        taken_over = running_as_root() and (info.st_uid, info.st_gid) != (uid, gid)
        if taken_over:
            os.chown(path, uid, gid, follow_symlinks=False)
        if created or taken_over:
            # A directory, not a link: checked above, and its parent is the hub's.
            os.chmod(path, mode)
    except OSError as error:
        raise InvalidInput(
            f"The session's directory {path} cannot be prepared: {error.strerror or error}."
        ) from None

"""Local accounts and groups for sessions on a hub running as root.

A hub running as root gives each user a local account on first login (``useradd``, as The
Littlest JupyterHub does), and each project a local group; session directories are handed to them.
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
    """Whether the hub runs as root (and so manages local accounts)."""
    return os.geteuid() == 0


#: Held while this hub process creates or changes local accounts and groups: hub requests run that in worker
#: threads (``asyncio.to_thread``), and useradd/groupadd/usermod of two at once fail on each other's locks.
_ACCOUNTS_LOCK = threading.Lock()


class AccountError(CasaspawnerError):
    """A local account or group could not be created or joined (a hub running as root)."""


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
    """Run ``cmd`` (useradd, groupadd, usermod) unless or until ``done()``, a few times: another program may
    hold the lock of ``/etc/passwd`` or ``/etc/group`` for a moment, or have made the same change meanwhile
    ("already exists"). A failure is an ``AccountError``: ``failure`` and the tool's last line."""
    why = "no reason given"
    for attempt in range(4):
        if done():
            return
        if attempt:
            time.sleep(0.25 * attempt)
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            lines = result.stderr.strip().splitlines() or [f"{cmd[0]} exited with status {result.returncode}"]
            why = lines[-1]
        except (OSError, subprocess.SubprocessError) as exc:
            why = f"{cmd[0]}: {getattr(exc, 'strerror', None) or exc}"
    if not done():
        raise AccountError(f"{failure}: {why.rstrip('.')}.")


def ensure_account(name: str, home: str, comment: str) -> pwd.struct_passwd:
    """The local account ``name``, created (``useradd``, home ``home``, not created) if missing; root only."""
    account = _passwd(name)
    if account is not None:
        return account
    if not SYSTEM_NAME.fullmatch(name):
        raise InvalidInput(f"{name!r} cannot be a local account name.")
    cmd = ["useradd", "--home-dir", home, "--no-create-home", "--shell", "/bin/bash", "--user-group"]
    with _ACCOUNTS_LOCK:
        _administer(
            [*cmd, "--comment", comment, name],
            lambda: _passwd(name) is not None,
            f"The local account {name} could not be created",
        )
    return pwd.getpwnam(name)


def ensure_group(name: str, member: str) -> int:
    """The gid of the local group ``name``, created (``groupadd``) if missing, with the account ``member`` in it
    (``usermod -a -G``); root only."""
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
    """Create ``path`` (its parents are the hub's) and, as root, give it to ``uid:gid``.

    ``mode`` is set only on a directory the hub creates or, as root, takes over (one that was not ``uid:gid``'s):
    a user's own ``chmod`` of their directory stays. Never through a link: a link there is refused, not followed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)  # private until it has its owner and mode
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
            os.chmod(path, mode)  # a directory, not a link (checked above; its parent is the hub's)
    except OSError as error:
        raise InvalidInput(
            f"The session's directory {path} cannot be prepared: {error.strerror or error}."
        ) from None



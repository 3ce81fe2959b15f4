"""Local accounts and groups for sessions on a hub running as root.

A hub running as root gives each user a local account on first login, with ``useradd``, as The
Littlest JupyterHub does. Each project gets a local group. Session directories are handed to them.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from casaspawner.errors import CasaspawnerError, InvalidInput, shown

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


def local_name(template: str, field: str, value: str) -> str:
    """The local account or group name of a hub name, at most 32 characters.

    ``template`` has the one field ``field``. A name that already is a lowercase system name is
    kept. Any other (capitals, other characters, too long) becomes its safe lowercase beginning
    and a short hash of the exact hub name, so that ``Proj`` and ``proj``, or two long names with
    one beginning, never share a local name. Whether a local name really belongs to a hub name is
    still checked against the account's or group's marker (:func:`ensure_account`,
    :func:`ensure_group`), so even a crafted name never takes over another's.
    """
    direct = template.format(**{field: value})
    if SYSTEM_NAME.fullmatch(direct):
        return direct
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    safe = re.sub(r"[^a-z0-9_.-]", "-", direct.lower())
    if not re.match(r"[a-z_]", safe):
        safe = "x" + safe
    return f"{safe[: 32 - len(digest) - 1]}-{digest}"


def login_defs(key: str, default: int) -> int:
    """A number from ``/etc/login.defs``, such as ``UID_MIN``; ``default`` when not set."""
    try:
        with open("/etc/login.defs") as handle:
            for line in handle:
                words = line.split()
                if len(words) == 2 and words[0] == key and words[1].isdigit():
                    return int(words[1])
    except OSError:
        pass
    return default


def account_marker(hub_name: str) -> str:
    """The comment of the local account the hub made for ``hub_name``."""
    return f"casaspawner session user {hub_name}"


def usable_account(account: pwd.struct_passwd, hub_name: str, *, made_here: bool) -> None:
    """Refuse an account that is a system account, or that this hub did not make for this name.

    ``made_here``: the hub manages accounts (``create_system_users``), so the account must carry
    the marker the hub gives its own. Otherwise the site manages them, and only system accounts
    (uids below ``UID_MIN``) are refused.
    """
    if not login_defs("UID_MIN", 1000) <= account.pw_uid <= login_defs("UID_MAX", 60000):
        raise InvalidInput(
            f"The local account {account.pw_name} is a system account; sessions of "
            f"{shown(hub_name)} never run as it."
        )
    if made_here and account.pw_gecos.split(",", 1)[0] != account_marker(hub_name):
        raise InvalidInput(
            f"The local account {account.pw_name} exists but this hub did not make it for "
            f"{shown(hub_name)}; ask the hub's administrators."
        )


def ensure_account(name: str, hub_name: str, home: str) -> pwd.struct_passwd:
    """Return the local account ``name`` of ``hub_name``, created if missing; root only.

    ``useradd`` creates it with the home ``home``, but not the directory, and marks it as made
    for ``hub_name``. An existing account is used only if this hub made it for ``hub_name``.
    """
    if not SYSTEM_NAME.fullmatch(name):
        raise InvalidInput(f"{shown(name)!r} cannot be a local account name.")
    with _ACCOUNTS_LOCK:
        if _passwd(name) is None:
            _administer(
                [
                    "useradd",
                    "--home-dir",
                    home,
                    "--no-create-home",
                    "--shell",
                    "/bin/bash",
                    "--user-group",
                    "--comment",
                    account_marker(hub_name),
                    name,
                ],
                lambda: _passwd(name) is not None,
                f"The local account {name} could not be created",
            )
    account = pwd.getpwnam(name)
    usable_account(account, hub_name, made_here=True)
    return account


class GroupRegistry:
    """Which local group this hub made for which hub group, in one JSON file only root writes.

    Groups carry no comment to mark them, so the registry is their marker: a group is used only
    when the registry names it for that very hub group.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, tuple[str, int]]:
        """Local group name → (hub group, gid) of every group this hub made."""
        try:
            found = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AccountError(
                f"The hub's record of its local groups, {self.path}, cannot be read ({exc})."
            ) from None
        groups = found.get("groups") if isinstance(found, dict) else None
        if not isinstance(groups, dict):
            raise AccountError(
                f"The hub's record of its local groups, {self.path}, is not one this hub wrote."
            )
        return {
            str(name): (str(entry["group"]), int(entry["gid"]))
            for name, entry in groups.items()
            if isinstance(entry, dict) and {"group", "gid"} <= set(entry)
        }

    def add(self, local: str, hub_group: str, gid: int) -> None:
        """Record that this hub made the local group ``local`` (``gid``) for ``hub_group``."""
        names = {k: {"group": g, "gid": i} for k, (g, i) in self.load().items()}
        names[local] = {"group": hub_group, "gid": gid}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part")
        partial.write_text(json.dumps({"groups": names}, indent=1, sort_keys=True))
        partial.replace(self.path)


def ensure_group(name: str, hub_group: str, member: str, registry: GroupRegistry) -> int:
    """Return the gid of the local group ``name`` of ``hub_group``, with ``member`` in it.

    Root only. ``groupadd`` creates the group if missing and the registry records it;
    ``usermod -a -G`` adds the account ``member``. An existing group is used only if the registry
    names it for ``hub_group``, and never a system group (gid below ``GID_MIN``) or gid 0.
    """
    if not SYSTEM_NAME.fullmatch(name):
        raise InvalidInput(f"{shown(name)!r} cannot be a local group name.")
    with _ACCOUNTS_LOCK:
        entry = _group(name)
        if entry is None:
            _administer(
                ["groupadd", name],
                lambda: _group(name) is not None,
                f"The local group {name} could not be created",
            )
            entry = grp.getgrnam(name)
            registry.add(name, hub_group, entry.gr_gid)
        elif registry.load().get(name) != (hub_group, entry.gr_gid):
            raise InvalidInput(
                f"The local group {name} exists but this hub did not make it for the project "
                f"{shown(hub_group)}; ask the hub's administrators."
            )
        if entry.gr_gid < login_defs("GID_MIN", 1000):
            raise InvalidInput(
                f"The local group {name} is a system group; no project directory uses it."
            )
        if member not in entry.gr_mem:
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

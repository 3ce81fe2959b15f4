"""LocalCASASpawner: CASA sessions as local processes, on one machine, without a cluster.

The same form, validation and :class:`~casaspawner.plan.SessionPlan` as the Kubernetes spawner; the plan
becomes a process instead of a pod:

* the Jupyter server is ``jupyterhub-singleuser`` from casaspawner's own environment (``ui_prefix``), never
  from the CASA environment; CASA runs as a kernel and as desktop applications from the release's
  environment (:mod:`casaspawner.environments`), built on demand with progress on the spawn page;
* storage: ``storage_root`` stands in for Cavern (``home/<user>``, ``projects/<group>``); with the default
  ``/arc`` (a hub running as root) sessions see the pods' very paths, elsewhere ``~/arc`` links to the root;
* identity: sessions never run as root. A hub running as root gives each user a local account on first
  login (``useradd``, as The Littlest JupyterHub does); otherwise sessions run as the hub's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import html
import json
import os
import pwd
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from traitlets import Bool, Integer, List, Unicode, default

from casaspawner.datasets.layout import MEMBER_DIR
from casaspawner.datasets.model import Evidence, Resolution
from casaspawner.environments import CasaEnvironment, EnvironmentManager, default_cache_dir
from casaspawner.environments.pythons import world_usable
from casaspawner.errors import CasaspawnerError, InvalidInput, ResolutionError, VersionUnknown, shown
from casaspawner.plan import (
    INTERFACES,
    Identity,
    PlanConfig,
    SessionPlan,
    StorageLayout,
    Substitution,
    image_for,
    make_plan,
)
from casaspawner.spawners.common import CASASessionMixin, render_spawn_form, spawn_error

#: What the sessions' Jupyter environment needs (pinned to the hub's own versions when it is built).
UI_PACKAGES = ("jupyterhub", "jupyterlab", "jupyter-remote-desktop-proxy", "jupyter-server-proxy")
_SYSTEM_NAME = re.compile(r"[a-z_][a-z0-9_.\-]{0,31}")
#: Where pods see the storage (``/arc``): sessions elsewhere get ``~/arc`` linking to ``storage_root``.
POD_STORAGE_ROOT = str(PurePosixPath(StorageLayout.home_mount).parent.parent)
#: One environment manager per configuration and hub process, so what it probed is remembered.
_MANAGERS: dict[tuple[Any, ...], EnvironmentManager] = {}


def _running_as_root() -> bool:
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
    if not _SYSTEM_NAME.fullmatch(name):
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
        taken_over = _running_as_root() and (info.st_uid, info.st_gid) != (uid, gid)
        if taken_over:
            os.chown(path, uid, gid, follow_symlinks=False)
        if created or taken_over:
            os.chmod(path, mode)  # a directory, not a link (checked above; its parent is the hub's)
    except OSError as error:
        raise InvalidInput(
            f"The session's directory {path} cannot be prepared: {error.strerror or error}."
        ) from None


def _process_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, start time in clock ticks after boot) of every process now, from /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _stat(int(entry))) is not None:
            table[int(entry)] = found
    return table


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of process ``pid`` (``/proc/<pid>/stat`` fields 4 and 22); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _below(pid: int, table: dict[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (ppid, _start) in table.items():
        children.setdefault(ppid, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found[::-1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (from /proc), children first."""
    return _below(pid, _process_table())


class ProcessHandle:
    """One process, held so that a signal sent later never reaches another process that got its pid since:
    a pidfd (``os.pidfd_open``, Linux 5.3), else the process's start time, compared before each signal."""

    def __init__(self, pid: int, start: int, fd: int | None) -> None:
        self.pid, self.start, self.fd = pid, start, fd

    @classmethod
    def open(cls, pid: int, start: int | None = None, *, pidfd: bool = True) -> ProcessHandle | None:
        """A handle on process ``pid`` — with ``start``, only if it is still the process that started then;
        None if it is gone. ``pidfd=False``: the start-time comparison only."""
        fd = None
        if pidfd and hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return None
            except OSError:  # ENOSYS (Linux < 5.3) or refused by a seccomp filter: start times only
                fd = None
        found = _stat(pid)  # after pidfd_open: the pidfd is of the process whose start time this is
        if found is None or (start is not None and found[1] != start):
            if fd is not None:
                os.close(fd)
            return None
        return cls(pid, found[1], fd)

    def signal(self, sig: int) -> bool:
        """Send ``sig`` (0: only check that it lives); False when the process is gone (or not ours to signal)."""
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                found = _stat(self.pid)
                if found is None or found[1] != self.start:
                    return False
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def session_processes(pid: int) -> list[ProcessHandle]:
    """Handles on every process below ``pid`` now, children first."""
    table = _process_table()
    handles = (ProcessHandle.open(child, table[child][1]) for child in _below(pid, table))
    return [handle for handle in handles if handle is not None]


def _terminate(processes: list[ProcessHandle], grace: float = 5.0) -> None:
    """SIGTERM, then after ``grace`` seconds SIGKILL, each of ``processes`` still alive."""
    alive = [p for p in processes if p.signal(signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if p.signal(0)]
    for process in alive:
        process.signal(signal.SIGKILL)


async def _render_local_options_form(spawner: LocalCASASpawner) -> str:
    return await render_spawn_form(spawner) + await spawner.resolution_preview()


class LocalCASASpawner(CASASessionMixin, LocalProcessSpawner):  # type: ignore[misc]
    """Start CASA sessions (JupyterLab or a noVNC CASA desktop) as local processes."""

    # ------------------------------------------------------------------------------------------ storage
    storage_root = Unicode(
        help="""
        Local directory standing in for Cavern: users' homes are ``<storage_root>/home/<user>`` and projects
        ``<storage_root>/projects/<group>``, at these same paths inside sessions. Default: ``/arc`` when the hub
        runs as root (the paths sessions in the cluster use), else ``~/.local/share/casaspawner/arc``.
        """,
    ).tag(config=True)

    @default("storage_root")
    def _storage_root_default(self) -> str:
        if _running_as_root():
            return "/arc"
        return str(Path.home() / ".local" / "share" / "casaspawner" / "arc")

    @default("home_mount_template")
    def _local_home_mount(self) -> str:
        return str(Path(self.storage_root) / "home") + "/{username}"

    @default("project_mount_template")
    def _local_project_mount(self) -> str:
        return str(Path(self.storage_root) / "projects") + "/{group}"

    @default("storage_hub_path")
    def _local_storage_hub_path(self) -> str:
        return self.storage_root

    @default("desktop_xstartup")
    def _local_xstartup(self) -> str:
        return str(self.desktop_dir() / "xstartup")

    @default("session_sizes")
    def _local_session_sizes(self) -> dict[str, dict[str, Any]]:
        # LocalProcessSpawner enforces no CPU or memory limits, so none are offered (the form hides a lone size).
        return {"machine": {"description": "no limits: sessions share this machine's CPUs and memory"}}

    @default("default_size")
    def _local_default_size(self) -> str:
        return next(iter(self.session_sizes), "machine")

    # ------------------------------------------------------------------------------------- environments
    environments_dir = Unicode(
        help="""
        Cache of the per-release CASA environments, the shared measures data and downloaded tarballs. Default:
        ``~/.cache/casaspawner``, or ``/var/cache/casaspawner`` when the hub runs as root (root's home is not
        readable by the users sessions run as).
        """,
    ).tag(config=True)

    @default("environments_dir")
    def _environments_dir_default(self) -> str:
        return str(default_cache_dir())

    measures_path = Unicode(
        None,
        allow_none=True,
        help="""
        A CASA measures tree (casarundata or a legacy data tree) every session reads, read-only. Unset: the
        ``casadata`` package is installed once under ``environments_dir``. Either way CASA gets a site config
        with measures and data auto-updates off.
        """,
    ).tag(config=True)

    tarball_mirror = Unicode(
        None,
        allow_none=True,
        help="""
        Base URL to download monolithic CASA tarballs from instead of NRAO's directories (the tarball's file
        name is appended), e.g. a site mirror for hubs without internet access. Checksums are still verified:
        the catalog's SHA-256, else the mirror's own ``<tarball>.md5``, which counts only over https or from
        a mirror on this machine (``http://127.0.0.1…``).
        """,
    ).tag(config=True)

    pip_args = List(
        Unicode(),
        help="Extra arguments for ``pip install`` when building environments from wheels, e.g. ``['--index-url', …]``.",
    ).tag(config=True)

    allow_approximate = Bool(
        False,
        help="""
        When the exact CASA build a dataset needs cannot be installed on this machine (most ALMA pipeline builds
        exist only as tarballs), run the nearest installable modular release instead. Such sessions are marked
        approximate on the progress page, in the kernel name and on the desktop. Off: the spawn is refused with a
        sentence saying why the build cannot be installed.
        """,
    ).tag(config=True)

    ui_prefix = Unicode(
        None,
        allow_none=True,
        help="""
        Environment holding ``jupyterhub-singleuser``, JupyterLab and jupyter-remote-desktop-proxy; sessions run
        their Jupyter server from it, never from a CASA environment. Default: the hub's own environment when the
        session's user can run it; otherwise (a hub running as root from a Python under a private home) a venv
        with the hub's versions of these packages, built once under ``environments_dir``. A hub running as root
        also reads datasets as the user with its Python (which then needs PyYAML and defusedxml, as JupyterLab's
        dependencies bring), unless the hub's own Python is usable by every user.
        """,
    ).tag(config=True)

    # -------------------------------------------------------------------------------------------- users
    create_system_users = Bool(
        True,
        help="""
        When the hub runs as root: create a local account for each user on first login (``useradd``, home in
        ``storage_root``), and one local group per project, so sessions run as that account. When the hub does not
        run as root, sessions always run as the hub's own user and this does nothing.
        """,
    ).tag(config=True)

    system_username_template = Unicode(
        "jupyter-{username}",
        help="""
        Local account name of a hub user (when the hub runs as root); ``{username}`` is replaced. The prefix keeps
        hub users apart from system accounts such as ``daemon``.
        """,
    ).tag(config=True)

    system_group_template = Unicode(
        "casa-{group}",
        help="Local group of a project directory (when the hub runs as root); ``{group}`` is replaced.",
    ).tag(config=True)

    session_log_name = Unicode(
        ".casaspawner-session.log",
        help="""
        File in the user's home receiving the session server's output (it outlives hub restarts). The session
        opens it itself, as the user, after the hub has dropped root; a link there is refused.
        """,
    ).tag(config=True)

    @default("start_timeout")
    def _local_start_timeout(self) -> int:
        return 1800  # the first session of a release builds its environment (a few minutes)

    @default("http_timeout")
    def _local_http_timeout(self) -> int:
        return 120

    probe_timeout = Integer(
        5,
        help="Seconds to wait when checking that a release's tarball can be downloaded.",
    ).tag(config=True)

    resolve_timeout = Integer(
        60,
        help="""
        Seconds a hub running as root gives ``casaspawner resolve``, run as the session's user, to read a
        dataset named by path; a dataset that takes longer is refused with a sentence.
        """,
    ).tag(config=True)

    # ---------------------------------------------------------------------------------------- state
    args: list[str]
    cmd: list[str]
    popen_kwargs: dict[str, Any]
    notebook_dir: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._events: list[dict[str, Any]] = []
        self._starting = False
        self.casa_environment: CasaEnvironment | None = None
        self._session_log: str | None = None
        super().__init__(*args, **kwargs)

    def environment_manager(self) -> EnvironmentManager:
        """The manager for this configuration, shared by every spawner of this hub process (it remembers
        which tarballs answer and which Pythons exist, so forms and starts do not probe again)."""
        key = (self.environments_dir, self.measures_path, self.tarball_mirror, tuple(self.pip_args),
               self.probe_timeout, os.geteuid())  # fmt: skip
        manager = _MANAGERS.get(key)
        if manager is None:
            manager = _MANAGERS[key] = EnvironmentManager(
                Path(self.environments_dir),
                measures_path=Path(self.measures_path) if self.measures_path else None,
                tarball_mirror=self.tarball_mirror,
                pip_args=self.pip_args,
                probe_timeout=self.probe_timeout,
            )
        return manager

    def desktop_dir(self) -> Path:
        """The desktop scripts as sessions run them: installed under ``environments_dir``, not the checkout."""
        return self.environment_manager().session_files() / "desktop"

    # ------------------------------------------------------------------------------------- identity
    def system_username(self) -> str:
        return self.system_username_template.format(username=self.user.name).lower()

    def _ensure_account(self, home: str) -> pwd.struct_passwd:
        """The local account of this user, created on first login (root only)."""
        name = self.system_username()
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        if not self.create_system_users:
            raise InvalidInput(f"There is no local account {name} for {self.user.name} on this machine.")
        if not _SYSTEM_NAME.fullmatch(name):
            raise InvalidInput(f"{self.user.name!r} cannot be made into a local account name ({name!r}).")
        account = ensure_account(name, home, f"casaspawner session user {self.user.name}")
        self.log.info("Local account %s for %s", name, self.user.name)
        return account

    def _ensure_project_group(self, group: str, account: str) -> int:
        """The local group of a project, created if needed, with ``account`` as a member (root only)."""
        name = self.system_group_template.format(group=group).lower()
        if not _SYSTEM_NAME.fullmatch(name):
            raise InvalidInput(f"The project {group!r} cannot be made into a local group name ({name!r}).")
        return ensure_group(name, account)

    async def session_identity(self) -> Identity:
        """A local account when the hub is root, else the hub's own user; groups are the hub groups."""
        groups = tuple(self.project_groups(self.hub_group_names()))
        home = self.home_mount_template.format(username=self.user.name)
        if _running_as_root():
            account = await asyncio.to_thread(self._ensure_account, home)
            gids = []
            for group in groups:
                gids.append(await asyncio.to_thread(self._ensure_project_group, group, account.pw_name))
            return Identity(self.user.name, account.pw_uid, account.pw_gid, groups, tuple(gids))
        return Identity(self.user.name, os.getuid(), os.getgid(), groups)

    # -------------------------------------------------------------------------------------- datasets
    async def read_dataset(self, path: Path, label: str, identity: Identity) -> Resolution:
        """As root, the dataset is read by ``casaspawner resolve DIR --json`` run as the session's user (with
        their groups): links the user swaps in after the storage reader's checks, or files they could not
        read themselves, can never make root read anything. Otherwise (the hub is the user) here."""
        if not _running_as_root():
            return await super().read_dataset(path, label, identity)
        python = await self._resolver_python()
        return await asyncio.to_thread(self._resolve_as_user, path, label, identity, python)

    async def _resolver_python(self) -> str:
        """An interpreter the session's user can run, with casaspawner's few dependencies (PyYAML, defusedxml):
        the hub's own, else the one of the sessions' Jupyter environment (which has them)."""
        if all(world_usable(p) for p in (sys.executable, sys.prefix, sys.base_prefix)):
            return sys.executable
        prefix = await self._ui_environment()
        return str(next((p for p in (prefix / "bin" / "python3", prefix / "bin" / "python") if p.exists()),
                        prefix / "bin" / "python3"))  # fmt: skip

    def _resolve_as_user(self, path: Path, label: str, identity: Identity, python: str) -> Resolution:
        name = shown(label)
        files = self.environment_manager().session_files()
        # The directory the reader checked, held open and handed to the child (the child's /proc/self/fd), under
        # its own name when that matters to the resolver (a member.uid___… directory).
        fd = os.open(path, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with tempfile.TemporaryDirectory(prefix="casaspawner-resolve-") as scratch:
                os.chmod(scratch, 0o755)  # noqa: S103 - the user reads it; only the hub writes it
                link = Path(scratch) / (path.name if MEMBER_DIR.fullmatch(path.name) else "dataset")
                link.symlink_to(f"/proc/self/fd/{fd}")
                cmd = [python, "-s", "-m", "casaspawner", "resolve", str(link), "--json", "--error-json",
                       "--registry", PlanConfig.image_registry]  # fmt: skip
                if self.catalog_path:  # the operator's catalog may be private: a copy the user can read
                    copy = Path(scratch) / "releases.yaml"
                    copy.write_bytes(Path(self.catalog_path).read_bytes())
                    copy.chmod(0o644)
                    cmd += ["--catalog", str(copy)]
                env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(files / "python"), "PYTHONNOUSERSITE": "1",
                       "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8", "HOME": "/"}  # fmt: skip
                try:
                    result = subprocess.run(
                        cmd, env=env, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        timeout=self.resolve_timeout, user=identity.uid, group=identity.gid,
                        extra_groups=list(identity.supplemental_gids), pass_fds=(fd,),
                    )  # fmt: skip
                except subprocess.TimeoutExpired:
                    raise InvalidInput(
                        f"Reading {name} took longer than {self.resolve_timeout} seconds; give the directory of "
                        "one ALMA dataset (a member.uid___… directory)."
                    ) from None
        finally:
            os.close(fd)

        def named(text: str) -> str:  # the sentences name the dataset as the user did, as in the hub
            return text.replace(str(link), name)

        try:
            found = json.loads(result.stdout) if result.stdout.strip() else {}
        except ValueError:
            found = {}
        if result.returncode == 2:
            sentence = str(found.get("error") or result.stderr.strip().removeprefix("casaspawner: "))
            if found.get("kind") == "VersionUnknown":
                raise VersionUnknown(named(str(found.get("finding"))), str(found.get("advice")))
            if found.get("kind") == "ResolutionError":
                raise ResolutionError(named(sentence))
            raise InvalidInput(named(sentence) or f"{name} could not be read as a dataset.")
        try:
            if result.returncode != 0:
                raise ValueError(f"exit status {result.returncode}")
            images = {image_for(r, PlanConfig()): r for r in self.casa_catalog().releases}
            evidence = Evidence(
                found["evidence"]["kind"],
                found["evidence"]["path"],
                found["processed_with"]["casa"],
                found["processed_with"]["pipeline"],
            )
            return Resolution(
                label, evidence, images[found["image"]], found["exact"] is True, str(found["reason"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            self.log.error(
                "casaspawner resolve as %s failed (%s): %s",
                self.system_username(),
                exc,
                result.stderr[-2000:],
            )
            raise RuntimeError(f"reading the dataset as {self.system_username()} failed ({exc})") from None

    def parse_session_options(self, user_options: Mapping[str, Any]) -> Any:
        """As for pods, except that with a single size (nothing to choose: the default here) any size named
        by a saved or REST request is ignored rather than refused."""
        if isinstance(user_options, Mapping) and len(self.session_sizes) == 1:
            user_options = {k: v for k, v in user_options.items() if k != "size"}
        return super().parse_session_options(user_options)

    def form_home_hint(self) -> str:
        """``~`` unless the home is at the pods' path (``/arc/home/<user>``), which the form may then show."""
        if os.path.normpath(self.storage_root) == POD_STORAGE_ROOT:
            return super().form_home_hint()
        return "~"

    # ----------------------------------------------------------------------------------------- plan
    async def prepare_session(self, user_options: Mapping[str, Any] | None = None) -> SessionPlan:
        """The shared plan, then: can this machine install its release? If not, refuse or approximate."""
        plan = await super().prepare_session(user_options)
        if plan.approximate:
            return plan
        manager = self.environment_manager()
        problem = await asyncio.to_thread(manager.unavailable_reason, plan.release)
        if problem is None:
            return plan
        if not self.allow_approximate:
            raise spawn_error(problem, reason="release-unavailable")
        catalog = self.casa_catalog()
        nearest = await asyncio.to_thread(manager.nearest_installable, plan.release, catalog)
        if nearest is None:
            raise spawn_error(f"{problem[:-1]}, and no other CASA release can be installed here either.")
        why = f"{problem.rstrip('.')}; the session runs {nearest.label} instead"
        try:
            plan = make_plan(
                plan.identity,
                plan.options,
                catalog,
                plan.resolution,
                self.plan_config(),
                Substitution(nearest, why),
            )
            self.adopt_plan(plan, self.user_options)
        except Exception as exc:
            raise self.refusal(exc) from None
        self.log.warning("Approximate CASA session for %s: %s", self.user.name, plan.reason)
        return plan

    def apply_plan(self, plan: SessionPlan) -> None:
        super().apply_plan(plan)
        self.notebook_dir = plan.home
        scratch = Path(self.storage_root) / "scratch" / plan.username
        self.environment = {
            **self.environment,
            "SCRATCH": str(scratch),
            "CASASPAWNER_DESKTOP_DIR": str(self.desktop_dir()),
        }

    @default("options_form")
    def _local_options_form_default(self) -> Callable[[Any], Any]:
        return _render_local_options_form

    async def resolution_preview(self) -> str:
        """For a returning user: the build the dataset in the form (the last one) resolved to and why, and
        whether this machine can install that build (or will run an approximation). From the server's state
        and what the environment manager already knows only: rendering the form never resolves, reads storage,
        creates an account or waits on the network. Empty when there is nothing to show."""
        last = self.last_resolution
        if not last or last.get("dataset") != (self.user_options or {}).get("dataset"):
            return ""
        try:
            release = self.casa_catalog().get(str(last["release"]))
        except CasaspawnerError:
            return ""  # a release the catalog no longer has
        problem = self.environment_manager().unavailable_reason(release, probe=False)
        exactness = "the exact build" if last.get("exact") else "not the exact build"
        text = f"{last['dataset']}: {release.label}, {exactness}. {last.get('reason', '')}".rstrip()
        if problem and self.allow_approximate:
            text += f" {problem} The session will run the nearest installable release, marked approximate."
        elif problem:
            text += f" {problem}"
        return f'<p class="casa-help" id="casa-resolved" role="status">{html.escape(text)}</p>\n'

    def render_options_form(self, error: str = "", blocked: Collection[str] = ()) -> str:
        form = super().render_options_form(error, blocked)
        if self.allow_approximate:
            note = (
                "This hub installs CASA from public wheels and tarballs. When the exact build for your dataset "
                "cannot be installed here, the session runs the nearest installable release and is marked "
                "<strong>approximate</strong>."
            )
        else:
            note = (
                "This hub installs CASA from public wheels and tarballs; a dataset whose exact build cannot be "
                "installed here is refused with the reason."
            )
        return form + f'\n<p class="casa-help" id="casa-local-note">{note}</p>\n'

    # ----------------------------------------------------------------------------------------- start
    def _event(self, message: str, progress: int | None = None) -> None:
        last = self._events[-1]["progress"] if self._events else 0
        value = progress if progress is not None else min(last + 1, 90)
        self._events.append({"progress": value, "message": message})

    def _prepare_directories(self, plan: SessionPlan, uid: int, gid: int) -> None:
        """Home, project and scratch directories, owned by the session's user (or, as root, the project's
        local group, setgid ``2770``); never through a link."""
        prepare_owned_dir(Path(plan.home), uid, gid, 0o750)
        prepare_owned_dir(Path(self.environment["SCRATCH"]), uid, gid, 0o700)
        gids = dict(zip(plan.identity.groups, plan.identity.supplemental_gids, strict=False))
        for mount in plan.mounts:
            if mount.group is None:
                continue
            if _running_as_root() and mount.group in gids:
                prepare_owned_dir(Path(mount.path), 0, gids[mount.group], 0o2770)
            else:
                prepare_owned_dir(Path(mount.path), uid, gid, 0o770)

    async def start(self) -> Any:
        self._events = []
        self._starting = True
        try:
            plan = await self.prepare_session()
            events = [e for e in self.plan_progress_events() if not e["message"].startswith("Starting ")]
            if plan.approximate:  # said first, then the resolution (whose reason it repeats)
                events = [{"progress": 1, "message": f"Approximate session: {plan.reason}"},
                          *(e for e in events if e["message"] != plan.reason)]  # fmt: skip
            self._events.extend(events)
            env = await self._ensure_environment(plan)
            prefix = await self._ui_environment()
            self._event(f"Starting {INTERFACES[plan.interface]} with {plan.kernel_name}.", 92)
            return await self._launch(plan, env, prefix)
        finally:
            self._starting = False

    async def _ensure_environment(self, plan: SessionPlan) -> CasaEnvironment:
        manager = self.environment_manager()
        env = manager.ready(plan.release)
        if env is None:
            self._event(f"Preparing {plan.release.label} on this machine (only the first session waits).", 8)
            try:
                async for message in manager.ensure(plan.release):
                    self._event(message)
            except CasaspawnerError as exc:
                raise spawn_error(str(exc), reason="environment-build") from None
            env = manager.ready(plan.release)
            if env is None:
                raise spawn_error(
                    f"The environment for {plan.release.label} did not appear.", "environment-build"
                )
        else:
            self._event(f"Using the prepared {plan.release.label} environment.", 50)
        if not env.run_checked:
            self._event(
                f"{plan.release.label} could not be test-started on this machine when it was prepared."
            )
        self.casa_environment = env
        return env

    async def _ui_environment(self) -> Path:
        """Where the session's Jupyter server comes from (see ``ui_prefix``)."""
        if self.ui_prefix:
            return Path(self.ui_prefix)
        own = Path(sys.prefix)
        if not _running_as_root() or all(
            world_usable(p) for p in (sys.executable, sys.prefix, sys.base_prefix)
        ):
            return own
        requirements = [f"{name}=={version(name)}" for name in UI_PACKAGES]
        manager = self.environment_manager()
        try:
            async for message in manager.ensure_ui(requirements):
                self._event(message)
        except CasaspawnerError as exc:
            raise spawn_error(str(exc), reason="environment-build") from None
        return manager.ui_prefix(requirements)

    async def _launch(self, plan: SessionPlan, env: CasaEnvironment, prefix: Path) -> Any:
        uid, gid = plan.identity.uid, plan.identity.gid
        try:
            await asyncio.to_thread(self._prepare_directories, plan, uid, gid)
        except CasaspawnerError as exc:
            raise spawn_error(str(exc), reason="storage") from None
        self.cmd = [str(prefix / "bin" / "jupyterhub-singleuser")]
        # No news feed in JupyterLab (JupyterLab's own notifications stay on: the hub may use them).
        lab_settings = (
            f"--LabApp.app_settings_dir={self.environment_manager().session_files() / 'lab-settings'}"
        )
        extra = dict(env.session_environment())
        if env.python is not None:
            try:
                extra["JUPYTER_PATH"] = str(env.write_kernelspec(plan.kernel_name))
            except CasaspawnerError as exc:
                if plan.interface == "lab":
                    raise spawn_error(str(exc), reason="no-kernel") from None
            kernel = f"--MappingKernelManager.default_kernel_name={env.kernel_id}"
        else:
            kernel = ""
        if plan.interface == "lab" and env.python is None:
            raise spawn_error(
                f"{plan.release.label} has no Python 3 for a notebook kernel; choose the CASA desktop.",
                "no-kernel",
            )
        ours = ("default_kernel_name", "LabApp.app_settings_dir")
        self.args = [
            *(a for a in self.args if not any(k in a for k in ours)),
            *filter(None, [kernel, lab_settings]),
        ]
        # The desktop's vncserver wrapper picks an X display no other X server (or container) uses.
        desktop_bin = str(self.desktop_dir() / "bin")
        extra["PATH"] = os.pathsep.join([desktop_bin, os.environ.get("PATH", "/usr/bin:/bin")])
        self.environment = {**self.environment, **extra}
        log_path = Path(plan.home) / self.session_log_name
        try:
            existing = os.lstat(log_path)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (stat.S_ISREG(existing.st_mode) and existing.st_uid == uid):
            raise spawn_error(
                f"~/{self.session_log_name} in your home is not a regular file of yours (a link?); remove it "
                "and start again.",
                reason="session-log",
            )
        self._session_log = str(log_path)
        self.popen_kwargs = {**self.popen_kwargs, "cwd": plan.home}
        try:
            return await super().start()
        except subprocess.SubprocessError:  # the child could not open its log (see make_preexec_fn)
            raise spawn_error(
                f"The session could not open ~/{self.session_log_name} in your home; remove it and start again.",
                reason="session-log",
            ) from None

    def make_preexec_fn(self, name: str) -> Callable[[], None]:
        """In the session's process before it runs: become the session's local account (hub as root), then,
        as that user, open the session log (no links followed) as stdout and stderr and add ``~/arc``."""
        become = set_user_setuid(self.system_username(), chdir=False) if _running_as_root() else None
        log_path = self._session_log
        plan = self.session_plan
        link = None
        if plan is not None and os.path.normpath(self.storage_root) != POD_STORAGE_ROOT:
            link = (os.path.join(plan.home, "arc"), self.storage_root)

        def preexec() -> None:
            if become is not None:
                become()
            if log_path is not None:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
                fd = os.open(log_path, flags, 0o600)
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                    raise OSError(f"{log_path} is not a regular file of the session's user")
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
            if link is not None and not os.path.lexists(link[0]):
                with contextlib.suppress(OSError):  # the session works without it
                    os.symlink(link[1], link[0])

        return preexec

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        plan = self.session_plan
        env["USER"] = self.system_username() if _running_as_root() else pwd.getpwuid(os.getuid()).pw_name
        env["SHELL"] = "/bin/bash"
        env["HOME"] = plan.home if plan is not None else env.get("HOME", "/")
        return env

    async def stop(self, now: bool = False) -> None:
        """Stop the Jupyter server, then whatever it left behind (the desktop's VNC server, X clients, CASA).

        jupyter-server-proxy's VNC server and the X programs start sessions of their own, so stopping the
        server's process group alone would leave the desktop running. They are listed before the server is
        stopped and held (:class:`ProcessHandle`), so the signals sent seconds later never reach a process
        that got one of their pids meanwhile.
        """
        tree = await asyncio.to_thread(session_processes, self.pid) if self.pid else []
        try:
            await super().stop(now=now)
            await asyncio.to_thread(_terminate, tree)
        finally:
            for process in tree:
                process.close()

    def clear_state(self) -> None:
        super().clear_state()
        self._events = []
        self.casa_environment = None

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """Plan lines, environment build steps and the launch, as they happen."""
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            if not self._starting and not self.pending:
                return
            await asyncio.sleep(0.5)

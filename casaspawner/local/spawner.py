"""LocalCASASpawner: CASA sessions as local processes, on one machine, without a cluster.

The same form, pipeline and :class:`~casaspawner.plan.SessionPlan` as the Kubernetes spawner; the
plan becomes a process instead of a pod:

* the Jupyter server is ``jupyterhub-singleuser`` from casaspawner's own environment
  (``ui_prefix``), never from the CASA environment; CASA runs as a kernel and as desktop
  applications from the release's environment (:mod:`casaspawner.local.environments`), built on
  demand with progress on the spawn page;
* storage: ``storage_root`` stands in for Cavern (``home/<user>``, ``projects/<group>``); with the
  default ``/arc`` (a hub running as root) sessions see the pods' very paths, elsewhere ``~/arc``
  links to the root;
* identity: sessions never run as root. A hub running as root gives each user a local account
  (:mod:`casaspawner.local.accounts`), and the session process runs as the plan's uid, gid and
  groups; otherwise sessions run as the hub's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import pwd
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Collection
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner
from tornado.httpclient import AsyncHTTPClient
from traitlets import Bool, Integer, List, Unicode, default

from casaspawner.catalog.model import Release
from casaspawner.datasets.model import Resolution
from casaspawner.datasets.worker import RunAs, WorkerFailed, resolve_in_worker
from casaspawner.errors import CasaspawnerError, InvalidInput, shown
from casaspawner.insession.record import complete as complete_record_file
from casaspawner.local.accounts import (
    GroupRegistry,
    ensure_account,
    ensure_group,
    local_name,
    prepare_owned_dir,
    running_as_root,
    usable_account,
)
from casaspawner.local.environments import CasaEnvironment, EnvironmentManager
from casaspawner.local.environments.desktop import (
    RELEASES_FILE_ENV,
    RELEASES_URL_ENV,
    write_desktop_releases,
)
from casaspawner.local.environments.progress import Progress
from casaspawner.local.environments.pythons import world_usable
from casaspawner.local.processes import session_processes, terminate
from casaspawner.plan import INTERFACES, Identity, SessionPlan, StorageLayout, Substitution
from casaspawner.runtime import cache_dir
from casaspawner.session.readers import DatasetReader
from casaspawner.session.record import Runtime
from casaspawner.session.relaunch import environment_refusal
from casaspawner.spawners.errors import spawn_error
from casaspawner.spawners.mixin import CASASessionMixin, render_spawn_form
from casaspawner.spawners.records import SessionRecords

#: What the sessions' Jupyter environment needs, pinned to the hub's own versions.
UI_PACKAGES = ("jupyterhub", "jupyterlab", "jupyter-remote-desktop-proxy", "jupyter-server-proxy")
#: Where pods see the storage: sessions elsewhere get ``~/arc`` linking to ``storage_root``.
POD_STORAGE_ROOT = str(PurePosixPath(StorageLayout.home_mount).parent.parent)
#: One environment manager per configuration and hub process, so what it probed is remembered.
_MANAGERS: dict[tuple[Any, ...], EnvironmentManager] = {}
#: The file CASA logs to in the session's home: kernels, the desktop's CASA terminal and logger.
CASA_LOG = "casa.log"
#: Seconds between two progress-page lines about one long step (a download, a quiet step).
PROGRESS_EVERY = 2.0


def ui_requirements() -> list[str] | None:
    """What the sessions' own Jupyter environment needs, when the hub's cannot serve them.

    None when sessions can run the hub's own environment: the hub does not run as root, or every
    user can run its Python. Otherwise the packages, pinned to the hub's own versions.
    """
    if not running_as_root() or all(
        world_usable(p) for p in (sys.executable, sys.prefix, sys.base_prefix)
    ):
        return None
    return [f"{name}=={version(name)}" for name in UI_PACKAGES]


async def _render_local_options_form(spawner: LocalCASASpawner) -> str:
    return await render_spawn_form(spawner) + await spawner.resolution_preview()


class LocalCASASpawner(SessionRecords, CASASessionMixin, LocalProcessSpawner):  # type: ignore[misc]
    """Start CASA sessions as local processes.

    A session is JupyterLab or a noVNC CASA desktop.
    """

    # Storage
    storage_root = Unicode(
        help="""
        Local directory standing in for Cavern: users' homes are ``<storage_root>/home/<user>``
        and projects ``<storage_root>/projects/<group>``, at these same paths inside sessions.
        Default: ``/arc`` when the hub runs as root (the paths sessions in the cluster use),
        else ``~/.local/share/casaspawner/arc``.
        """,
    ).tag(config=True)

    @default("storage_root")
    def _storage_root_default(self) -> str:
        if running_as_root():
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
        # LocalProcessSpawner enforces no CPU or memory limits, so none are offered. The form hides
        # a lone size.
        return {
            "machine": {"description": "no limits: sessions share this machine's CPUs and memory"}
        }

    @default("default_size")
    def _local_default_size(self) -> str:
        return next(iter(self.session_sizes), "machine")

    # Environments
    environments_dir = Unicode(
        help="""
        Cache of the per-release CASA environments, the shared measures data and downloaded
        tarballs. Default: ``~/.cache/casaspawner``, or ``/var/cache/casaspawner`` when the hub
        runs as root (root's home is not readable by the users sessions run as).
        """,
    ).tag(config=True)

    @default("environments_dir")
    def _environments_dir_default(self) -> str:
        return str(cache_dir())

    measures_path = Unicode(
        None,
        allow_none=True,
        help="""
        A CASA measures tree (casarundata or a legacy data tree) every session reads, read-only.
        Unset: the ``casadata`` package is installed once under ``environments_dir``. Either way
        CASA gets a site config with measures and data auto-updates off.
        """,
    ).tag(config=True)

    tarball_mirror = Unicode(
        None,
        allow_none=True,
        help="""
        Base URL to download monolithic CASA tarballs from instead of NRAO's directories (the
        tarball's file name is appended), e.g. a site mirror for hubs without internet access.
        Checksums are still verified: the catalog's SHA-256, else the mirror's own
        ``<tarball>.md5``, which counts only over https or from a mirror on this machine
        (``http://127.0.0.1…``).
        """,
    ).tag(config=True)

    pip_args = List(
        Unicode(),
        help=(
            "Extra arguments for ``pip install`` when building environments from wheels, "
            "e.g. ``['--index-url', …]``."
        ),
    ).tag(config=True)

    allow_approximate = Bool(
        False,
        help="""
        When the exact CASA build a dataset needs cannot be installed on this machine (most ALMA
        pipeline builds exist only as tarballs), run the nearest installable modular release
        instead. Such sessions are marked approximate on the progress page, in the kernel name
        and on the desktop. Off: the spawn is refused with a sentence saying why the build
        cannot be installed.
        """,
    ).tag(config=True)

    ui_prefix = Unicode(
        None,
        allow_none=True,
        help="""
        Environment holding ``jupyterhub-singleuser``, JupyterLab and
        jupyter-remote-desktop-proxy; sessions run their Jupyter server from it, never from a
        CASA environment. Default: the hub's own environment when the session's user can run it;
        otherwise (a hub running as root from a Python under a private home) a venv with the
        hub's versions of these packages, built once under ``environments_dir``. A hub running
        as root also reads datasets as the user with its Python (which then needs PyYAML and
        defusedxml, as JupyterLab's dependencies bring), unless the hub's own Python is usable
        by every user.
        """,
    ).tag(config=True)

    # Users
    create_system_users = Bool(
        True,
        help="""
        When the hub runs as root: create a local account for each user on first login
        (``useradd``, home in ``storage_root``), and one local group per project, so sessions
        run as that account. When the hub does not run as root, sessions always run as the hub's
        own user and this does nothing.
        """,
    ).tag(config=True)

    system_username_template = Unicode(
        "jupyter-{username}",
        help="""
        Local account name of a hub user (when the hub runs as root); ``{username}`` is
        replaced. The prefix keeps hub users apart from system accounts such as ``daemon``. A
        result that is not a lowercase system name of at most 32 characters (capitals, other
        characters, a long name) becomes its safe lowercase beginning and a short hash of the
        exact hub name, so two hub names never share an account. An existing account is used
        only if this hub made it for that very hub name (its comment says so), and never a
        system account.
        """,
    ).tag(config=True)

    system_group_template = Unicode(
        "casa-{group}",
        help="""
        Local group of a project directory (when the hub runs as root); ``{group}`` is
        replaced, and shortened with a hash as account names are. An existing group is used only
        if this hub made it for that very project (``local_groups_file`` records it), and never a
        system group.
        """,
    ).tag(config=True)

    local_groups_file = Unicode(
        "/var/lib/casaspawner/local-groups.json",
        help="""
        Where a hub running as root records the local groups it made, and for which project.
        Only root can write it; a group it does not name is never used for a project.
        """,
    ).tag(config=True)

    session_log_name = Unicode(
        ".casaspawner-session.log",
        help="""
        File in the user's home receiving the session server's output (it outlives hub
        restarts). The session opens it itself, as the user, after the hub has dropped root; a
        link there is refused.
        """,
    ).tag(config=True)

    @default("start_timeout")
    def _local_start_timeout(self) -> int:
        # The first session of a release builds its environment, which takes a few minutes.
        return 1800

    @default("http_timeout")
    def _local_http_timeout(self) -> int:
        return 120

    probe_timeout = Integer(
        5,
        help="Seconds to wait when checking that a release's tarball can be downloaded.",
    ).tag(config=True)

    releases_url = Unicode(
        "",
        help="""
        Where desktop sessions ask the casa-sessions service which releases are drained before
        they start an app of another release (``casa-app --release``), e.g.
        ``http://127.0.0.1:8003/services/casa-sessions/api/releases``. Sessions get it as
        ``CASASPAWNER_RELEASES_URL``. Empty: apps of other releases start without asking.
        ``casaspawner.hubconfig`` sets it.
        """,
    ).tag(config=True)

    # State
    args: list[str]
    cmd: list[str]
    popen_kwargs: dict[str, Any]
    notebook_dir: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._events: list[dict[str, Any]] = []
        self._progress_said: tuple[str, float] = ("", 0.0)
        self._starting = False
        self.casa_environment: CasaEnvironment | None = None
        self._environment_digest = ""
        self._session_log: str | None = None
        super().__init__(*args, **kwargs)

    def environment_manager(self) -> EnvironmentManager:
        """The environment manager for this configuration.

        Every spawner of this hub process shares it. It remembers which tarballs answer and which
        Pythons exist, so forms and starts do not probe again.
        """
        key = (
            self.environments_dir,
            self.measures_path,
            self.tarball_mirror,
            tuple(self.pip_args),
            self.probe_timeout,
            os.geteuid(),
        )
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
        """The desktop scripts as sessions run them.

        They are installed under ``environments_dir``, not run from the checkout.
        """
        return self.environment_manager().session_files() / "desktop"

    # Identity
    def system_username(self) -> str:
        """The local account name of this hub user."""
        return local_name(self.system_username_template, "username", self.user.name)

    def _ensure_account(self, home: str) -> pwd.struct_passwd:
        """The local account of this user, created on first login; root only."""
        name = self.system_username()
        if self.create_system_users:
            account = ensure_account(name, self.user.name, home)
        else:
            try:
                account = pwd.getpwnam(name)
            except KeyError:
                raise InvalidInput(
                    f"There is no local account {name} for {shown(self.user.name)} on this "
                    "machine."
                ) from None
            usable_account(account, self.user.name, made_here=False)
        if account.pw_gid == 0 and not self.allow_root_group:
            raise InvalidInput(
                f"The local account {name} has the root group as its primary group; sessions "
                "never run with it."
            )
        return account

    def _ensure_project_group(self, group: str, account: str) -> int:
        """The local group of a project, with ``account`` as a member; root only."""
        name = local_name(self.system_group_template, "group", group)
        registry = GroupRegistry(Path(self.local_groups_file))
        return ensure_group(name, group, account, registry)

    async def session_identity(self) -> Identity:
        """The session's user: a local account as root, else the hub's own user.

        The groups are the user's hub groups.
        """
        groups = tuple(self.project_groups(self.hub_group_names()))
        home = self.home_mount_template.format(username=self.user.name)
        if running_as_root():
            account = await asyncio.to_thread(self._ensure_account, home)
            gids = []
            for group in groups:
                gids.append(
                    await asyncio.to_thread(self._ensure_project_group, group, account.pw_name)
                )
            return Identity(self.user.name, account.pw_uid, account.pw_gid, groups, tuple(gids))
        return Identity(self.user.name, os.getuid(), os.getgid(), groups)

    # The pipeline's steps
    async def kept_resolution(
        self, reader: DatasetReader, text: str, identity: Identity
    ) -> Resolution | None:
        """None on a root hub: its workers run as the user, and the hub keeps nothing."""
        if running_as_root():
            return None
        return await super().kept_resolution(reader, text, identity)

    async def read_dataset(self, target: Path | str, label: str, identity: Identity) -> Resolution:
        """Resolve a dataset directory or an identifier, as the session's user on a root hub.

        A hub running as root runs the resolution worker as the session's user, with their
        groups, on the directory the storage reader checked: links the user swaps in after the
        reader's checks, or files they could not read themselves, never make root read anything.
        Identifiers are looked up as the hub, whose archive cache the worker writes.
        """
        if not running_as_root() or not isinstance(target, Path):
            return await super().read_dataset(target, label, identity)
        python = await self._resolver_python()
        user = RunAs(identity.uid, identity.gid, identity.supplemental_gids)
        try:
            return await resolve_in_worker(
                target,
                label,
                self.casa_catalog(),
                catalog_path=self.catalog_path,
                limits=self.resolver_limits(),
                user=user,
                python=python,
                pythonpath=str(self.environment_manager().session_files() / "python"),
            )
        except WorkerFailed as exc:
            self.log.error(
                "The resolution worker as uid %d failed (%s): %s", identity.uid, exc, exc.stderr
            )
            raise RuntimeError(f"reading the dataset as your user failed ({exc})") from None

    async def _resolver_python(self) -> str:
        """An interpreter the session's user can run, with PyYAML and defusedxml.

        The hub's own, else the one of the sessions' Jupyter environment, which has them.
        """
        if all(world_usable(p) for p in (sys.executable, sys.prefix, sys.base_prefix)):
            return sys.executable
        prefix = await self._ui_environment()
        pythons = (prefix / "bin" / "python3", prefix / "bin" / "python")
        return str(next((p for p in pythons if p.exists()), pythons[0]))

    async def substitute(self, release: Release) -> Substitution | None:
        """The nearest installable release when this machine cannot install ``release``.

        Only with ``allow_approximate``; otherwise the spawn is refused with the reason.
        """
        manager = self.environment_manager()
        problem = await asyncio.to_thread(manager.unavailable_reason, release)
        if problem is None:
            return None
        if not self.allow_approximate:
            raise spawn_error(problem, reason="release-unavailable")
        nearest = await asyncio.to_thread(
            manager.nearest_installable, release, self.casa_catalog()
        )
        if nearest is None:
            raise spawn_error(
                f"{problem.rstrip('.')}, and no other CASA release can be installed here either."
            )
        self.log.warning(
            "Approximate CASA session for %s: %s instead of %s",
            self.user.name,
            nearest.label,
            release.label,
        )
        return Substitution(
            nearest, f"{problem.rstrip('.')}; the session runs {nearest.label} instead"
        )

    def form_home_hint(self) -> str:
        """How the form's examples name the user's home.

        ``~``, unless the home is at the pods' path ``/arc/home/<user>``, which the form may then
        show.
        """
        if os.path.normpath(self.storage_root) == POD_STORAGE_ROOT:
            return super().form_home_hint()
        return "~"

    def apply_plan(self, plan: SessionPlan) -> None:
        super().apply_plan(plan)
        self.notebook_dir = plan.home
        self.environment = {
            **self.environment,
            "SCRATCH": str(self.scratch_dir(plan)),
            "CASASPAWNER_DESKTOP_DIR": str(self.desktop_dir()),
        }

    def scratch_dir(self, plan: SessionPlan) -> Path:
        """The session's scratch space: ``<storage_root>/scratch/<user>``."""
        return Path(self.storage_root) / "scratch" / plan.username

    @default("options_form")
    def _local_options_form_default(self) -> Callable[[Any], Any]:
        return _render_local_options_form

    async def resolution_preview(self) -> str:
        """Preview for a returning user what the form's dataset resolved to.

        The dataset is the last one. The preview says the build it resolved to and why, and
        whether this machine can install that build or will run an approximation. It comes only
        from the server's state and what the environment manager already knows: rendering the
        form never resolves, reads storage, creates an account or waits on the network. Empty
        when there is nothing to show.
        """
        last = self.last_resolution
        if not last or last.get("dataset") != (self.user_options or {}).get("dataset"):
            return ""
        try:
            release = self.casa_catalog().get(str(last["release"]))
        except CasaspawnerError:
            # A release the catalog no longer has.
            return ""
        problem = self.environment_manager().unavailable_reason(release, probe=False)
        exactness = "the exact build" if last.get("exact") else "not the exact build"
        text = (
            f"{last['dataset']}: {release.label}, {exactness}. {last.get('reason', '')}".rstrip()
        )
        if problem and self.allow_approximate:
            text += (
                f" {problem} The session will run the nearest installable release, "
                "marked approximate."
            )
        elif problem:
            text += f" {problem}"
        return f'<p class="casa-help" id="casa-resolved" role="status">{html.escape(text)}</p>\n'

    def render_options_form(self, error: str = "", blocked: Collection[str] = ()) -> str:
        form = super().render_options_form(error, blocked)
        if self.allow_approximate:
            note = (
                "This hub installs CASA from public wheels and tarballs. "
                "When the exact build for your dataset cannot be installed here, "
                "the session runs the nearest installable release and is marked "
                "<strong>approximate</strong>."
            )
        else:
            note = (
                "This hub installs CASA from public wheels and tarballs; "
                "a dataset whose exact build cannot be installed here is refused with the reason."
            )
        return form + f'\n<p class="casa-help" id="casa-local-note">{note}</p>\n'

    # Start
    def _event(self, message: str, progress: int | None = None) -> None:
        """Add a line to the progress page.

        A :class:`Progress` of a long step is shown at most every ``PROGRESS_EVERY`` seconds,
        and with a bar when it knows how far it is.
        """
        last = self._events[-1]["progress"] if self._events else 0
        value = progress if progress is not None else min(last + 1, 90)
        event: dict[str, Any] = {"progress": value, "message": str(message)}
        if isinstance(message, Progress):
            now = time.monotonic()
            fraction = message.fraction
            step, said = self._progress_said
            if step == message.step and now - said < PROGRESS_EVERY and fraction != 1.0:
                return
            self._progress_said = (message.step, now)
            if fraction is not None:
                bar = f'<progress max="100" value="{round(fraction * 100)}"></progress>'
                event["html_message"] = f"{bar} {html.escape(message)}"
        self._events.append(event)

    def _prepare_directories(self, plan: SessionPlan, uid: int, gid: int) -> None:
        """Prepare the home, project and scratch directories for the session.

        They are owned by the session's user. As root, project directories are owned by the
        project's local group, setgid ``2770``. Never through a link.
        """
        prepare_owned_dir(Path(plan.home), uid, gid, 0o750)
        prepare_owned_dir(self.scratch_dir(plan), uid, gid, 0o700)
        gids = dict(zip(plan.identity.groups, plan.identity.supplemental_gids, strict=False))
        for mount in plan.mounts:
            if mount.group is None:
                continue
            if running_as_root() and mount.group in gids:
                prepare_owned_dir(Path(mount.path), 0, gids[mount.group], 0o2770)
            else:
                prepare_owned_dir(Path(mount.path), uid, gid, 0o770)

    async def start(self) -> Any:
        """Prepare the release's environment and the directories, then start the server.

        Progress events of this spawn may exist already (``clear_state`` emptied the list before
        ``apply_user_options``): a hub running as root prepares the sessions' Jupyter
        environment while it reads the dataset. They are kept, so the progress page, which may
        have shown them, misses nothing.
        """
        self._starting = True
        try:
            plan = await self.prepare_session()
            self.apply_plan(plan)
            events = [
                e for e in self.plan_progress_events() if not e["message"].startswith("Starting ")
            ]
            # An approximation is said first, then the resolution whose reason it repeats.
            if plan.approximate:
                said = {"progress": 1, "message": f"Approximate session: {plan.reason}"}
                events = [said, *(e for e in events if e["message"] != plan.reason)]
            # The progress page keeps the dataset, the build and why in view (hub-config/local's
            # spawn_pending.html), however many lines follow.
            title = next(e["message"] for e in events if e["message"].startswith("Dataset "))
            events[0] = {
                **events[0],
                "casa_session": {
                    "title": title,
                    "reason": plan.reason,
                    "approximate": plan.approximate,
                },
            }
            self._events.extend(events)
            env = await self._ensure_environment(plan)
            prefix = await self._ui_environment()
            self._event(f"Starting {INTERFACES[plan.interface]} with {plan.kernel_name}.", 92)
            url = await self._launch(plan, env, prefix)
            await self._answering(url)
            self.record_session(plan)
            self.remember_session(plan, self._environment_digest)
            return url
        finally:
            self._starting = False

    async def _ensure_environment(self, plan: SessionPlan) -> CasaEnvironment:
        manager = self.environment_manager()
        env = manager.ready(plan.release)
        if env is None:
            self._event(
                f"Preparing {plan.release.label} on this machine (only the first session waits).",
                8,
            )
            try:
                async for message in manager.ensure(plan.release):
                    self._event(message)
            except CasaspawnerError as exc:
                raise spawn_error(str(exc), reason="environment-build") from None
            env = manager.ready(plan.release)
            if env is None:
                raise spawn_error(
                    f"The environment for {plan.release.label} did not appear.",
                    "environment-build",
                )
        else:
            self._event(f"Using the prepared {plan.release.label} environment.", 50)
        if not env.run_checked:
            self._event(
                f"{plan.release.label} could not be test-started on this machine "
                "when it was prepared."
            )
        self.casa_environment = env
        return env

    async def _ui_environment(self) -> Path:
        """Where the session's Jupyter server comes from.

        See ``ui_prefix``.
        """
        if self.ui_prefix:
            return Path(self.ui_prefix)
        requirements = ui_requirements()
        if requirements is None:
            return Path(sys.prefix)
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
        # A desktop session's desktop starts with the process, before the Jupyter server.
        self.cmd = [
            str(self.desktop_dir() / "bin" / "with-desktop"),
            str(prefix / "bin" / "jupyterhub-singleuser"),
        ]
        session_files = self.environment_manager().session_files()
        # No news feed in JupyterLab. JupyterLab's own notifications stay on: the hub may use them.
        lab_settings = f"--LabApp.app_settings_dir={session_files / 'lab-settings'}"
        extra = dict(env.session_environment())
        # casaspawner's server extensions and the notices' JupyterLab extension come from the
        # session files, whatever the Jupyter server's environment has.
        extra["JUPYTER_CONFIG_PATH"] = str(session_files / "jupyter-config")
        jupyter_path = [str(session_files / "jupyter")]
        # One CASA log in the home, not one casa-<time>.log per start wherever CASA starts.
        extra["CASASPAWNER_CASA_LOGFILE"] = str(Path(plan.home) / CASA_LOG)
        if plan.interface == "desktop":
            # The desktop (and the CASA terminal's import of casatools) starts with the session's
            # process, while the Jupyter server starts and the browser is redirected.
            extra["CASASPAWNER_DESKTOP_START"] = "1"
            extra.update(await self._desktop_releases())
        if env.python is not None:
            try:
                jupyter_path.insert(0, str(env.write_kernelspec(plan.kernel_name)))
            except CasaspawnerError as exc:
                if plan.interface == "lab":
                    raise spawn_error(str(exc), reason="no-kernel") from None
            kernel = f"--MappingKernelManager.default_kernel_name={env.kernel_id}"
        else:
            kernel = ""
        if plan.interface == "lab" and env.python is None:
            raise spawn_error(
                f"{plan.release.label} has no Python 3 for a notebook kernel; "
                "choose the CASA desktop.",
                "no-kernel",
            )
        extra["JUPYTER_PATH"] = os.pathsep.join(jupyter_path)
        ours = ("default_kernel_name", "LabApp.app_settings_dir")
        self.args = [
            *(a for a in self.args if not any(k in a for k in ours)),
            *filter(None, [kernel, lab_settings]),
        ]
        # The desktop's vncserver wrapper picks an X display no other X server (or container) uses.
        desktop_bin = str(self.desktop_dir() / "bin")
        extra["PATH"] = os.pathsep.join([desktop_bin, os.environ.get("PATH", "/usr/bin:/bin")])
        # The session's record names the environment by the content hash of its package list.
        digest = await asyncio.to_thread(env.content_digest)
        refusal = environment_refusal(plan, digest)
        if refusal:
            raise spawn_error(refusal, reason="relaunch")
        self._environment_digest = digest
        runtime = Runtime(
            "environment", str(env.root), digest, "sha256 of the environment's package list"
        )
        extra.update(
            self.record_environment(plan, runtime, self.storage_layout(), str(env.measures))
        )
        self.environment = {**self.environment, **extra}
        log_path = Path(plan.home) / self.session_log_name
        try:
            existing = os.lstat(log_path)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (
            stat.S_ISREG(existing.st_mode) and existing.st_uid == uid
        ):
            raise spawn_error(
                f"~/{self.session_log_name} in your home is not a regular file of yours "
                "(a link?); remove it and start again.",
                reason="session-log",
            )
        self._session_log = str(log_path)
        self.popen_kwargs = {**self.popen_kwargs, "cwd": plan.home}
        try:
            return await super().start()
        except subprocess.SubprocessError:
            # The child could not open its log; see make_preexec_fn.
            raise spawn_error(
                f"The session could not open ~/{self.session_log_name} in your home; "
                "remove it and start again.",
                reason="session-log",
            ) from None

    async def _desktop_releases(self) -> dict[str, str]:
        """The variables telling the desktop which other releases' apps it can add.

        The ready environments are written to ``desktop-releases.json`` under the cache
        (:mod:`casaspawner.local.environments.desktop`). A cache that cannot be written costs
        the desktop its other releases, not the session.
        """
        try:
            path = await asyncio.to_thread(
                write_desktop_releases, self.environment_manager(), self.casa_catalog()
            )
        except OSError as exc:
            self.log.warning("The desktop's other CASA releases are not listed: %s", exc)
            return {}
        extra = {RELEASES_FILE_ENV: str(path)}
        if self.releases_url:
            extra[RELEASES_URL_ENV] = self.releases_url
        return extra

    async def _answering(self, address: tuple[str, int]) -> None:
        """Wait until the session's server answers, or its process ends, or ``http_timeout``.

        The hub waits for it too, but asks less and less often (after 0.2, 0.6, 1.4, 3 s …), so
        a server that answers after 2 s is found at 3 s. Asked every 0.05 s here, the hub's
        first question finds it answering. The hub goes on judging the server as usual.
        """
        ip, port = address
        url = f"http://{ip or '127.0.0.1'}:{port}{self.server.base_url}api"
        client = AsyncHTTPClient()
        deadline = time.monotonic() + self.http_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return
            try:
                response = await client.fetch(url, raise_error=False, request_timeout=2)
            except Exception:
                # Not listening yet.
                response = None
            if response is not None and response.code == 200:
                return
            await asyncio.sleep(0.05)

    def make_preexec_fn(self, name: str) -> Callable[[], None]:
        """What the session's process runs before the server.

        It becomes the plan's user and opens the log.

        On a hub running as root the process takes the plan's uid, gid and supplemental gids.
        Then, as that user, it opens the session log (no links followed) as stdout and stderr and
        adds ``~/arc``.
        """
        plan = self.session_plan
        if plan is None:
            raise RuntimeError("a local session starts only from a plan")
        identity = plan.identity
        log_path = self._session_log
        link = None
        if os.path.normpath(self.storage_root) != POD_STORAGE_ROOT:
            link = (os.path.join(plan.home, "arc"), self.storage_root)
        become = running_as_root()

        def preexec() -> None:
            if become:
                os.setgroups(list(identity.supplemental_gids))
                os.setgid(identity.gid)
                os.setuid(identity.uid)
            if log_path is not None:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY
                fd = os.open(log_path, flags | os.O_CLOEXEC, 0o600)
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                    raise OSError(f"{log_path} is not a regular file of the session's user")
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
            # The session works without the link.
            if link is not None and not os.path.lexists(link[0]):
                with contextlib.suppress(OSError):
                    os.symlink(link[1], link[0])

        return preexec

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        """The session's ``USER``, ``SHELL`` and ``HOME``, from the plan's identity."""
        plan = self.session_plan
        uid = plan.identity.uid if plan is not None else os.getuid()
        try:
            env["USER"] = pwd.getpwuid(uid).pw_name
        except KeyError:
            env["USER"] = plan.username if plan is not None else str(uid)
        env["SHELL"] = "/bin/bash"
        env["HOME"] = plan.home if plan is not None else env.get("HOME", "/")
        return env

    async def stop(self, now: bool = False) -> None:
        """Stop the Jupyter server, then whatever it left behind.

        That is the desktop's VNC server, X clients and CASA. jupyter-server-proxy's VNC server and
        the X programs start sessions of their own, so stopping the server's process group alone
        would leave the desktop running. They are listed before the server is stopped and held as
        :class:`ProcessHandle` objects. So the signals sent seconds later never reach a process
        that got one of their pids meanwhile.
        """
        tree = await asyncio.to_thread(session_processes, self.pid) if self.pid else []
        try:
            await super().stop(now=now)
            await asyncio.to_thread(terminate, tree)
        finally:
            for process in tree:
                process.close()

    async def complete_record(self) -> None:
        """Add the end time to the session's record when the session could not, as the user.

        A session killed (``SIGKILL``, a crash) never completes its own record. A hub running as
        root completes it as the owner of the record's directory, who wrote it, with the
        resolver's Python; otherwise the session ran as the hub's own user, who completes it
        here.
        """
        directory, self.session_record_dir = self.session_record_dir, None
        if not directory:
            return
        if not running_as_root():
            try:
                await asyncio.to_thread(complete_record_file, Path(directory))
            except OSError as exc:
                self.log.warning("The record in %s could not be completed: %s", directory, exc)
            return
        try:
            owner = os.lstat(directory)
        except OSError:
            # The session never wrote it.
            return
        if not stat.S_ISDIR(owner.st_mode) or owner.st_uid == 0:
            return
        python = await self._resolver_python()
        pythonpath = str(self.environment_manager().session_files() / "python")
        # The owner's ids are given to the child by subprocess itself: no Python runs between
        # fork and exec in the hub (see make_preexec_fn for the session's own process).
        process = await asyncio.create_subprocess_exec(
            python,
            "-s",
            "-m",
            "casaspawner.insession.record",
            "stop",
            directory,
            env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"},
            cwd="/",
            user=owner.st_uid,
            group=owner.st_gid,
            extra_groups=[],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, error = await asyncio.wait_for(process.communicate(), 30)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            error = b"timed out"
        if process.returncode:
            self.log.warning(
                "The record in %s could not be completed: %s",
                directory,
                error.decode(errors="replace")[-500:],
            )

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

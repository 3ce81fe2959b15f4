"""LocalCASASpawner: CASA sessions as local processes, on one machine, without a cluster.

The same form, validation and :class:`~casaspawner.plan.SessionPlan` as the Kubernetes spawner; the plan
becomes a process instead of a pod:

* the Jupyter server is ``jupyterhub-singleuser`` from casaspawner's own environment (``ui_prefix``), never
  from the CASA environment; CASA runs as a kernel and as desktop applications from the release's
  environment (:mod:`casaspawner.environments`), built on demand with progress on the spawn page;
* storage: ``storage_root`` stands in for Cavern (``home/<user>``, ``projects/<group>``), and the session sees
  it at the paths the plan gives;
* identity: sessions never run as root. A hub running as root gives each user a local account on first
  login (``useradd``, as The Littlest JupyterHub does); otherwise sessions run as the hub's own user.
"""

from __future__ import annotations

import asyncio
import grp
import html
import os
import pwd
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from traitlets import Bool, Integer, List, Unicode, default

from casaspawner.environments import CasaEnvironment, EnvironmentManager, default_cache_dir
from casaspawner.environments.pythons import world_usable
from casaspawner.errors import CasaspawnerError, InvalidInput
from casaspawner.plan import INTERFACES, Identity, SessionPlan, Substitution, make_plan
from casaspawner.spawners.common import CASASessionMixin, spawn_error

#: What the sessions' Jupyter environment needs (pinned to the hub's own versions when it is built).
UI_PACKAGES = ("jupyterhub", "jupyterlab", "jupyter-remote-desktop-proxy", "jupyter-server-proxy")
DESKTOP_DIR = Path(__file__).resolve().parent.parent / "desktop"
_SYSTEM_NAME = re.compile(r"[a-z_][a-z0-9_.\-]{0,31}")


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found[::-1]


def _terminate(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then after ``grace`` seconds SIGKILL, each of ``pids`` still alive."""
    import signal
    import time

    alive = [p for p in pids if _signal(p, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _signal(p, 0)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _render_local_options_form(spawner: LocalCASASpawner) -> str:
    return spawner.render_options_form() + await spawner.resolution_preview()


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
        return str(DESKTOP_DIR / "xstartup")

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
        name is appended), e.g. a site mirror for hubs without internet access. Checksums are still verified.
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
        with the hub's versions of these packages, built once under ``environments_dir``.
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
        help="File in the user's home receiving the session server's output (it outlives hub restarts).",
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

    # ---------------------------------------------------------------------------------------- state
    args: list[str]
    cmd: list[str]
    popen_kwargs: dict[str, Any]
    notebook_dir: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._events: list[dict[str, Any]] = []
        self._starting = False
        self.casa_environment: CasaEnvironment | None = None
        super().__init__(*args, **kwargs)

    def environment_manager(self) -> EnvironmentManager:
        return EnvironmentManager(
            Path(self.environments_dir),
            measures_path=Path(self.measures_path) if self.measures_path else None,
            tarball_mirror=self.tarball_mirror,
            pip_args=self.pip_args,
            probe_timeout=self.probe_timeout,
        )

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
        cmd = ["useradd", "--home-dir", home, "--no-create-home", "--shell", "/bin/bash", "--user-group"]
        cmd += ["--comment", f"casaspawner session user {self.user.name}", name]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            why = (result.stderr.strip().splitlines() or ["useradd failed"])[-1]
            raise InvalidInput(f"No local account could be created for {self.user.name}: {why}.")
        self.log.info("Created local account %s for %s", name, self.user.name)
        return pwd.getpwnam(name)

    def _ensure_project_group(self, group: str, account: str) -> int:
        """The local group of a project, created if needed, with ``account`` as a member (root only)."""
        name = self.system_group_template.format(group=group).lower()
        if not _SYSTEM_NAME.fullmatch(name):
            raise InvalidInput(f"The project {group!r} cannot be made into a local group name ({name!r}).")
        try:
            entry = grp.getgrnam(name)
        except KeyError:
            subprocess.run(["groupadd", name], check=True, capture_output=True, timeout=60)
            entry = grp.getgrnam(name)
        if account not in entry.gr_mem:
            subprocess.run(
                ["usermod", "-a", "-G", name, account], check=True, capture_output=True, timeout=60
            )
        return entry.gr_gid

    async def session_identity(self) -> Identity:
        """A local account when the hub is root, else the hub's own user; groups are the hub groups."""
        pattern = re.compile(self.project_group_pattern)
        groups = tuple(g.name for g in getattr(self.user, "groups", []) if pattern.fullmatch(g.name))
        home = self.home_mount_template.format(username=self.user.name)
        if _running_as_root():
            account = await asyncio.to_thread(self._ensure_account, home)
            gids = []
            for group in groups:
                gids.append(await asyncio.to_thread(self._ensure_project_group, group, account.pw_name))
            return Identity(self.user.name, account.pw_uid, account.pw_gid, groups, tuple(gids))
        return Identity(self.user.name, os.getuid(), os.getgid(), groups)

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
        except CasaspawnerError as exc:
            raise spawn_error(str(exc)) from None
        self.session_plan = plan
        self.apply_plan(plan)
        self.user_options = {**self.user_options, **self.options_summary(plan)}
        self._plan_for = dict(self.user_options)
        orm_spawner = getattr(self, "orm_spawner", None)
        if orm_spawner is not None:
            orm_spawner.user_options = dict(self.user_options)
        self.log.warning("Approximate CASA session for %s: %s", self.user.name, plan.reason)
        return plan

    def apply_plan(self, plan: SessionPlan) -> None:
        super().apply_plan(plan)
        self.notebook_dir = plan.home
        scratch = Path(self.storage_root) / "scratch" / plan.username
        self.environment = {
            **self.environment,
            "SCRATCH": str(scratch),
            "CASASPAWNER_REASON": plan.reason,
            "CASASPAWNER_DESKTOP_DIR": str(DESKTOP_DIR),
        }

    @default("options_form")
    def _local_options_form_default(self) -> Callable[[Any], Any]:
        return _render_local_options_form

    async def resolution_preview(self) -> str:
        """For a returning user: the last dataset, the build it resolves to and why, and whether this machine
        can install that build (or will run an approximation). Empty when there is nothing to show."""
        dataset = (self.user_options or {}).get("dataset")
        if not isinstance(dataset, str) or not dataset.strip():
            return ""
        try:
            resolution = await self.resolve_dataset(dataset, await self.session_identity())
        except CasaspawnerError:
            return ""  # the form's own validation will say what is wrong when it is submitted
        exactness = "the exact build" if resolution.exact else "not the exact build"
        text = f"{dataset}: {resolution.release.label}, {exactness}. {resolution.reason}"
        manager = self.environment_manager()
        problem = await asyncio.to_thread(manager.unavailable_reason, resolution.release)
        if problem and self.allow_approximate:
            text += f" {problem} The session will run the nearest installable release, marked approximate."
        elif problem:
            text += f" {problem}"
        return f'<p class="casa-help" id="casa-resolved" role="status">{html.escape(text)}</p>\n'

    def render_options_form(self, error: str = "") -> str:
        form = super().render_options_form(error)
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
        """Home, project and scratch directories, owned by the session's user (or project group)."""
        root = _running_as_root()
        scratch = Path(self.environment["SCRATCH"])
        for path, mode in ((Path(plan.home), 0o750), (scratch, 0o700)):
            path.mkdir(parents=True, exist_ok=True)
            if root and path.stat().st_uid != uid:
                os.chown(path, uid, gid)
                os.chmod(path, mode)
        groups = dict(zip(plan.identity.groups, plan.identity.supplemental_gids, strict=False))
        for mount in plan.mounts:
            if not mount.name.startswith("project-"):
                continue
            path = Path(mount.path)
            path.mkdir(parents=True, exist_ok=True)
            group = next((g for g in groups if f"project-{g.lower()}" == mount.name), None)
            if root and group is not None and path.stat().st_gid != groups[group]:
                os.chown(path, 0, groups[group])
                os.chmod(path, 0o2770)  # noqa: S103 - the project's group shares it

    async def start(self) -> Any:
        self._events = []
        self._starting = True
        try:
            plan = await self.prepare_session()
            for event in self.plan_progress_events():
                if not event["message"].startswith("Starting "):
                    self._events.append(event)
            if plan.approximate:
                self._event(f"Approximate session: {plan.reason}")
            env = await self._ensure_environment(plan)
            self._event(f"Starting {INTERFACES[plan.interface]} with {plan.kernel_name}.", 92)
            return await self._launch(plan, env)
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

    async def _launch(self, plan: SessionPlan, env: CasaEnvironment) -> Any:
        uid, gid = plan.identity.uid, plan.identity.gid
        await asyncio.to_thread(self._prepare_directories, plan, uid, gid)
        prefix = await self._ui_environment()
        self.cmd = [str(prefix / "bin" / "jupyterhub-singleuser")]
        extra = dict(env.session_environment())
        if env.python is not None:
            try:
                extra["JUPYTER_PATH"] = str(env.write_kernelspec(plan.kernel_name))
            except CasaspawnerError as exc:
                if plan.interface == "lab":
                    raise spawn_error(str(exc), reason="no-kernel") from None
            args: list[str] = list(self.args)
            self.args = [
                *[a for a in args if "default_kernel_name" not in a],
                f"--MappingKernelManager.default_kernel_name={env.kernel_id}",
            ]
        elif plan.interface == "lab":
            raise spawn_error(
                f"{plan.release.label} has no Python 3 for a notebook kernel; choose the CASA desktop.",
                "no-kernel",
            )
        # The desktop's vncserver wrapper picks an X display no other X server (or container) uses.
        extra["PATH"] = os.pathsep.join([str(DESKTOP_DIR / "bin"), os.environ.get("PATH", "/usr/bin:/bin")])
        self.environment = {**self.environment, **extra}
        log_path = Path(plan.home) / self.session_log_name
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the session process, closed below
        try:
            if _running_as_root():
                os.fchown(log.fileno(), uid, gid)
            self.popen_kwargs = {
                **self.popen_kwargs,
                "stdout": log,
                "stderr": subprocess.STDOUT,
                "cwd": plan.home,
            }
            return await super().start()
        finally:
            log.close()

    def make_preexec_fn(self, name: str) -> Callable[[], None] | None:
        """Become the session's local account (hub as root); otherwise stay the hub's own user."""
        if _running_as_root():
            return set_user_setuid(self.system_username(), chdir=False)  # type: ignore[no-any-return]
        return None

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        plan = self.session_plan
        env["USER"] = self.system_username() if _running_as_root() else pwd.getpwuid(os.getuid()).pw_name
        env["SHELL"] = "/bin/bash"
        env["HOME"] = plan.home if plan is not None else env.get("HOME", "/")
        return env

    async def stop(self, now: bool = False) -> None:
        """Stop the Jupyter server, then whatever it left behind (the desktop's VNC server, X clients, CASA).

        jupyter-server-proxy's VNC server and the X programs start sessions of their own, so stopping the
        server's process group alone would leave the desktop running.
        """
        tree = _descendants(self.pid) if self.pid else []
        await super().stop(now=now)
        await asyncio.to_thread(_terminate, tree)

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

"""The hub side both CASA spawners share: traits, hooks and the session's state.

``CASASessionMixin`` sits in front of a concrete JupyterHub spawner::

    class CASASpawner(CASASessionMixin, KubeSpawner): ...
    class LocalCASASpawner(CASASessionMixin, LocalProcessSpawner): ...

It turns traits into :class:`~casaspawner.session.settings.SessionSettings`, runs the session
pipeline (:func:`casaspawner.session.prepare.prepare`) from ``apply_user_options``, and supplies
the pipeline's steps that need the hub: identity from ``auth_state``, the dataset reader, the
operators' drained releases. Each backend translates the plan into its own traits once, in
:meth:`CASASessionMixin.apply_plan`, and writes the session's summary back with
:meth:`CASASessionMixin.record_session`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyterhub.traitlets import ByteSpecification
from jupyterhub.utils import maybe_future
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Float, Integer, List, Unicode, Union, default
from traitlets import Callable as CallableTrait

from casaspawner.catalog.model import Catalog, Release, load_catalog
from casaspawner.datasets.cache import RESOLUTIONS
from casaspawner.datasets.model import Resolution
from casaspawner.datasets.worker import WorkerLimits, look_up, resolve_in_worker
from casaspawner.errors import CasaspawnerError, ConfigurationError, InvalidInput
from casaspawner.plan import (
    DEFAULT_SIZES,
    MAX_ID,
    Identity,
    PlanConfig,
    Resources,
    SessionPlan,
    StorageLayout,
    Substitution,
)
from casaspawner.session import config
from casaspawner.session.form import render_form
from casaspawner.session.identity import identity_from_login, login_value, project_groups
from casaspawner.session.options import input_options, options_from_form, session_output
from casaspawner.session.prepare import prepare
from casaspawner.session.progress import plan_events
from casaspawner.session.readers import DatasetReader, StorageMountReader
from casaspawner.session.relaunch import HISTORY_LIMIT, PastSession
from casaspawner.session.settings import SessionSettings
from casaspawner.session.vospace import VOSpaceReader, tells_version
from casaspawner.spawners.errors import hook_failure, spawn_refusal

# The mixin always sits in front of a Spawner, but JupyterHub refuses Spawner subclasses
# without start, stop and poll.
if TYPE_CHECKING:
    from jupyterhub.spawner import Spawner as _MixinBase
else:
    from traitlets.config import LoggingConfigurable as _MixinBase


class CASASessionMixin(_MixinBase):  # type: ignore[misc]
    """Traits, hooks and session state shared by both CASA spawners."""

    catalog_path = Unicode(
        None,
        allow_none=True,
        help="""
        Path of the release catalog (``releases.yaml``) to use instead of the one shipped with
        casaspawner. The catalog decides which CASA builds exist, which dataset runs with which
        build, and image tags.
        """,
    ).tag(config=True)

    image_registry = Unicode(
        PlanConfig.image_registry,
        help="""
        Registry and namespace holding the CASA session images, e.g. ``ghcr.io/casaspawner``.
        Images are named with ``image_template``; the image build tool tags them with the same
        rule.
        """,
    ).tag(config=True)

    image_template = Unicode(
        PlanConfig.image_template,
        help="""
        Template of a session image reference. Fields: ``{registry}`` (``image_registry``),
        ``{tag}`` (the release's image tag, e.g. ``6.5.4-9-pipeline-2023.1.0.124``), ``{casa}``,
        ``{pipeline}`` and ``{id}``.
        """,
    ).tag(config=True)

    label_prefix = Unicode(
        PlanConfig.label_prefix,
        help="""
        Prefix (a DNS subdomain) of the labels and annotations casaspawner puts on sessions, e.g.
        ``casaspawner.io/release``. Labels set by KubeSpawner or the Helm chart are never replaced.
        """,
    ).tag(config=True)

    session_sizes = Dict(
        {
            name: {
                "cpu_guarantee": r.cpu_guarantee,
                "cpu_limit": r.cpu_limit,
                "mem_guarantee": r.mem_guarantee,
                "mem_limit": r.mem_limit,
                "description": r.description,
            }
            for name, r in DEFAULT_SIZES.items()
        },
        help="""
        Session sizes offered on the form, in order: name → ``{cpu_guarantee, cpu_limit,
        mem_guarantee, mem_limit, description}``. CPU is a number of cores (``0.5``, ``4``).
        Memory is what KubeSpawner's ``mem_limit`` takes: JupyterHub's units of 1024, text with
        ``K``, ``M``, ``G`` or ``T`` (``8G`` is 8 GiB), or a whole number of bytes that is a
        multiple of 1024 (``8589934592``); the Kubernetes spelling ``8Gi`` (which
        ``scratch_size_limit`` uses) is refused with a sentence. The description is what users
        see next to the name.
        """,
    ).tag(config=True)

    default_size = Unicode(
        "medium",
        help=(
            "Size preselected on the form and used when a spawn request names none "
            "(a key of ``session_sizes``)."
        ),
    ).tag(config=True)

    allow_release_override = Bool(
        True,
        help="""
        Whether users may choose a CASA release other than the one resolved for their dataset
        (the form's advanced section). Such a session is marked as not exact everywhere it is
        shown.
        """,
    ).tag(config=True)

    desktop_xstartup = Unicode(
        PlanConfig.desktop_xstartup,
        help="""
        Start script of the CASA desktop inside the session image, passed to
        jupyter-remote-desktop-proxy as ``JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP`` for desktop
        sessions.
        """,
    ).tag(config=True)

    # Storage
    home_subpath_template = Unicode(
        StorageLayout.home_subpath,
        help="Directory of a user's home inside the storage root; ``{username}`` is replaced.",
    ).tag(config=True)

    home_mount_template = Unicode(
        StorageLayout.home_mount,
        help=(
            "Where the user's home appears in a session; ``{username}`` is replaced. "
            "It is also ``HOME``."
        ),
    ).tag(config=True)

    project_subpath_template = Unicode(
        StorageLayout.project_subpath,
        help=(
            "Directory of a project (one per group of the user) inside the storage root; "
            "``{group}`` is replaced."
        ),
    ).tag(config=True)

    project_mount_template = Unicode(
        StorageLayout.project_mount,
        help="Where a project directory appears in a session; ``{group}`` is replaced.",
    ).tag(config=True)

    project_group_pattern = Unicode(
        r".*",
        help="""
        Regular expression a group name must match in full for its project directory to be
        mounted. Use it to keep authorization-only groups out of the session, e.g. ``proj-.*``.
        Groups whose names cannot be directory names (a letter or digit, then up to 63 letters,
        digits, ``.``, ``_`` or ``-``; e.g. not ``org/sub`` or ``ivo://cadc.nrc.ca/gms?alma``)
        are skipped and logged, never an error.
        """,
    ).tag(config=True)

    scratch_mount_path = Unicode(
        StorageLayout.scratch_mount,
        help="Where the per-session scratch space appears in a session (exported as ``SCRATCH``).",
    ).tag(config=True)

    scratch_size_limit = Unicode(
        StorageLayout.scratch_limit,
        help="Size limit of the per-session scratch space, as a quantity such as ``20Gi``.",
    ).tag(config=True)

    measures_mount_path = Unicode(
        StorageLayout.measures_mount,
        help=(
            "Where the read-only CASA measures data appears in a session "
            "(exported as ``CASA_MEASURES_PATH``)."
        ),
    ).tag(config=True)

    # Datasets
    storage_hub_path = Unicode(
        None,
        allow_none=True,
        help="""
        Hub-side path of a read-only mount of the storage root (Cavern), e.g. ``/cavern``: the
        hub reads datasets named by path from ``<storage_hub_path>/home/<user>/…`` and
        ``…/projects/<group>/…`` to resolve their CASA version. ``CASASpawner``'s default is
        unset: datasets can then only be named by ALMA identifier, unless ``vospace_url`` or
        ``dataset_reader`` is configured. ``LocalCASASpawner``'s default is its
        ``storage_root``.
        """,
    ).tag(config=True)

    vospace_url = Unicode(
        None,
        allow_none=True,
        help="""
        Base URL of a VOSpace 2 service holding the users' storage, e.g.
        ``https://ws-uv.canfar.net/arc`` (nodes at ``<url>/nodes/home/<user>/…``, files at
        ``<url>/files/…``). When set, the hub reads datasets named by path through it with the
        user's access token instead of a storage mount.
        """,
    ).tag(config=True)

    dataset_reader = AnyTrait(
        None,
        allow_none=True,
        help="""
        Object giving the hub read access to datasets named by path
        (``casaspawner.session.readers.DatasetReader``: an async context manager
        ``open(path, identity)`` yielding a local directory), or a callable
        ``(spawner) -> reader``. Use it for storage reached through an API such as VOSpace.
        Default: a reader over ``storage_hub_path``.
        """,
    ).tag(config=True)

    archive_client = AnyTrait(
        None,
        allow_none=True,
        help="""
        ALMA archive client used to resolve datasets given by identifier
        (``casaspawner.datasets.archive.ArchiveClient``, e.g. ``AlmaDataLinkClient()``), or a
        callable ``(spawner) -> client``. Unset: identifiers are refused with a sentence asking
        for a path.
        """,
    ).tag(config=True)

    resolve_timeout = Float(
        60,
        help="""
        Seconds a dataset's resolution may take: reading its evidence, or looking an
        identifier up in the archive, in a worker process off the hub's event loop; one that
        takes longer is stopped. Each of the hub's own looks at the storage (the walk to the
        dataset, the check of a cached resolution) may take as long, from the hub's storage
        threads. Either way the user is told in one sentence.
        """,
    ).tag(config=True)

    resolve_cpu_limit = Integer(
        30,
        help="""
        CPU seconds the resolution worker may use (``RLIMIT_CPU``). Real datasets need well
        under a second; a hostile one is stopped here, and the user is told in one sentence.
        """,
    ).tag(config=True)

    resolve_memory_limit = ByteSpecification(
        "2G",
        help="""
        Memory the resolution worker may map (``RLIMIT_AS``), in JupyterHub's units: ``2G`` is
        2 GiB. Real datasets need a few hundred MiB at most, a Python interpreter included.
        """,
    ).tag(config=True)

    recent_datasets_limit = Integer(
        8,
        help="How many recently used datasets the spawn form offers (kept in the server's state).",
    ).tag(config=True)

    suggested_datasets = List(
        Unicode(),
        help="""
        Datasets the spawn form suggests to a user who has named none yet: the first fills the
        dataset field and is the form's example, e.g. ``["~/2023.1.01234.S"]`` on the demo hub.
        """,
    ).tag(config=True)

    headless_runs_url = Unicode(
        "",
        help="""
        Where the form's *Run headless* button leads (a GET with the form's dataset, size,
        release and script), e.g. ``/hub/casa-runs/new``; empty shows no button. The hub's
        pages of :mod:`casaspawner.services.runs` answer there.
        """,
    ).tag(config=True)

    # Identity
    uid_claim = Unicode(
        "oauth_user.uid",
        help=(
            "Dotted key of the numeric user id in ``auth_state`` "
            "(OAuthenticator keeps user info in ``oauth_user``)."
        ),
    ).tag(config=True)

    gid_claim = Unicode(
        "oauth_user.gid",
        help=(
            "Dotted key of the numeric primary group id in ``auth_state``; "
            "missing means the uid is used."
        ),
    ).tag(config=True)

    groups_claim = Unicode(
        "oauth_user.groups",
        help="""
        Dotted key of the user's group names in ``auth_state`` (a list; a leading ``/`` is
        dropped). Missing: the user's JupyterHub groups are used. Each group whose name matches
        ``project_group_pattern`` gets its project directory mounted.
        """,
    ).tag(config=True)

    supplemental_gids_claim = Unicode(
        "oauth_user.gids",
        help="Dotted key of the user's supplemental numeric group ids in ``auth_state`` (a list).",
    ).tag(config=True)

    identity_hook = CallableTrait(
        None,
        allow_none=True,
        help="""
        Callable ``(spawner, auth_state) -> dict`` (may be async) returning ``uid``, ``gid``,
        ``groups`` and ``supplemental_gids`` for the user, replacing the ``*_claim`` look-ups.
        uid 0 is refused either way.
        """,
    ).tag(config=True)

    fallback_uid = Integer(
        None,
        allow_none=True,
        help="""
        uid to run as when ``auth_state`` has none. Unset (the default), a user without a uid
        cannot start a session. Never 0.
        """,
    ).tag(config=True)

    fallback_gid = Integer(
        None,
        allow_none=True,
        help="gid to run as when ``auth_state`` has none (default: the uid).",
    ).tag(config=True)

    allow_root_group = Bool(
        False,
        help="""
        Whether a session may run with gid 0 (the root group) as its primary or a supplemental
        group. Off by default: files owned by the root group are often writable by it, so a
        login giving gid 0 is refused with a sentence. uid 0 is refused whatever this says.
        """,
    ).tag(config=True)

    access_token_claim = Unicode(
        "access_token",
        help="""
        Dotted key of the user's access token in ``auth_state``. The token reaches the session
        only as a file (a Kubernetes Secret, or a private file for local sessions), never in the
        environment or the logs.
        """,
    ).tag(config=True)

    # Operations
    blocked_releases = Union(
        [List(Unicode()), CallableTrait()],
        default_value=[],
        help="""
        Releases that may not be started right now (e.g. while their image is being replaced): a
        list of release ids, or a callable ``(spawner) -> {release id: message}`` (may be
        async), which the operators' drain service provides. Spawning a blocked release is
        refused with the message before any object exists.
        """,
    ).tag(config=True)

    notices_url = Unicode(
        "",
        help="""
        Where sessions ask the casa-sessions service for their notices (their release is
        drained, their idle session is about to be stopped), e.g.
        ``http://hub:10101/services/casa-sessions/api/notices``. Sessions get it as
        ``CASASPAWNER_NOTICES_URL``, with ``CASASPAWNER_NOTICES_FILE``: the file in the home
        directory that shows the notices (``CASA-NOTICES.md``; ``CASA-NOTICES-<server>.md`` for
        a named server, with a short hash appended when the name has characters other than
        letters, digits, ``.``, ``_`` and ``-``). Empty (the default): no notices.
        ``casaspawner.hubconfig`` sets it.
        """,
    ).tag(config=True)

    # State
    session_plan: SessionPlan | None = None
    recent_datasets: list[str]
    #: What the last dataset resolved to: the form's preselection and preview.
    last_resolution: dict[str, Any] | None
    #: Past sessions, newest first, with the digest each ran: the form's "Relaunch exactly".
    session_history: list[PastSession]
    user_options: dict[str, Any]
    environment: dict[str, Any]

    #: Traits :meth:`apply_plan` sets.
    #:
    #: Spawner objects live across sessions, so the values these had before a plan was applied
    #: (configuration, and what this spawn's hooks set) are remembered and put back when the
    #: session ends: nothing is left over from the last session.
    plan_traits: tuple[str, ...] = ("default_url", "environment")

    #: The operator's templates, and the fields each may use.
    template_fields: dict[str, tuple[str, ...]] = {
        "image_template": ("registry", "tag", "casa", "pipeline", "id"),
        "home_subpath_template": ("username",),
        "home_mount_template": ("username",),
        "project_subpath_template": ("group",),
        "project_mount_template": ("group",),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recent_datasets = []
        self.last_resolution = None
        self.session_history = []
        self.session_plan = None
        self._plan_for: dict[str, Any] | None = None
        self._access_token: str | None = None
        self._casa_baseline: dict[str, Any] | None = None
        self._catalog_cache: tuple[str | None, Catalog] | None = None
        super().__init__(*args, **kwargs)

    # Configuration
    def casa_catalog(self) -> Catalog:
        """The release catalog: ``catalog_path``, or the bundled one."""
        cached = self._catalog_cache
        if cached is None or cached[0] != self.catalog_path:
            cached = self._catalog_cache = (self.catalog_path, load_catalog(self.catalog_path))
        return cached[1]

    def option(self, name: str) -> str:
        """How error sentences name an option, e.g. ``LocalCASASpawner.session_sizes``."""
        return f"{type(self).__name__}.{name}"

    def storage_layout(self) -> StorageLayout:
        """Where storage appears in sessions, from the templates."""
        return StorageLayout(
            home_subpath=self.home_subpath_template,
            home_mount=self.home_mount_template,
            project_subpath=self.project_subpath_template,
            project_mount=self.project_mount_template,
            scratch_mount=self.scratch_mount_path,
            scratch_limit=self.scratch_size_limit,
            measures_mount=self.measures_mount_path,
        )

    def size_resources(self) -> dict[str, Resources]:
        """``session_sizes`` checked and typed."""
        return config.sizes(self.session_sizes, self.option("session_sizes"))

    def check_config(self) -> None:
        """Check the operator's settings, naming a bad one as the hub's fault.

        Raises ``ConfigurationError`` naming the option; subclasses add their own checks.
        """
        sizes = self.size_resources()
        if self.default_size not in sizes:
            raise ConfigurationError(
                f"{self.option('default_size')} is {self.default_size!r}, which is not one of "
                f"{self.option('session_sizes')} ({', '.join(sizes)})"
            )
        for name, fields in self.template_fields.items():
            config.check_template(self.option(name), getattr(self, name), fields)
        for name in (
            "home_mount_template",
            "project_mount_template",
            "scratch_mount_path",
            "measures_mount_path",
        ):
            if not getattr(self, name).startswith("/"):
                raise ConfigurationError(
                    f"{self.option(name)} is {getattr(self, name)!r}; a place in the session is "
                    "an absolute path"
                )
        try:
            re.compile(self.project_group_pattern)
        except re.error as exc:
            raise ConfigurationError(
                f"{self.option('project_group_pattern')} is {self.project_group_pattern!r}, not a "
                f"regular expression ({exc.msg})"
            ) from None
        for name in ("resolve_timeout", "resolve_cpu_limit"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(
                    f"{self.option(name)} is {getattr(self, name)}, not a number above 0"
                )
        if self.resolve_memory_limit < 256 << 20:
            raise ConfigurationError(
                f"{self.option('resolve_memory_limit')} is {self.resolve_memory_limit} bytes; "
                "a resolution worker needs at least 256M"
            )
        for name, lowest in (("fallback_uid", 1), ("fallback_gid", 0)):
            value = getattr(self, name)
            if value is not None and not lowest <= value <= MAX_ID:
                raise ConfigurationError(
                    f"{self.option(name)} is {value}, not an id from {lowest} to {MAX_ID}"
                )
        # catalog_path and label_prefix are the operator's, not the user's.
        try:
            self.casa_catalog()
            self.plan_config()
        except ConfigurationError:
            raise
        except CasaspawnerError as exc:
            raise ConfigurationError(str(exc)) from None

    def plan_config(self) -> PlanConfig:
        """The operator's choices as the plan sees them."""
        return PlanConfig(
            image_registry=self.image_registry,
            image_template=self.image_template,
            label_prefix=self.label_prefix,
            sizes=self.size_resources(),
            storage=self.storage_layout(),
            desktop_xstartup=self.desktop_xstartup,
        )

    def session_settings(self) -> SessionSettings:
        """The traits as the session pipeline reads them, checked first."""
        self.check_config()
        return SessionSettings(
            catalog=self.casa_catalog(),
            plan=self.plan_config(),
            default_size=self.default_size,
            allow_override=self.allow_release_override,
        )

    @property
    def reads_paths(self) -> bool:
        """Whether this hub can read datasets named by path."""
        return bool(self.storage_hub_path or self.vospace_url or self.dataset_reader)

    def get_archive_client(self) -> Any:
        """``archive_client``, called with the spawner when it is a factory."""
        client = self.archive_client
        if callable(client) and not hasattr(client, "fetch_manifest"):
            client = client(self)
        return client

    # The form
    @default("options_form")
    def _casa_options_form_default(self) -> Callable[[Any], Any]:
        return render_spawn_form

    def render_options_form(self, error: str = "", blocked: Collection[str] = ()) -> str:
        """Render the spawn form's HTML.

        A configuration problem is shown as the form's error. ``blocked`` holds the release ids
        left out of the override list.
        """
        configured = True
        try:
            self.check_config()
        except ConfigurationError as exc:
            error = error or str(exc)
            configured = False
        try:
            releases = self.casa_catalog().available()
        except CasaspawnerError:
            releases = []
        try:
            sizes = self.size_resources()
        except ConfigurationError:
            sizes = {}
        return render_form(
            releases=releases,
            sizes=sizes,
            default_size=self.default_size,
            previous=self.user_options or {},
            recent=self.recent_datasets,
            suggested=self.suggested_datasets,
            last=self.last_resolution,
            past=self.session_history,
            blocked=blocked,
            allow_override=self.allow_release_override,
            can_read_paths=self.reads_paths,
            home=self.form_home_hint() if configured else "~",
            runs_url=self.headless_runs_url,
            error=error,
        )

    def form_home_hint(self) -> str:
        """How the form's examples name the user's home."""
        return str(self.home_mount_template.format(username=self.user.name))

    @default("options_from_form")
    def _casa_options_from_form_default(self) -> Callable[[Any], dict[str, Any]]:
        return options_from_form

    # Operator hooks
    async def call_hook(self, name: str, hook: Callable[..., Any], *args: Any) -> Any:
        """Run the operator's hook ``name``, reporting a failure as the hub's fault.

        A hook that raises becomes one sentence marked as the hub's fault. The traceback goes to
        the hub's log. A ``SpawnException`` the hook raises stays as is.
        """
        try:
            return await maybe_future(hook(*args))
        except web.HTTPError:
            raise
        except Exception as exc:
            self.log.exception("%s failed for %s", name, self.user.name)
            raise hook_failure(name, exc) from None

    async def run_auth_state_hook(self, auth_state: Any) -> None:
        await self.call_hook("auth_state_hook", super().run_auth_state_hook, auth_state)

    async def apply_group_overrides(self) -> None:
        await self.call_hook("group_overrides", super().apply_group_overrides)

    async def run_pre_spawn_hook(self) -> None:
        await self.call_hook("pre_spawn_hook", super().run_pre_spawn_hook)

    # The session pipeline
    @default("apply_user_options")
    def _casa_apply_user_options_default(self) -> Callable[[Any, dict[str, Any]], Any]:
        return _apply_user_options

    async def prepare_session(self, user_options: Mapping[str, Any] | None = None) -> SessionPlan:
        """Run the session pipeline on ``user_options``.

        Any problem is refused with one sentence. The pipeline runs before any process, pod or
        other object exists. The plan is kept in ``session_plan``; a second call with the same
        options returns it.
        """
        options = input_options(self.user_options if user_options is None else user_options)
        if self.session_plan is not None and self._plan_for == options:
            return self.session_plan
        self.user_options = options
        try:
            plan = await prepare(options, self.session_settings(), self)
        except Exception as exc:
            self.session_plan = None
            raise spawn_refusal(exc, self.log) from None
        self.session_plan, self._plan_for = plan, dict(options)
        self.log.info("CASA session for %s: %s (%s)", self.user.name, plan.summary, plan.reason)
        return plan

    async def session_identity(self) -> Identity:
        """The user's uid, gid, groups and supplemental gids, from ``auth_state``."""
        auth_state = await self.user.get_auth_state() if self.user is not None else None
        name = self.user.name
        if self.identity_hook is not None:
            found = await self.call_hook("identity_hook", self.identity_hook, self, auth_state)
            if not isinstance(found, Mapping):
                raise InvalidInput(f"The identity of {name} could not be determined.")
            uid, gid = found.get("uid"), found.get("gid")
            groups, gids = found.get("groups"), found.get("supplemental_gids")
        else:
            uid = login_value(auth_state, self.uid_claim)
            gid = login_value(auth_state, self.gid_claim)
            groups = login_value(auth_state, self.groups_claim)
            gids = login_value(auth_state, self.supplemental_gids_claim)
        token = login_value(auth_state, self.access_token_claim) if auth_state else None
        self._access_token = token if isinstance(token, str) and token else None
        identity, skipped = identity_from_login(
            name,
            uid=uid,
            gid=gid,
            groups=self.hub_group_names() if groups is None else groups,
            supplemental_gids=gids,
            group_pattern=self.project_group_pattern,
            fallback_uid=self.fallback_uid,
            fallback_gid=self.fallback_gid,
            allow_root_group=self.allow_root_group,
        )
        self.log_skipped_groups(skipped)
        return identity

    def get_dataset_reader(self) -> DatasetReader | None:
        """What reads datasets named by path: ``dataset_reader``, VOSpace or the storage mount."""
        reader = self.dataset_reader
        if callable(reader) and not hasattr(reader, "open"):
            reader = reader(self)
        if reader is None and self.vospace_url:
            probe = functools.partial(
                tells_version,
                catalog=self.casa_catalog(),
                catalog_path=self.catalog_path,
                limits=self.resolver_limits(),
            )
            reader = VOSpaceReader(
                self.vospace_url, self.storage_layout(), self.access_token, probe=probe
            )
        if reader is None and self.storage_hub_path is not None:
            reader = StorageMountReader(
                self.storage_hub_path, self.storage_layout(), deadline=self.resolve_timeout
            )
        return reader  # type: ignore[no-any-return]

    async def kept_resolution(
        self, reader: DatasetReader, text: str, identity: Identity
    ) -> Resolution | None:
        """The hub's cached resolution of a dataset in the storage mount, if still valid.

        The walk to the directory and the look at what the resolution read share one trip to
        the hub's storage threads. A subclass whose :meth:`read_dataset` answers otherwise than
        from the hub's cache returns None.
        """
        # A reader of the operator's, even one derived from the mount's, reads through its open.
        if type(reader) is not StorageMountReader:
            return None
        look = functools.partial(
            look_up,
            RESOLUTIONS,
            label=text,
            catalog=self.casa_catalog(),
            catalog_path=self.catalog_path,
        )
        _, kept = await reader.look(text, identity, look)
        return kept

    async def read_dataset(self, target: Path | str, label: str, identity: Identity) -> Resolution:
        """Resolve a dataset directory or an identifier in a worker process with limits.

        A directory resolved before and unchanged since is answered by the hub's cache.
        """
        return await resolve_in_worker(
            target,
            label,
            self.casa_catalog(),
            catalog_path=self.catalog_path,
            archive=self.get_archive_client(),
            limits=self.resolver_limits(),
            cache=RESOLUTIONS,
        )

    def resolver_limits(self) -> WorkerLimits:
        """What one resolution may cost: ``resolve_timeout``, ``resolve_cpu_limit`` and memory."""
        return WorkerLimits(
            deadline=self.resolve_timeout,
            cpu_seconds=self.resolve_cpu_limit,
            memory_bytes=self.resolve_memory_limit,
        )

    def resolved(self, resolution: Resolution) -> None:
        """Remember the dataset and what it resolved to, for the next form."""
        self.remember_dataset(resolution.dataset)
        if resolution.evidence.kind != "none":
            self.last_resolution = {
                "dataset": resolution.dataset,
                "release": resolution.release.id,
                "exact": resolution.exact,
                "reason": resolution.reason,
            }

    async def substitute(self, release: Release) -> Substitution | None:
        """Another release when this backend cannot run ``release``: none by default."""
        return None

    async def measures_version(self, earlier: str | None) -> str | None:
        """The measures version a session reads; by default all of the measures it is given."""
        return None

    async def blocked_release_messages(self) -> dict[str, str]:
        """Map each release that may not start now to the operators' message.

        The keys are release ids.
        """
        blocked = self.blocked_releases
        if callable(blocked):
            found = await maybe_future(blocked(self))
            return {str(k): str(v or "") for k, v in dict(found or {}).items()}
        return {rid: "" for rid in blocked}

    def hub_group_names(self) -> list[str]:
        """The names of the user's JupyterHub groups."""
        return [group.name for group in getattr(self.user, "groups", [])]

    def project_groups(self, names: list[str]) -> list[str]:
        """The groups among ``names`` that get a project directory."""
        usable, skipped = project_groups(names, self.project_group_pattern)
        self.log_skipped_groups(skipped)
        return usable

    def log_skipped_groups(self, skipped: list[str]) -> None:
        """Log the groups whose names cannot be directories."""
        if skipped:
            self.log.info(
                "No project directories for %d of %s's groups, whose names cannot be directory "
                "names: %s",
                len(skipped),
                self.user.name,
                ", ".join(repr(g[:80]) for g in skipped[:10]),
            )

    @property
    def access_token(self) -> str | None:
        """The user's access token from ``auth_state``.

        Never log it.
        """
        return self._access_token

    # The plan's translation
    def apply_plan(self, plan: SessionPlan) -> None:
        """Translate the plan into this spawner's traits, once per spawn.

        Subclasses extend ``plan_traits`` and call ``super()``.
        """
        self.restore_configured_traits()
        self._casa_baseline = {
            name: copy.deepcopy(getattr(self, name)) for name in self.plan_traits
        }
        self.default_url = plan.default_url
        self.environment = {
            **self.environment,
            **plan.environment,
            **self.notices_environment(plan),
        }

    def restore_configured_traits(self) -> None:
        """Put every trait in ``plan_traits`` back to its value before the plan.

        The kept values are copies nothing else holds, so they are put back as they are.
        """
        baseline, self._casa_baseline = self._casa_baseline, None
        for name, value in (baseline or {}).items():
            setattr(self, name, value)

    def notices_environment(self, plan: SessionPlan) -> dict[str, str]:
        """The session's notice source and notice file, as environment variables.

        Nothing when ``notices_url`` is empty. Each server name has its own file. A name with
        characters other than letters, digits, ``.``, ``_`` and ``-`` has them replaced by ``-``
        and a short hash appended.
        """
        if not self.notices_url:
            return {}
        name = self.name or ""
        server = re.sub(r"[^A-Za-z0-9._-]", "-", name)
        if server != name:
            server += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        file = f"CASA-NOTICES-{server}.md" if server else "CASA-NOTICES.md"
        return {
            "CASASPAWNER_NOTICES_URL": self.notices_url,
            "CASASPAWNER_NOTICES_FILE": f"{plan.home.rstrip('/')}/{file}",
        }

    def record_session(self, plan: SessionPlan) -> None:
        """Write the running session's summary into ``user_options`` for the admin pages."""
        self.user_options = {**input_options(self.user_options), **session_output(plan)}
        orm_spawner = getattr(self, "orm_spawner", None)
        if orm_spawner is not None:
            orm_spawner.user_options = dict(self.user_options)

    def plan_progress_events(self) -> list[dict[str, Any]]:
        """The resolution and its reason, as the first lines of the progress page."""
        return plan_events(self.session_plan) if self.session_plan is not None else []

    # State
    def remember_dataset(self, dataset: str) -> None:
        """Put ``dataset`` first in the recently used datasets."""
        recent = [dataset, *(d for d in self.recent_datasets if d != dataset)]
        self.recent_datasets = recent[: max(self.recent_datasets_limit, 0)]

    def past_session(self, name: str) -> PastSession | None:
        """The past session ``name`` of this server, for a relaunch."""
        return next((p for p in self.session_history if p.name == name), None)

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.recent_datasets:
            state["casa_recent_datasets"] = list(self.recent_datasets)
        if self.last_resolution:
            state["casa_last_resolution"] = dict(self.last_resolution)
        if self.session_history:
            state["casa_history"] = [p.as_state() for p in self.session_history]
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        recent = state.get("casa_recent_datasets")
        if isinstance(recent, list):
            limit = max(self.recent_datasets_limit, 0)
            self.recent_datasets = [d for d in recent if isinstance(d, str)][:limit]
        saved = state.get("casa_history")
        if isinstance(saved, list):
            found = (PastSession.from_state(p) for p in saved)
            self.session_history = [p for p in found if p is not None][:HISTORY_LIMIT]
        last = state.get("casa_last_resolution")
        if isinstance(last, dict) and all(
            isinstance(last.get(k), str) for k in ("dataset", "release")
        ):
            reason = last.get("reason")
            self.last_resolution = {
                "dataset": last["dataset"],
                "release": last["release"],
                "exact": last.get("exact") is True,
                "reason": reason if isinstance(reason, str) else "",
            }

    def clear_state(self) -> None:
        """Forget the last session's plan.

        Recent datasets, the last resolution and past sessions stay.
        """
        super().clear_state()
        self.restore_configured_traits()
        self.session_plan = None
        self._plan_for = None
        self._access_token = None


async def render_spawn_form(spawner: CASASessionMixin) -> str:
    """``options_form`` of both spawners: the form without the releases drained now."""
    blocked: list[str] = []
    # A failing drain service must not take the form down; starting checks again.
    try:
        blocked = list(await spawner.blocked_release_messages())
    except Exception:
        spawner.log.exception("blocked_releases failed while rendering the form")
    return spawner.render_options_form(blocked=blocked)


async def _apply_user_options(spawner: CASASessionMixin, user_options: dict[str, Any]) -> None:
    await spawner.prepare_session(user_options)

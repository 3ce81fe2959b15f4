"""What both CASA spawners share: options, the spawn form, validation, identity, the plan, progress text.

``CASASessionMixin`` is mixed in front of a concrete JupyterHub spawner::

    class CASASpawner(CASASessionMixin, KubeSpawner): ...
    class LocalCASASpawner(CASASessionMixin, LocalProcessSpawner): ...

The flow is the same for both: ``user_options`` (form, query or REST) → :meth:`parse_session_options` →
identity from ``auth_state`` → dataset resolution (storage path or ALMA identifier) → blocked-release check →
``plan.make_plan`` → :meth:`apply_plan` (each subclass translates the plan into its own traits). All of it runs
in :meth:`prepare_session`, which JupyterHub ≥ 5.3 calls through ``apply_user_options`` (before
``pre_spawn_hook`` and before any process, pod or other object exists) and which subclasses call again from
``start`` for older hubs; it is idempotent for one set of options. Nothing here knows about Kubernetes.

The pure parts live beside it: :mod:`casaspawner.spawners.storage` (mapping paths to storage, the dataset
readers) and :mod:`casaspawner.spawners.identity` (ids and project groups from the login data).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import re
import string
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from jinja2 import Environment, PackageLoader, select_autoescape
from jupyterhub.spawner import Spawner
from jupyterhub.traitlets import ByteSpecification
from jupyterhub.utils import maybe_future
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Integer, List, TraitError, Unicode, Union, default
from traitlets import Callable as CallableTrait

from casaspawner.catalog.model import Catalog, Release, load_catalog
from casaspawner.datasets.ids import looks_like_identifier
from casaspawner.datasets.model import Evidence, Resolution
from casaspawner.datasets.resolve import resolve_path, resolve_target
from casaspawner.errors import CasaspawnerError, InvalidInput, NoSuchDataset, VersionUnknown
from casaspawner.plan import (
    DEFAULT_SIZES,
    INTERFACES,
    MAX_ID,
    Identity,
    PlanConfig,
    Resources,
    SessionOptions,
    SessionPlan,
    StorageLayout,
    make_plan,
)
from casaspawner.spawners.identity import identity_from_login, login_value, project_groups
from casaspawner.spawners.storage import (  # the readers' documented import path is this module's too
    DatasetReader,
    LocalDirectoryReader,
    StorageMountReader,
    VOSpaceReader,
)

__all__ = [
    "CASASessionMixin",
    "ConfigurationError",
    "DatasetReader",
    "LocalDirectoryReader",
    "SpawnException",
    "StorageMountReader",
    "VOSpaceReader",
    "hook_failure",
    "options_from_form",
    "render_spawn_form",
    "spawn_error",
]

try:  # JupyterHub ≥ 6.0
    from jupyterhub.spawner import SpawnException
except ImportError:  # JupyterHub 5.x has none; an HTTPError carrying the same fields reads the same to users

    class SpawnException(web.HTTPError):  # type: ignore[no-redef,unused-ignore]
        """Stand-in for JupyterHub 6's ``SpawnException`` on JupyterHub 5."""

        def __init__(self, message: str, *, reason: str, status_code: int = 400, **_: object) -> None:
            super().__init__(status_code, "%s", message)
            self.message = message
            # Not ``reason``: JupyterHub 5 would show it instead of the message and use it as the HTTP reason.
            self.spawn_reason = reason


#: Keys a spawn request may carry in ``user_options``; ``profile`` and ``casa_version`` are written back by
#: the spawner itself (for the admin page) and accepted when the hub reuses saved options.
OPTION_KEYS = frozenset({"dataset", "interface", "size", "release", "profile", "casa_version"})
#: Form fields turned into options (everything else but the hub's own ``_xsrf``-style fields is refused).
FORM_FIELDS = ("dataset", "interface", "size", "release")


def spawn_error(message: str, reason: str = "invalid-options", status_code: int = 400) -> web.HTTPError:
    """A ``SpawnException`` whose text is ``message`` on the form, the progress page and in the logs.

    ``status_code`` 400 means the user's choices; 500 means the hub (its configuration or a hook).
    """
    exc: web.HTTPError = SpawnException(message, reason=reason, status_code=status_code)
    exc.jupyterhub_message = message  # type: ignore[attr-defined]  # the progress page shows this text
    return exc


class ConfigurationError(CasaspawnerError):
    """An operator's setting (not anything the user chose) cannot work; the sentence names the option."""

    def __init__(self, detail: str) -> None:
        detail = detail.rstrip(".")
        first = detail.split(" ", 1)[0]
        # A sentence of its own ("The storage volume …") continues this one; an option ("X.option …") stays.
        if first.istitle() and "." not in first:
            detail = detail[0].lower() + detail[1:]
        super().__init__(f"The hub's configuration is invalid: {detail}.")


def hook_failure(hook: str, exc: BaseException) -> web.HTTPError:
    """One sentence for an operator's hook that raised (the traceback goes to the hub's log)."""
    detail = " ".join(str(exc).split())[:160]
    return spawn_error(
        f"The hub's configured {hook} failed ({type(exc).__name__}{': ' + detail if detail else ''}).",
        reason="hook",
        status_code=500,
    )


# ------------------------------------------------------------------------------------------------ the mixin

_TEMPLATES = Environment(
    loader=PackageLoader("casaspawner", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_SIZE_KEYS = {"cpu_guarantee", "cpu_limit", "mem_guarantee", "mem_limit", "description"}
_DATASET_MAX = 1024


def _cores(value: Any, where: str) -> float:
    """A CPU amount from ``session_sizes``: a number of cores (or text holding one), 0 when unset."""
    if value is None or value == "":
        return 0.0
    try:
        cores = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        cores = float("nan")
    if not cores >= 0 or cores == float("inf"):
        raise ConfigurationError(f"{where} is {value!r}, not a number of CPU cores (such as 0.5 or 4)")
    return cores


def _memory(value: Any, where: str) -> tuple[str, int]:
    """A memory amount from ``session_sizes`` as KubeSpawner's ``mem_limit`` reads it: text with K, M, G or T
    (``8G``), or a number of bytes (written back as text: ``8589934592`` → ``8G``). (text, bytes); ("", 0) unset."""
    if value is None or value == "":
        return "", 0
    if isinstance(value, int) and not isinstance(value, bool):
        units = ByteSpecification.UNIT_SUFFIXES
        suffix = next((s for s in reversed(units) if value > 0 and value % units[s] == 0), None)
        if suffix is None:
            raise ConfigurationError(
                f"{where} is {value!r}, not a positive number of bytes that is a multiple of 1024 (or text such as "
                "'8G')"
            )
        return f"{value // units[suffix]}{suffix}", value
    try:
        if not isinstance(value, str):
            raise TraitError("not text")
        count = ByteSpecification().validate(None, value.strip())
    except (TraitError, TypeError, IndexError):
        if isinstance(value, str) and value.strip()[-2:] in ("Ki", "Mi", "Gi", "Ti"):
            raise ConfigurationError(
                f"{where} is {value!r}, the Kubernetes spelling; session memory is written as JupyterHub "
                f"writes it, {value.strip()[:-1]!r} (its units are of 1024)"
            ) from None
        raise ConfigurationError(
            f"{where} is {value!r}, not an amount of memory (a number with K, M, G or T, such as '8G')"
        ) from None
    if count < 0:
        raise ConfigurationError(f"{where} is {value!r}, a negative amount of memory")
    return value.strip(), int(count)


def _check_template(where: str, template: str, fields: tuple[str, ...]) -> None:
    """A ``ConfigurationError`` naming ``where`` unless ``template`` formats with exactly ``fields``."""
    allowed = ", ".join("{" + field + "}" for field in fields)
    try:
        used = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        unknown = next((field for field in used if field not in fields), None)
        if unknown is None:
            template.format(**{field: "x" for field in fields})
    except (ValueError, KeyError, IndexError, AttributeError):
        raise ConfigurationError(
            f"{where} is {template!r}, not a template (write {{{{ and }}}} for braces); its fields are {allowed}"
        ) from None
    if unknown is not None:
        raise ConfigurationError(
            f"{where} is {template!r}, which uses {{{unknown}}}; its fields are {allowed}"
        )


# The mixin always sits in front of a Spawner, but JupyterHub refuses Spawner subclasses without start/stop/poll.
if TYPE_CHECKING:
    from jupyterhub.spawner import Spawner as _MixinBase
else:
    from traitlets.config import LoggingConfigurable as _MixinBase


class CASASessionMixin(_MixinBase):  # type: ignore[misc]  # JupyterHub ships no type hints
    """Options, form, validation and session plan shared by ``CASASpawner`` and ``LocalCASASpawner``."""

    # ---------------------------------------------------------------------------------------- catalog, plan
    catalog_path = Unicode(
        None,
        allow_none=True,
        help="""
        Path of the release catalog (``releases.yaml``) to use instead of the one shipped with casaspawner.
        The catalog decides which CASA builds exist, which dataset runs with which build, and image tags.
        """,
    ).tag(config=True)

    image_registry = Unicode(
        PlanConfig.image_registry,
        help="""
        Registry and namespace holding the CASA session images, e.g. ``ghcr.io/casaspawner``. Images are named
        with ``image_template``; the image build tool tags them with the same rule.
        """,
    ).tag(config=True)

    image_template = Unicode(
        PlanConfig.image_template,
        help="""
        Template of a session image reference. Fields: ``{registry}`` (``image_registry``), ``{tag}`` (the
        release's image tag, e.g. ``6.5.4-9-pipeline-2023.1.0.124``), ``{casa}``, ``{pipeline}`` and ``{id}``.
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
        Session sizes offered on the form, in order: name → ``{cpu_guarantee, cpu_limit, mem_guarantee,
        mem_limit, description}``. CPU is a number of cores (``0.5``, ``4``). Memory is what KubeSpawner's
        ``mem_limit`` takes: JupyterHub's units of 1024, text with ``K``, ``M``, ``G`` or ``T`` (``8G`` is 8 GiB),
        or a whole number of bytes that is a multiple of 1024 (``8589934592``); the Kubernetes spelling ``8Gi``
        (which ``scratch_size_limit`` uses) is refused with a sentence. The description is what users see next
        to the name.
        """,
    ).tag(config=True)

    default_size = Unicode(
        "medium",
        help="Size preselected on the form and used when a spawn request names none (a key of ``session_sizes``).",
    ).tag(config=True)

    allow_release_override = Bool(
        True,
        help="""
        Whether users may choose a CASA release other than the one resolved for their dataset (the form's
        advanced section). Such a session is marked as not exact everywhere it is shown.
        """,
    ).tag(config=True)

    desktop_xstartup = Unicode(
        PlanConfig.desktop_xstartup,
        help="""
        Start script of the CASA desktop inside the session image, passed to jupyter-remote-desktop-proxy as
        ``JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP`` for desktop sessions.
        """,
    ).tag(config=True)

    # ------------------------------------------------------------------------------------------- storage
    home_subpath_template = Unicode(
        StorageLayout.home_subpath,
        help="Directory of a user's home inside the storage root; ``{username}`` is replaced.",
    ).tag(config=True)

    home_mount_template = Unicode(
        StorageLayout.home_mount,
        help="Where the user's home appears in a session; ``{username}`` is replaced. It is also ``HOME``.",
    ).tag(config=True)

    project_subpath_template = Unicode(
        StorageLayout.project_subpath,
        help="Directory of a project (one per group of the user) inside the storage root; ``{group}`` is replaced.",
    ).tag(config=True)

    project_mount_template = Unicode(
        StorageLayout.project_mount,
        help="Where a project directory appears in a session; ``{group}`` is replaced.",
    ).tag(config=True)

    project_group_pattern = Unicode(
        r".*",
        help="""
        Regular expression a group name must match in full for its project directory to be mounted. Use it to
        keep authorization-only groups out of the session, e.g. ``proj-.*``. Groups whose names cannot be
        directory names (a letter or digit, then up to 63 letters, digits, ``.``, ``_`` or ``-``; e.g. not
        ``org/sub`` or ``ivo://cadc.nrc.ca/gms?alma``) are skipped and logged, never an error.
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
        help="Where the read-only CASA measures data appears in a session (exported as ``CASA_MEASURES_PATH``).",
    ).tag(config=True)

    # ------------------------------------------------------------------------------------------- datasets
    storage_hub_path = Unicode(
        None,
        allow_none=True,
        help="""
        Hub-side path of a read-only mount of the storage root (Cavern), e.g. ``/cavern``: the hub reads datasets
        named by path from ``<storage_hub_path>/home/<user>/…`` and ``…/projects/<group>/…`` to resolve their CASA
        version. ``CASASpawner``'s default is unset: datasets can then only be named by ALMA identifier, unless
        ``vospace_url`` or ``dataset_reader`` is configured. ``LocalCASASpawner``'s default is its
        ``storage_root``.
        """,
    ).tag(config=True)

    vospace_url = Unicode(
        None,
        allow_none=True,
        help="""
        Base URL of a VOSpace 2 service holding the users' storage, e.g. ``https://ws-uv.canfar.net/arc``
        (nodes at ``<url>/nodes/home/<user>/…``, files at ``<url>/files/…``). When set, the hub reads datasets
        named by path through it with the user's access token instead of a storage mount.
        """,
    ).tag(config=True)

    dataset_reader = AnyTrait(
        None,
        allow_none=True,
        help="""
        Object giving the hub read access to datasets named by path (``casaspawner.spawners.storage.DatasetReader``:
        an async context manager ``open(path, identity)`` yielding a local directory), or a callable
        ``(spawner) -> reader``. Use it for storage reached through an API such as VOSpace. Default: a reader over
        ``storage_hub_path``.
        """,
    ).tag(config=True)

    archive_client = AnyTrait(
        None,
        allow_none=True,
        help="""
        ALMA archive client used to resolve datasets given by identifier
        (``casaspawner.datasets.archive.ArchiveClient``, e.g. ``AlmaDataLinkClient()``), or a callable
        ``(spawner) -> client``. Unset: identifiers are refused with a sentence asking for a path.
        """,
    ).tag(config=True)

    recent_datasets_limit = Integer(
        8,
        help="How many recently used datasets the spawn form offers (kept in the server's state).",
    ).tag(config=True)

    # ------------------------------------------------------------------------------------------- identity
    uid_claim = Unicode(
        "oauth_user.uid",
        help="Dotted key of the numeric user id in ``auth_state`` (OAuthenticator keeps user info in ``oauth_user``).",
    ).tag(config=True)

    gid_claim = Unicode(
        "oauth_user.gid",
        help="Dotted key of the numeric primary group id in ``auth_state``; missing means the uid is used.",
    ).tag(config=True)

    groups_claim = Unicode(
        "oauth_user.groups",
        help="""
        Dotted key of the user's group names in ``auth_state`` (a list; a leading ``/`` is dropped). Missing:
        the user's JupyterHub groups are used. Each group whose name matches ``project_group_pattern`` gets its
        project directory mounted.
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
        Callable ``(spawner, auth_state) -> dict`` (may be async) returning ``uid``, ``gid``, ``groups`` and
        ``supplemental_gids`` for the user, replacing the ``*_claim`` look-ups. uid 0 is refused either way.
        """,
    ).tag(config=True)

    fallback_uid = Integer(
        None,
        allow_none=True,
        help="""
        uid to run as when ``auth_state`` has none. Unset (the default), a user without a uid cannot start a
        session. Never 0.
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
        Whether a session may run with gid 0 (the root group) as its primary or a supplemental group. Off by
        default: files owned by the root group are often writable by it, so a login giving gid 0 is refused
        with a sentence. uid 0 is refused whatever this says.
        """,
    ).tag(config=True)

    access_token_claim = Unicode(
        "access_token",
        help="""
        Dotted key of the user's access token in ``auth_state``. The token reaches the session only as a file
        (a Kubernetes Secret, or a private file for local sessions), never in the environment or the logs.
        """,
    ).tag(config=True)

    # ------------------------------------------------------------------------------------------- operations
    blocked_releases = Union(
        [List(Unicode()), CallableTrait()],
        default_value=[],
        help="""
        Releases that may not be started right now (e.g. while their image is being replaced): a list of
        release ids, or a callable ``(spawner) -> {release id: message}`` (may be async), which the operators'
        drain service provides. Spawning a blocked release is refused with the message before any object exists.
        """,
    ).tag(config=True)

    notices_url = Unicode(
        "",
        help="""
        Where sessions ask the casa-sessions service for their notices (their release is drained, their idle
        session is about to be stopped), e.g. ``http://hub:10101/services/casa-sessions/api/notices``. Sessions
        get it as ``CASASPAWNER_NOTICES_URL``, with ``CASASPAWNER_NOTICES_FILE``: the file in the home
        directory that shows the notices (``CASA-NOTICES.md``; ``CASA-NOTICES-<server>.md`` for a named
        server, with a short hash appended when the name has characters other than letters, digits, ``.``,
        ``_`` and ``-``). Empty (the default): no notices. ``casaspawner.services.hubconfig`` sets it.
        """,
    ).tag(config=True)

    # ------------------------------------------------------------------------------------------- state
    session_plan: SessionPlan | None = None
    recent_datasets: list[str]
    #: what the last dataset resolved to (dataset, release id, exact, reason): the form's preselection/preview
    last_resolution: dict[str, Any] | None
    user_options: dict[str, Any]
    environment: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recent_datasets = []
        self.last_resolution = None
        self.session_plan = None
        self._plan_for: dict[str, Any] | None = None
        self._access_token: str | None = None
        self._casa_baseline: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------------ catalog + config
    def casa_catalog(self) -> Catalog:
        """The release catalog (``catalog_path`` or the bundled one)."""
        cached: tuple[str | None, Catalog] | None = getattr(self, "_catalog_cache", None)
        if cached is None or cached[0] != self.catalog_path:
            cached = (self.catalog_path, load_catalog(self.catalog_path))
            self._catalog_cache = cached
        return cached[1]

    def storage_layout(self) -> StorageLayout:
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
        """``session_sizes`` checked and typed; a bad entry is a ``ConfigurationError`` naming it."""
        sizes: dict[str, Resources] = {}
        if not self.session_sizes:
            raise ConfigurationError(
                f"{self.option('session_sizes')} is empty; give at least one session size"
            )
        for name, raw in self.session_sizes.items():
            where = f"{self.option('session_sizes')}[{name!r}]"
            if not isinstance(raw, Mapping) or set(raw) - _SIZE_KEYS:
                raise ConfigurationError(f"{where} must be a mapping of {', '.join(sorted(_SIZE_KEYS))}")
            spec = cast(Mapping[str, Any], raw)
            cpu = {key: _cores(spec.get(key), f"{where}[{key!r}]") for key in ("cpu_guarantee", "cpu_limit")}
            mem = {key: _memory(spec.get(key), f"{where}[{key!r}]") for key in ("mem_guarantee", "mem_limit")}
            if cpu["cpu_limit"] and cpu["cpu_guarantee"] > cpu["cpu_limit"]:
                raise ConfigurationError(f"{where} guarantees more CPU than its cpu_limit")
            if mem["mem_limit"][1] and mem["mem_guarantee"][1] > mem["mem_limit"][1]:
                raise ConfigurationError(f"{where} guarantees more memory than its mem_limit")
            sizes[str(name)] = Resources(
                cpu["cpu_guarantee"],
                cpu["cpu_limit"],
                mem["mem_guarantee"][0],
                mem["mem_limit"][0],
                str(spec.get("description") or ""),
            )
        return sizes

    def check_config(self) -> None:
        """Check the operator's settings before anything else, so that a bad one is named as the hub's fault.

        Raises ``ConfigurationError`` (one sentence naming the option); subclasses add their own checks.
        """
        sizes = self.size_resources()
        if self.default_size not in sizes:
            raise ConfigurationError(
                f"{self.option('default_size')} is {self.default_size!r}, which is not one of "
                f"{self.option('session_sizes')} ({', '.join(sizes)})"
            )
        for name, fields in self.template_fields.items():
            _check_template(self.option(name), getattr(self, name), fields)
        for name in (
            "home_mount_template",
            "project_mount_template",
            "scratch_mount_path",
            "measures_mount_path",
        ):
            if not getattr(self, name).startswith("/"):
                raise ConfigurationError(
                    f"{self.option(name)} is {getattr(self, name)!r}; a place in the session is an absolute path"
                )
        try:
            re.compile(self.project_group_pattern)
        except re.error as exc:
            raise ConfigurationError(
                f"{self.option('project_group_pattern')} is {self.project_group_pattern!r}, not a regular "
                f"expression ({exc.msg})"
            ) from None
        for name, lowest in (("fallback_uid", 1), ("fallback_gid", 0)):
            value = getattr(self, name)
            if value is not None and not lowest <= value <= MAX_ID:
                raise ConfigurationError(
                    f"{self.option(name)} is {value}, not an id from {lowest} to {MAX_ID}"
                )
        try:
            self.casa_catalog()
            self.plan_config()
        except ConfigurationError:
            raise
        except CasaspawnerError as exc:  # catalog_path, label_prefix: the operator's, not the user's
            raise ConfigurationError(str(exc)) from None

    #: The operator's templates → the fields each may use (``check_config`` formats every one).
    template_fields: dict[str, tuple[str, ...]] = {
        "image_template": ("registry", "tag", "casa", "pipeline", "id"),
        "home_subpath_template": ("username",),
        "home_mount_template": ("username",),
        "project_subpath_template": ("group",),
        "project_mount_template": ("group",),
    }

    def option(self, name: str) -> str:
        """How error sentences name one of this spawner's options: ``LocalCASASpawner.session_sizes``."""
        return f"{type(self).__name__}.{name}"

    def plan_config(self) -> PlanConfig:
        """The operator's choices as the plan sees them."""
        return PlanConfig(
            image_registry=self.image_registry,
            image_template=self.image_template,
            label_prefix=self.label_prefix,
            sizes=self.size_resources(),
            storage=self.storage_layout(),
            desktop_xstartup=self.desktop_xstartup,
            allow_override=self.allow_release_override,
        )

    # ------------------------------------------------------------------------------------------- the form
    @default("options_form")
    def _casa_options_form_default(self) -> Callable[[Spawner], Any]:
        return render_spawn_form

    def render_options_form(self, error: str = "", blocked: Collection[str] = ()) -> str:
        """The spawn form's HTML fragment (JupyterHub wraps it in its own ``<form>`` and Start button).

        ``blocked``: release ids left out of the override list (:func:`render_spawn_form` asks
        ``blocked_releases`` for them). A configuration problem is shown as the form's error.
        """
        configured = True
        try:  # the form still renders, saying what is wrong
            self.check_config()
        except ConfigurationError as exc:
            error = error or str(exc)
            configured = False
        try:
            available = self.casa_catalog().available()
        except CasaspawnerError:
            available = []
        previous = self.user_options or {}
        resolved: Release | None = None
        last = self.last_resolution
        if last:
            resolved = next((r for r in available if r.id == last.get("release")), None)
        try:
            sizes = self.size_resources()
        except ConfigurationError:
            sizes = {}
        size = previous.get("size") if previous.get("size") in sizes else self.default_size
        interface = previous.get("interface") if previous.get("interface") in INTERFACES else "lab"
        releases = [r for r in available if r.id not in blocked] if self.allow_release_override else []
        chosen = previous.get("release") if previous.get("release") in {r.id for r in releases} else None
        return _TEMPLATES.get_template("spawn_form.html").render(
            dataset=previous.get("dataset", "") if isinstance(previous.get("dataset"), str) else "",
            recent=self.recent_datasets,
            interfaces=INTERFACES,
            interface=interface,
            sizes=sizes,
            size=size,
            releases=releases,
            chosen=chosen,
            resolved=resolved,
            resolved_dataset=(last or {}).get("dataset", ""),
            can_read_paths=bool(self.storage_hub_path or self.vospace_url or self.dataset_reader),
            home=self.form_home_hint() if configured else "~",
            error=error,
        )

    def form_home_hint(self) -> str:
        """How the form's examples name the user's home (the session's home path)."""
        return self.home_mount_template.format(username=self.user.name)

    @default("options_from_form")
    def _casa_options_from_form_default(self) -> Callable[[dict[str, list[str]]], dict[str, Any]]:
        return options_from_form

    # ------------------------------------------------------------------------------------- operator hooks
    async def call_hook(self, name: str, hook: Callable[..., Any], *args: Any) -> Any:
        """``hook(*args)`` (may be async), the operator's ``name``; if it raises, one sentence naming it, marked
        as the hub's fault (the traceback goes to the hub's log). A ``SpawnException`` it raises stays as is."""
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

    # --------------------------------------------------------------------------------------- validation
    @default("apply_user_options")
    def _casa_apply_user_options_default(self) -> Callable[[Spawner, dict[str, Any]], Any]:
        return _apply_user_options

    def parse_session_options(self, user_options: Mapping[str, Any]) -> SessionOptions:
        """Check the shape of ``user_options`` (pure); raises ``InvalidInput`` with one sentence."""
        if not isinstance(user_options, Mapping):
            raise InvalidInput("The spawn options must be a mapping of option names to values.")
        unknown = sorted(set(user_options) - OPTION_KEYS)
        if unknown:
            raise InvalidInput(
                f"{unknown[0]!r} is not a session option; use dataset, interface, size and release."
            )
        for key in ("dataset", "interface", "size", "release"):
            value = user_options.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidInput(f"The session option {key!r} must be text.")
        dataset = (user_options.get("dataset") or "").strip()
        if not dataset:
            raise InvalidInput("Give a dataset: an ALMA identifier or the path of a dataset in your storage.")
        if len(dataset) > _DATASET_MAX or any(ord(c) < 32 for c in dataset):
            raise InvalidInput("The dataset must be one line of at most 1024 characters.")
        interface = (user_options.get("interface") or "lab").strip()
        if interface not in INTERFACES:
            raise InvalidInput(f"{interface[:40]!r} is not an interface; choose lab or desktop.")
        size = (user_options.get("size") or self.default_size).strip()
        sizes = self.size_resources()
        if size not in sizes:
            raise InvalidInput(f"{size[:40]!r} is not a session size; choose one of {', '.join(sizes)}.")
        release = (user_options.get("release") or "").strip() or None
        if release is not None:
            catalog = self.casa_catalog()
            if release not in catalog:
                raise InvalidInput(f"{release[:60]!r} is not a CASA release this hub knows.")
            if not self.allow_release_override:
                raise InvalidInput(
                    "This hub does not allow choosing a CASA release other than the resolved one."
                )
        return SessionOptions(dataset=dataset, interface=interface, size=size, release=release)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------ identity
    async def session_identity(self) -> Identity:
        """uid, gid, groups and supplemental gids of the user, from ``auth_state`` (or the fallbacks)."""
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

    def hub_group_names(self) -> list[str]:
        """The names of the user's JupyterHub groups."""
        return [group.name for group in getattr(self.user, "groups", [])]

    def project_groups(self, names: list[str]) -> list[str]:
        """The groups among ``names`` that get a project directory (``project_group_pattern``); the others
        whose names cannot be directories are logged."""
        usable, skipped = project_groups(names, self.project_group_pattern)
        self.log_skipped_groups(skipped)
        return usable

    def log_skipped_groups(self, skipped: list[str]) -> None:
        if skipped:
            self.log.info(
                "No project directories for %d of %s's groups, whose names cannot be directory names: %s",
                len(skipped),
                self.user.name,
                ", ".join(repr(g[:80]) for g in skipped[:10]),
            )

    @property
    def access_token(self) -> str | None:
        """The user's access token from ``auth_state`` (set by :meth:`session_identity`); never log it."""
        return self._access_token

    # -------------------------------------------------------------------------------------------- datasets
    def get_dataset_reader(self) -> DatasetReader | None:
        reader = self.dataset_reader
        if callable(reader) and not hasattr(reader, "open"):
            reader = reader(self)
        if reader is None and self.vospace_url:
            reader = VOSpaceReader(self.vospace_url, self.storage_layout(), self.access_token)
        if reader is None and self.storage_hub_path is not None:
            reader = StorageMountReader(self.storage_hub_path, self.storage_layout())
        return reader  # type: ignore[no-any-return]

    def get_archive_client(self) -> Any:
        client = self.archive_client
        if callable(client) and not hasattr(client, "fetch_manifest"):
            client = client(self)
        return client

    async def resolve_dataset(
        self, text: str, identity: Identity, *, release: str | None = None
    ) -> Resolution:
        """Resolve an ALMA identifier (through the archive) or a path in the user's storage.

        ``release``: the catalog id the user chose instead. A dataset that was found but tells no usable CASA
        version then runs that release, marked as the user's choice (not exact); an identifier or path that does
        not lead to one dataset is still refused.
        """
        try:
            return await self._resolve(text, identity)
        except VersionUnknown as exc:
            if release is None:
                raise
            return self.chosen_release_resolution(text, release, exc.finding)

    async def _resolve(self, text: str, identity: Identity) -> Resolution:
        catalog = self.casa_catalog()
        reader = self.get_dataset_reader()
        if looks_like_identifier(text):
            # a directory of the user's named like an identifier (a project code, as ALMA's downloads unpack)
            # is that dataset, read without asking the archive; else the archive is asked
            if reader is not None and "/" not in text:
                with contextlib.suppress(NoSuchDataset):
                    async with reader.open(text, identity) as path:
                        return await self.read_dataset(path, text, identity)
            with tempfile.TemporaryDirectory() as empty:  # never read a hub path named like an identifier
                return await asyncio.to_thread(
                    resolve_target, text, catalog, archive=self.get_archive_client(), base=Path(empty)
                )
        if reader is None:
            raise InvalidInput(
                f"{text[:80]!r} is not an ALMA identifier, and this hub cannot read datasets from your storage; "
                "give the dataset's ALMA identifier."
            )
        async with reader.open(text, identity) as path:
            return await self.read_dataset(path, text, identity)

    async def read_dataset(self, path: Path, label: str, identity: Identity) -> Resolution:
        """Resolve the dataset directory ``path`` a reader gave for what the user typed (``label``, how errors
        and the resolution name it); here, in the hub process. ``LocalCASASpawner`` reads as the user when the
        hub runs as root."""
        return await asyncio.to_thread(resolve_path, path, self.casa_catalog(), label=label)

    def chosen_release_resolution(self, dataset: str, release_id: str, finding: str) -> Resolution:
        """The user's own release for a dataset whose version could not be told (``finding`` says why)."""
        chosen = self.casa_catalog().get(release_id)
        if not chosen.available:
            raise InvalidInput(f"{chosen.label} has no public build to run; choose another release.")
        return Resolution(
            dataset,
            Evidence("none", "", None, None),
            chosen,
            False,
            f"{finding}; you chose {chosen.label}.",
        )

    async def blocked_release_messages(self) -> dict[str, str]:
        """Release id → the operators' message (may be empty) for every release that may not start now."""
        blocked = self.blocked_releases
        if callable(blocked):
            found = await maybe_future(blocked(self))
            return {str(k): str(v or "") for k, v in dict(found or {}).items()}
        return {rid: "" for rid in blocked}

    async def release_block_message(self, release: Release) -> str | None:
        """The operators' message if ``release`` may not be started now, else None."""
        messages = await self.blocked_release_messages()
        if release.id not in messages:
            return None
        message = str(messages[release.id] or "").strip()
        return (
            message
            or f"{release.label} cannot be started right now; try again later or choose another release."
        )

    # ------------------------------------------------------------------------------------------- the plan
    async def prepare_session(self, user_options: Mapping[str, Any] | None = None) -> SessionPlan:
        """Validate options, find identity, resolve the dataset and make the plan; apply it to this spawner.

        Idempotent for the same options (the plan is kept in ``session_plan``). Every problem a user can cause
        becomes a ``SpawnException`` with one sentence, raised before anything is created.
        """
        options = dict(self.user_options if user_options is None else user_options)
        if self.session_plan is not None and self._plan_for == options:
            return self.session_plan
        try:
            self.check_config()
            session_options = self.parse_session_options(options)
            identity = await self.session_identity()
            resolution = await self.resolve_dataset(
                session_options.dataset, identity, release=session_options.release
            )
            plan = make_plan(identity, session_options, self.casa_catalog(), resolution, self.plan_config())
            blocked = await self.release_block_message(plan.release)
            if blocked:
                raise spawn_error(blocked, reason="release-blocked")
            self.adopt_plan(plan, options)
        except Exception as exc:
            raise self.refusal(exc) from None
        self.log.info("CASA session for %s: %s (%s)", self.user.name, plan.summary, plan.reason)
        return plan

    def adopt_plan(self, plan: SessionPlan, options: Mapping[str, Any]) -> None:
        """Make ``plan`` this spawner's session: its traits, ``user_options`` (the request's ``options`` with
        the plan's summary; the admin page and the next spawn see them too), the recent datasets and the
        resolution the form preselects."""
        self.apply_plan(plan)
        self.session_plan = plan
        self.user_options = {**options, **self.options_summary(plan)}
        self._plan_for = dict(self.user_options)
        orm_spawner = getattr(self, "orm_spawner", None)
        if orm_spawner is not None:
            orm_spawner.user_options = dict(self.user_options)
        self.remember_dataset(plan.options.dataset)
        if plan.resolution.evidence.kind != "none":
            resolution = plan.resolution
            self.last_resolution = {
                "dataset": resolution.dataset,
                "release": resolution.release.id,
                "exact": resolution.exact,
                "reason": resolution.reason,
            }

    def refusal(self, exc: Exception) -> web.HTTPError:
        """What preparing a session that raised ``exc`` ends with: one sentence (400 for the user's choices,
        500 for the hub's configuration or a fault, whose traceback is logged); nothing of the plan stays."""
        self.restore_configured_traits()
        self.session_plan = None
        if isinstance(exc, web.HTTPError):
            return exc
        if isinstance(exc, ConfigurationError):
            return spawn_error(str(exc), reason="config", status_code=500)
        if isinstance(exc, CasaspawnerError):
            return spawn_error(str(exc), reason=type(exc).__name__)
        self.log.error("Preparing the CASA session of %s failed", self.user.name, exc_info=exc)
        said = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # no hub paths
        detail = " ".join(said.split())[:160]
        return spawn_error(
            f"The session could not be prepared because of a fault in the hub ({type(exc).__name__}: {detail}).",
            reason="error",
            status_code=500,
        )

    def options_summary(self, plan: SessionPlan) -> dict[str, str]:
        """Small, readable ``user_options`` entries; ``profile`` is the admin page's Profile column."""
        summary = {
            "profile": plan.summary,
            "dataset": plan.options.dataset,
            "casa_version": plan.release.casa,
            "interface": plan.interface,
            "size": plan.options.size,
        }
        return summary

    #: Traits :meth:`apply_plan` sets. Spawner objects live across sessions, so the values these had before a
    #: plan was applied (configuration, plus whatever this spawn's hooks set) are remembered and put back when
    #: the plan is replaced or the session ends (no leftovers from the last session; the next spawn's
    #: ``auth_state_hook`` and group overrides apply to the configured values again).
    plan_traits: tuple[str, ...] = ("default_url", "environment")

    def restore_configured_traits(self) -> None:
        """Put every trait in ``plan_traits`` back to its value before the current plan was applied."""
        baseline = self._casa_baseline
        self._casa_baseline = None
        for name, value in (baseline or {}).items():
            setattr(self, name, copy.deepcopy(value))

    def apply_plan(self, plan: SessionPlan) -> None:
        """Translate the plan into this spawner's traits; subclasses extend ``plan_traits`` and call ``super()``."""
        self.restore_configured_traits()
        self._casa_baseline = {name: copy.deepcopy(getattr(self, name)) for name in self.plan_traits}
        self.default_url = plan.default_url
        self.merge_session_environment(plan)

    def merge_session_environment(self, plan: SessionPlan) -> None:
        """The session's variables (the plan's and the notices') into ``environment``, over what is there."""
        self.environment = {**self.environment, **plan.environment, **self.notices_environment(plan)}

    def notices_environment(self, plan: SessionPlan) -> dict[str, str]:
        """The session's notice source and notice file (nothing when ``notices_url`` is empty).

        Each server name has its own file: a name with characters other than letters, digits, ``.``, ``_``
        and ``-`` has them replaced by ``-`` and a short hash of the name appended (``a b`` is not ``a-b``).
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

    # -------------------------------------------------------------------------------------------- progress
    def plan_progress_events(self) -> list[dict[str, Any]]:
        """The resolution result and its reason, as the first lines of the spawn-progress page."""
        plan = self.session_plan
        if plan is None:
            return []
        exactness = "the exact build" if plan.exact else "not the exact build"
        events = [
            {
                "progress": 2,
                "message": f"Dataset {plan.resolution.dataset}: {plan.release.label}, {exactness}.",
            },
            {"progress": 4, "message": plan.reason},
        ]
        if plan.resolution.evidence.kind == "none":
            events.append(
                {
                    "progress": 5,
                    "message": f"Warning: you chose {plan.release.label}; nothing in the dataset tells which CASA "
                    "version processed it.",
                }
            )
        elif plan.options.release is not None and plan.options.release != plan.resolution.release.id:
            events.append(
                {
                    "progress": 5,
                    "message": f"Warning: you chose {plan.release.label}; the dataset was processed with "
                    f"{plan.resolution.release.label}.",
                }
            )
        events.append(
            {"progress": 6, "message": f"Starting {INTERFACES[plan.interface]} with image {plan.image}."}
        )
        return events

    # ----------------------------------------------------------------------------------------------- state
    def remember_dataset(self, dataset: str) -> None:
        recent = [dataset, *(d for d in self.recent_datasets if d != dataset)]
        self.recent_datasets = recent[: max(self.recent_datasets_limit, 0)]

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.recent_datasets:
            state["casa_recent_datasets"] = list(self.recent_datasets)
        if self.last_resolution:
            state["casa_last_resolution"] = dict(self.last_resolution)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        recent = state.get("casa_recent_datasets")
        if isinstance(recent, list):
            self.recent_datasets = [d for d in recent if isinstance(d, str)][
                : max(self.recent_datasets_limit, 0)
            ]
        last = state.get("casa_last_resolution")
        if isinstance(last, dict) and all(isinstance(last.get(k), str) for k in ("dataset", "release")):
            reason = last.get("reason")
            self.last_resolution = {
                "dataset": last["dataset"],
                "release": last["release"],
                "exact": last.get("exact") is True,
                "reason": reason if isinstance(reason, str) else "",
            }

    def clear_state(self) -> None:
        """Forget the last session's plan; recently used datasets and the last resolution outlive sessions."""
        super().clear_state()
        self.restore_configured_traits()
        self.session_plan = None
        self._plan_for = None
        self._access_token = None


def options_from_form(formdata: Mapping[str, list[str]]) -> dict[str, Any]:
    """Form fields (lists of strings) → ``user_options``; unknown fields are kept so validation names them."""
    options: dict[str, Any] = {}
    for key, values in formdata.items():
        if key.startswith("_"):  # the hub's own fields (``_xsrf``)
            continue
        value = values[0] if isinstance(values, list) and len(values) == 1 else values
        if isinstance(value, str):
            value = value.strip()
            if key in FORM_FIELDS and value == "":
                continue
        options[key] = value
    return options


async def render_spawn_form(spawner: CASASessionMixin) -> str:
    """``options_form`` of both spawners: the form, without the releases ``blocked_releases`` blocks now."""
    blocked: list[str] = []
    try:
        blocked = list(await spawner.blocked_release_messages())
    except Exception:  # a failing drain service must not take the form down; starting checks again
        spawner.log.exception("blocked_releases failed while rendering the form")
    return spawner.render_options_form(blocked=blocked)


async def _apply_user_options(spawner: CASASessionMixin, user_options: dict[str, Any]) -> None:
    await spawner.prepare_session(user_options)

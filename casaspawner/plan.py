"""The session plan: a pure, backend-neutral description of one CASA session.

``make_plan`` decides everything a spawner needs and does no I/O: the release, image, interface,
environment, mounts, identity, resources, labels, annotations and a one-line summary. ``kube/``
turns a plan into a pod, ``local/`` into a process. Secrets such as tokens never enter a plan, so
a plan can be logged, printed and shown to the user.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from casaspawner.catalog.model import Catalog, Release
from casaspawner.datasets.model import Resolution
from casaspawner.errors import InvalidInput, shown

Interface = Literal["lab", "desktop"]
INTERFACES: dict[str, str] = {"lab": "JupyterLab", "desktop": "CASA desktop"}
DEFAULT_URLS: dict[str, str] = {"lab": "/lab", "desktop": "/desktop/"}
MountKind = Literal["storage", "scratch", "measures"]

_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@\-]{0,63}")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A directory of a measures volume that keeps one per version: a plain name.
MEASURES_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._\-]{0,61}[A-Za-z0-9])?)?")
_LABEL_PREFIX = re.compile(r"[a-z0-9](?:[a-z0-9.\-]{0,251}[a-z0-9])?")
#: The largest uid or gid a session can have.
#:
#: 4294967295 is ``(uid_t) -1``, which the kernel reads as "no id".
MAX_ID = 2**32 - 2


#: What a hub that allows no release override says to a user who chose one.
OVERRIDE_REFUSED = "This hub does not allow choosing a CASA release other than the resolved one."


def root_refusal(username: str, uid: int) -> InvalidInput:
    """The one sentence refusing a session that would run as root."""
    return InvalidInput(f"User {username} would run as uid {uid}; sessions never run as root.")


def usable_group_name(name: str) -> bool:
    """Whether a group name can be a project directory, and so be in an ``Identity``."""
    return bool(_GROUP.fullmatch(name))


@dataclass(frozen=True)
class Identity:
    """Who the session runs as: never root."""

    username: str
    uid: int
    gid: int
    groups: tuple[str, ...] = ()
    supplemental_gids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not _USERNAME.fullmatch(self.username):
            raise InvalidInput(f"{self.username!r} is not a usable user name.")
        if self.uid == 0:
            raise root_refusal(self.username, self.uid)
        for what, value in (
            ("uid", self.uid),
            ("gid", self.gid),
            *(("gid", g) for g in self.supplemental_gids),
        ):
            if not 0 <= value <= MAX_ID:
                raise InvalidInput(
                    f"User {self.username} would run with {what} {value}, "
                    f"which is not an id (0 to {MAX_ID})."
                )
        for group in self.groups:
            if not _GROUP.fullmatch(group):
                raise InvalidInput(f"{group!r} is not a usable group name.")


@dataclass(frozen=True)
class SessionOptions:
    """What the user chose on the form or the command line, checked for shape."""

    dataset: str
    interface: Interface = "lab"
    size: str = "medium"
    #: A catalog id the user chose instead of the resolved release.
    release: str | None = None
    #: For a relaunch: the sha256 of the image or environment the earlier session ran.
    pin: str | None = None

    def __post_init__(self) -> None:
        if self.interface not in INTERFACES:
            raise InvalidInput(f"{self.interface!r} is not an interface; choose lab or desktop.")
        if self.pin is not None and not _SHA256.fullmatch(self.pin):
            raise InvalidInput("A relaunch names its image or environment by a sha256 digest.")


@dataclass(frozen=True)
class Resources:
    """CPU in cores and memory as Kubernetes/KubeSpawner quantities (``8G``)."""

    cpu_guarantee: float
    cpu_limit: float
    mem_guarantee: str
    mem_limit: str
    description: str = ""


DEFAULT_SIZES: dict[str, Resources] = {
    "small": Resources(0.5, 2, "2G", "4G", "2 CPU, 4 GB"),
    "medium": Resources(1, 4, "8G", "16G", "4 CPU, 16 GB"),
    "large": Resources(4, 8, "32G", "64G", "8 CPU, 64 GB"),
}


@dataclass(frozen=True)
class StorageLayout:
    """Where Cavern, or its local stand-in, and the other volumes appear in a session.

    Templates take ``{username}`` and ``{group}``.
    """

    home_subpath: str = "home/{username}"
    home_mount: str = "/arc/home/{username}"
    project_subpath: str = "projects/{group}"
    project_mount: str = "/arc/projects/{group}"
    scratch_mount: str = "/scratch"
    scratch_limit: str = "20Gi"
    measures_mount: str = "/opt/casa/measures"


@dataclass(frozen=True)
class PlanConfig:
    """Operator choices the plan depends on; the spawners fill it from their traits."""

    image_registry: str = "ghcr.io/casaspawner"
    image_template: str = "{registry}/casa:{tag}"
    label_prefix: str = "casaspawner.io"
    sizes: Mapping[str, Resources] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    storage: StorageLayout = field(default_factory=StorageLayout)
    desktop_xstartup: str = "/opt/casaspawner/desktop/xstartup"

    def __post_init__(self) -> None:
        if not _LABEL_PREFIX.fullmatch(self.label_prefix):
            raise InvalidInput(
                f"{self.label_prefix!r} is not a Kubernetes label prefix (a DNS subdomain)."
            )


@dataclass(frozen=True)
class Mount:
    """A volume in the session.

    ``kind`` is ``storage`` (a Cavern sub-path), ``scratch`` or ``measures`` (read-only).
    ``name`` is unique in a plan. ``group`` is the group of a project directory.
    """

    name: str
    kind: MountKind
    path: str
    sub_path: str | None = None
    read_only: bool = False
    group: str | None = None


@dataclass(frozen=True)
class Substitution:
    """A backend that cannot run the chosen release runs this one instead, and says why."""

    release: Release
    reason: str


@dataclass(frozen=True)
class SessionPlan:
    """Everything a spawner needs to start one session, without secrets."""

    identity: Identity
    options: SessionOptions
    resolution: Resolution
    release: Release
    exact: bool
    approximate: bool
    reason: str
    image: str
    interface: Interface
    default_url: str
    home: str
    environment: Mapping[str, str]
    mounts: tuple[Mount, ...]
    resources: Resources
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    summary: str

    @property
    def username(self) -> str:
        return self.identity.username

    @property
    def kernel_name(self) -> str:
        """The Jupyter kernel's display name, which says whether it is approximate."""
        name = self.release.kernel_name
        return f"{name} (approximate)" if self.approximate else name

    @property
    def measures_version(self) -> str | None:
        """The measures volume's version directory the session reads; None for all of it."""
        return next((m.sub_path for m in self.mounts if m.kind == "measures"), None)


def with_measures(plan: SessionPlan, version: str) -> SessionPlan:
    """``plan`` reading the measures volume's directory ``version`` instead of all of it.

    Its pods say which version in the annotation ``<prefix>/measures``, so the operators see
    which sessions still read a version.
    """
    if not MEASURES_VERSION.fullmatch(version):
        raise InvalidInput(f"{shown(version)!r} is not a measures version's directory name.")
    mounts = tuple(
        replace(m, sub_path=version) if m.kind == "measures" else m for m in plan.mounts
    )
    prefix = next(iter(plan.annotations)).split("/", 1)[0]
    annotations = {**plan.annotations, f"{prefix}/measures": version}
    return replace(plan, mounts=mounts, annotations=annotations)


def image_for(release: Release, config: PlanConfig) -> str:
    """The image reference for a release.

    The image build tool tags images with this same function.
    """
    return config.image_template.format(
        registry=config.image_registry.rstrip("/"),
        tag=release.tag,
        casa=release.casa,
        pipeline=release.pipeline or "",
        id=release.id,
    )


def pinned_image(reference: str, digest: str) -> str:
    """``reference`` by its digest: ``registry/name:tag`` becomes ``registry/name@sha256:…``.

    The tag may have moved on to a rebuilt image since; the digest names the one that ran.
    """
    name = reference.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head + '/' if head else ''}{last.split(':', 1)[0]}@sha256:{digest}"


def label_value(text: str) -> str | None:
    """``text`` if it is a valid Kubernetes label value, else None.

    A value that is not one goes in an annotation only.
    """
    return text if len(text) <= 63 and _LABEL_VALUE.fullmatch(text) else None


def chosen_release(catalog: Catalog, release_id: str) -> Release:
    """The catalog release a user chose, if it can run at all."""
    if release_id not in catalog:
        raise InvalidInput(
            f"{release_id[:60]!r} is not a release in the catalog; choose one from the list."
        )
    chosen = catalog.get(release_id)
    if not chosen.available:
        raise InvalidInput(f"{chosen.label} has no public build to run; choose another release.")
    return chosen


def release_for(
    options: SessionOptions, resolution: Resolution, catalog: Catalog
) -> tuple[Release, bool, str]:
    """The release a session runs, before any backend substitution.

    Returns (release, exact, reason): the resolved release, or the user's own choice, which is
    then never exact. Whether a hub allows a choice is decided when options are parsed.
    """
    release, exact, reason = resolution.release, resolution.exact, resolution.reason
    if options.release is None or options.release == release.id:
        return release, exact, reason
    chosen = chosen_release(catalog, options.release)
    reason = (
        f"You chose {chosen.label}; the dataset calls for {release.label} ({reason.rstrip('.')})."
    )
    return chosen, False, reason


def make_plan(
    identity: Identity,
    options: SessionOptions,
    catalog: Catalog,
    resolution: Resolution,
    config: PlanConfig | None = None,
    substitution: Substitution | None = None,
) -> SessionPlan:
    """Decide one session from its inputs, without any I/O.

    The same inputs give the same plan. Raises ``InvalidInput`` with one sentence.
    """
    config = config or PlanConfig()
    release, exact, reason = release_for(options, resolution, catalog)
    approximate = substitution is not None
    if substitution is not None:
        reason = f"{substitution.reason} (the dataset calls for {release.label})."
        release, exact = substitution.release, False
    if options.size not in config.sizes:
        raise InvalidInput(
            f"{options.size!r} is not a session size; choose one of {', '.join(config.sizes)}."
        )
    home = config.storage.home_mount.format(username=identity.username)
    exactness = "exact" if exact else ("approximate" if approximate else "not exact")
    summary = (
        f"{release.label} · {INTERFACES[options.interface]} · {resolution.dataset} · {exactness}"
    )
    environment = _environment(release, resolution, config, options.interface, home)
    environment["CASASPAWNER_EXACT"] = "true" if exact else "false"
    environment["CASASPAWNER_APPROXIMATE"] = "true" if approximate else "false"
    environment["CASASPAWNER_REASON"] = reason
    if approximate:
        environment["CASASPAWNER_KERNEL_NAME"] += " (approximate)"
    prefix = config.label_prefix
    annotations = {
        f"{prefix}/dataset": resolution.dataset,
        f"{prefix}/processed-with": _processed_with(resolution),
        f"{prefix}/evidence": f"{resolution.evidence.kind}: {resolution.evidence.path}".rstrip(
            ": "
        ),
        f"{prefix}/reason": reason,
        f"{prefix}/summary": summary,
    }
    return SessionPlan(
        identity=identity,
        options=options,
        resolution=resolution,
        release=release,
        exact=exact,
        approximate=approximate,
        reason=reason,
        image=(
            pinned_image(image_for(release, config), options.pin)
            if options.pin
            else image_for(release, config)
        ),
        interface=options.interface,
        default_url=DEFAULT_URLS[options.interface],
        home=home,
        environment=environment,
        mounts=_mounts(identity, config.storage),
        resources=config.sizes[options.size],
        labels=_labels(release, resolution, options.interface, prefix),
        annotations=annotations,
        summary=summary,
    )


def _mounts(identity: Identity, layout: StorageLayout) -> tuple[Mount, ...]:
    """Home, one directory per project group, scratch and the read-only measures."""
    home = layout.home_mount.format(username=identity.username)
    projects = (
        Mount(
            name,
            "storage",
            layout.project_mount.format(group=group),
            layout.project_subpath.format(group=group),
            group=group,
        )
        for name, group in _project_mount_names(identity.groups)
    )
    return (
        Mount("home", "storage", home, layout.home_subpath.format(username=identity.username)),
        *projects,
        Mount("scratch", "scratch", layout.scratch_mount),
        Mount("measures", "measures", layout.measures_mount, read_only=True),
    )


def _environment(
    release: Release,
    resolution: Resolution,
    config: PlanConfig,
    interface: Interface,
    home: str,
) -> dict[str, str]:
    """The variables every session gets: which CASA, which dataset, where things are."""
    environment = {
        "HOME": home,
        "CASASPAWNER_RELEASE": release.id,
        "CASASPAWNER_CASA": release.casa,
        "CASASPAWNER_PIPELINE": release.pipeline or "",
        "CASASPAWNER_DATASET": resolution.dataset,
        "CASASPAWNER_KERNEL_NAME": release.kernel_name,
        "CASA_MEASURES_PATH": config.storage.measures_mount,
        "SCRATCH": config.storage.scratch_mount,
    }
    if interface == "desktop":
        environment["JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP"] = config.desktop_xstartup
    return environment


def _labels(
    release: Release, resolution: Resolution, interface: Interface, prefix: str
) -> dict[str, str]:
    """Labels to select sessions by; values that are not valid labels stay in annotations."""
    labels = {f"{prefix}/release": release.id, f"{prefix}/interface": interface}
    for key, value in (
        ("casa", release.casa),
        ("pipeline", release.pipeline or ""),
        ("dataset", resolution.dataset),
    ):
        safe = label_value(value.replace("://", "___").replace("/", "_"))
        if value and safe:
            labels[f"{prefix}/{key}"] = safe
    return labels


def _project_mount_names(groups: tuple[str, ...]) -> list[tuple[str, str]]:
    """Each group's mount name: ``project-<group in lower case>``.

    A group that differs from an earlier one only in case gets a short hash of its name appended:
    ``Proj`` and ``proj`` are two directories.
    """
    names: list[tuple[str, str]] = []
    for group in groups:
        name = f"project-{group.lower()}"
        if any(taken == name for taken, _ in names):
            name += "-" + hashlib.sha256(group.encode()).hexdigest()[:8]
        names.append((name, group))
    return names


def _processed_with(resolution: Resolution) -> str:
    casa, pipeline = resolution.evidence.casa, resolution.evidence.pipeline
    text = f"CASA {casa}" if casa else "CASA unknown"
    return f"{text}, pipeline {pipeline}" if pipeline else text

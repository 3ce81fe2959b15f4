"""The image build matrix: which image each catalog release becomes, and how.

Each image comes with its recipe and build arguments. This module is pure, with no I/O. Tags come
from ``casaspawner.plan.image_for``, the same function the spawner uses, so the image a session
asks for is the image this matrix builds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from casaspawner import __version__, tarballs
from casaspawner.catalog.model import Catalog, Release
from casaspawner.errors import CasaspawnerError
from casaspawner.plan import PlanConfig, image_for
from casaspawner.runtime import EXTRA_PACKAGES, kernel_id

RecipeKind = Literal["session-base", "session", "modular", "monolithic"]
LABEL_PREFIX = "io.casaspawner"
INPUT_HASH_LABEL = f"{LABEL_PREFIX}.input-hash"
DEFAULT_BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
# Debian bookworm's python3.
DEFAULT_PYTHON = "3.11"
MEASURES_MOUNT = "/opt/casa/measures"
#: What the ``io.casaspawner.measures`` label says, by the catalog's ``data`` field of a release.
MEASURES_POLICIES = {
    "casaconfig": (
        f"read from {MEASURES_MOUNT} (mounted read-only): "
        "CASASITECONFIG points casaconfig's measurespath at $CASA_MEASURES_PATH, "
        "auto-updates off; the GUIs' casarc (CASARCFILES) names it too"
    ),
    "bundled": (
        f"geodetic and ephemerides are links into {MEASURES_MOUNT} (mounted read-only); "
        "the release's other bundled data stays in the image; "
        "the GUIs' casarc (CASARCFILES) names the mount too"
    ),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Extra packages of local environments that CASA images leave out.
#:
#: casalogger's AppImage unpacks to ~470 MB, a whole Qt 6 with WebEngine included. That would take
#: a CASA layer past its 1 GB goal. Measured with it: 6.6.5-31 1.29 GB, 6.7.0-31 1.43 GB. The
#: desktop's logger button says it is not part of the image.
IMAGE_OMITS = frozenset({"casalogger"})


def image_extra_packages() -> list[str]:
    """Return what modular images install besides the release's wheels.

    That is local environments' ``EXTRA_PACKAGES`` without ``IMAGE_OMITS``. ``EXTRA_PACKAGES`` is
    the one list, with ipykernel, the GUI tasks' ``protobuf<3.21`` and so on.
    """
    return [
        p for p in EXTRA_PACKAGES if re.split(r"[<>=!~;\[ ]", p, maxsplit=1)[0] not in IMAGE_OMITS
    ]


class ImageBuildError(CasaspawnerError):
    """An image cannot be planned, built or tested.

    The message is one sentence for the operator.
    """


@dataclass(frozen=True)
class MatrixOptions:
    """Operator choices that shape the matrix.

    They are the CLI flags of ``casaspawner images``.
    """

    registry: str = PlanConfig().image_registry
    image_template: str = PlanConfig().image_template
    session_tag: str = __version__
    base_image: str = DEFAULT_BASE_IMAGE
    python: str = DEFAULT_PYTHON
    tarball_mirror: str | None = None
    checksums: Mapping[str, str] = field(default_factory=dict)

    @property
    def plan_config(self) -> PlanConfig:
        return PlanConfig(image_registry=self.registry, image_template=self.image_template)

    @property
    def session_image(self) -> str:
        return f"{self.registry.rstrip('/')}/session:{self.session_tag}"

    @property
    def session_base_image(self) -> str:
        """The session image without casaspawner.

        It is the parent of the session image and of every CASA image.
        """
        return f"{self.registry.rstrip('/')}/session-base:{self.session_tag}"


@dataclass(frozen=True)
class Recipe:
    """One image to build.

    It has recipe files, build arguments, labels and the reference it is tagged with.
    """

    #: "session-base", "session" or the release id.
    name: str
    kind: RecipeKind
    #: Recipe directory under images/: "session" or "casa".
    context: str
    #: File name inside the context.
    containerfile: str
    image: str
    build_args: Mapping[str, str]
    labels: Mapping[str, str]
    release: Release | None = None
    #: Why it cannot be built as configured. None means buildable.
    problem: str | None = None

    @property
    def buildable(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "image": self.image,
            "recipe": f"images/{self.context}/{self.containerfile}",
            "build_args": dict(self.build_args),
            "labels": dict(self.labels),
            "buildable": self.buildable,
            "problem": self.problem,
        }


def casa_home(release: Release) -> str:
    return f"/opt/casa/{release.tag}"


def measures_policy(release: Release) -> str:
    """Return how a release reads the measures: ``casaconfig`` or ``bundled``.

    With ``casaconfig``, CASA >= 6.6.4 reads its site config. With ``bundled``, older CASA reads
    its own data.
    """
    return "casaconfig" if release.data == "casaconfig" else "bundled"


def session_recipes(options: MatrixOptions) -> tuple[Recipe, Recipe]:
    """The session base recipe, and the session image recipe on top of it.

    The session base has Jupyter, the desktop and nss_wrapper, but no casaspawner. The session
    image adds the casaspawner package. CASA images build on the base too, so a change to
    casaspawner's Python replaces only the small casaspawner layer of each image.
    """
    labels = {
        "org.opencontainers.image.title": "casaspawner session",
        "org.opencontainers.image.version": options.session_tag,
        f"{LABEL_PREFIX}.role": "session",
    }
    base = Recipe(
        name="session-base",
        kind="session-base",
        context="session",
        containerfile="Containerfile",
        image=options.session_base_image,
        build_args={"BASE_IMAGE": options.base_image},
        labels={**labels, f"{LABEL_PREFIX}.base": options.base_image},
    )
    session = Recipe(
        name="session",
        kind="session",
        context="session",
        containerfile="casaspawner.Containerfile",
        image=options.session_image,
        build_args={"SESSION_BASE": options.session_base_image},
        labels=labels,
    )
    return base, session


def release_recipe(release: Release, options: MatrixOptions) -> Recipe:
    """The recipe for one release.

    ``problem`` says why it cannot be built, e.g. unpublished or no wheel.
    """
    image = image_for(release, options.plan_config)
    policy = measures_policy(release)
    args = {
        "SESSION_BASE": options.session_base_image,
        "BASE_IMAGE": options.base_image,
        "CASA_RELEASE": release.id,
        "CASA_TAG": release.tag,
        "CASA_KERNEL_ID": kernel_id(release.tag),
        "CASA_KERNEL_NAME": release.kernel_name,
    }
    labels = {
        "org.opencontainers.image.title": release.label,
        "org.opencontainers.image.version": release.casa,
        f"{LABEL_PREFIX}.role": "casa",
        f"{LABEL_PREFIX}.release": release.id,
        f"{LABEL_PREFIX}.casa": release.casa,
        f"{LABEL_PREFIX}.pipeline": release.pipeline or "",
        f"{LABEL_PREFIX}.packaging": release.packaging,
        f"{LABEL_PREFIX}.kernel-name": release.kernel_name,
        f"{LABEL_PREFIX}.measures": MEASURES_POLICIES[policy],
    }
    common = {"name": release.id, "context": "casa", "image": image, "release": release}
    if release.packaging == "monolithic":
        assert release.tarball is not None
        tarball = release.tarball
        url = (
            tarball.url
            if not options.tarball_mirror
            else options.tarball_mirror.rstrip("/") + "/" + tarball.name
        )
        given = (options.checksums.get(tarball.name) or "").lower()
        # The catalog's pin always wins.
        sha256 = tarball.sha256 or given
        python = (
            f"{casa_home(release)}/lib/py/bin/python3" if release.casa_version.major >= 6 else ""
        )
        args |= {
            "CASA_TARBALL_URL": url,
            # Empty means the MD5 published next to the tarball (<url>.md5), fetched when the
            # build starts.
            "CASA_TARBALL_CHECKSUM": f"sha256:{sha256}" if sha256 else "",
            "CASA_PYTHON": python,
            "CASA_DATA": policy,
            "CASA_MEASURES_MOUNT": MEASURES_MOUNT,
        }
        labels |= {f"{LABEL_PREFIX}.tarball": tarball.name}
        problem = None
        if sha256 and not _SHA256.fullmatch(sha256):
            problem = f"the SHA-256 given for {tarball.name} is not 64 hexadecimal digits"
        elif tarball.sha256 and given and given != tarball.sha256:
            problem = (
                f"the catalog pins SHA-256 {tarball.sha256} for {tarball.name}, "
                "and --checksums/--sha256 gives another"
            )
        elif unverifiable := tarballs.unverifiable(url, sha256):
            problem = (
                f"its tarball cannot be verified ({unverifiable}); "
                "pin a SHA-256 with --checksums or --sha256"
            )
        recipe = Recipe(
            kind="monolithic",
            containerfile="monolithic.Containerfile",
            build_args=args,
            labels=labels,
            problem=problem,
            **common,  # type: ignore[arg-type]
        )
        return with_tarball_checksum(recipe, args["CASA_TARBALL_CHECKSUM"])
    if release.packaging == "modular":
        assert release.wheels is not None
        requirements = " ".join(release.wheels.requirements())
        args |= {
            "CASA_REQUIREMENTS": requirements,
            "CASA_EXTRA_PACKAGES": " ".join(image_extra_packages()),
            "PYTHON": f"python{options.python}",
        }
        labels |= {
            f"{LABEL_PREFIX}.python": options.python,
            f"{LABEL_PREFIX}.wheels": requirements,
        }
        problem = None
        if options.python not in release.wheels.python:
            problem = (
                f"casatools {release.wheels.casatools} has no wheel for Python {options.python} "
                f"(only {', '.join(release.wheels.python)}); "
                "use a base image with one of those and --python"
            )
        elif policy != "casaconfig":
            problem = (
                f"{release.label} predates casaconfig, "
                "which modular images use to read the measures"
            )
        return Recipe(
            kind="modular",
            containerfile="modular.Containerfile",
            build_args=args,
            labels=labels,
            problem=problem,
            **common,  # type: ignore[arg-type]
        )
    return Recipe(
        kind="monolithic",
        containerfile="monolithic.Containerfile",
        build_args=args,
        labels=labels,
        problem=f"{release.label} was never published; ALMA restores it with another release",
        **common,  # type: ignore[arg-type]
    )


def with_tarball_checksum(recipe: Recipe, checksum: str) -> Recipe:
    """Return ``recipe`` verifying its tarball against ``checksum``.

    ``checksum`` is ``sha256:<hex>`` or ``md5:<hex>``. Empty means the published ``.md5``, looked
    up when the build starts. The label records it, so it is in the input hash.
    """
    url = recipe.build_args["CASA_TARBALL_URL"]
    return replace(
        recipe,
        build_args={**recipe.build_args, "CASA_TARBALL_CHECKSUM": checksum},
        labels={
            **recipe.labels,
            f"{LABEL_PREFIX}.tarball-checksum": checksum or f"md5 of {url}.md5",
        },
    )


def select_releases(catalog: Catalog, ids: Sequence[str] | None) -> list[Release]:
    """Return the releases named, else every available one.

    Each release named must exist and have a public build.
    """
    if not ids:
        return catalog.available()
    chosen = []
    for release_id in ids:
        release = catalog.get(release_id)
        if not release.available:
            raise ImageBuildError(
                f"{release.label} has no public build, so there is no image to make for it."
            )
        chosen.append(release)
    return chosen


def build_matrix(
    catalog: Catalog, options: MatrixOptions, ids: Sequence[str] | None = None
) -> list[Recipe]:
    """All recipes: session base and session first, then one per selected release.

    The releases come in catalog order.
    """
    return [
        *session_recipes(options),
        *(release_recipe(r, options) for r in select_releases(catalog, ids)),
    ]


def parent_reference(recipe: Recipe) -> str:
    """Return the image a recipe builds on.

    That is the base image for the session base, else the session base.
    """
    return recipe.build_args.get("SESSION_BASE") or recipe.build_args["BASE_IMAGE"]


def parse_checksums(text: str) -> dict[str, str]:
    """Read ``sha256sum`` output into ``{file name: hex}``.

    Each line is ``<hex>  <file name>``.
    """
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not _SHA256.fullmatch(parts[0].lower()):
            raise ImageBuildError(
                f"line {number} of the checksum file is not '<sha256>  <file name>'."
            )
        sums[parts[1].lstrip("*").rsplit("/", 1)[-1]] = parts[0].lower()
    return sums


def split_reference(reference: str) -> tuple[str, str]:
    """Split ``registry/repo:tag`` into ``registry/repo`` and ``tag``.

    A port in the registry is not a tag.
    """
    if "@" in reference:
        raise ImageBuildError(
            f"{reference!r} is pinned by digest; z2jh prePuller needs a name and a tag."
        )
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon <= slash:
        return reference, "latest"
    return reference[:colon], reference[colon + 1 :]


def prepuller_name(release: Release) -> str:
    """A DNS-1123 label for the puller init container of this release.

    For example ``casa-6-6-5-31``.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", release.tag.lower()).strip("-")
    return f"casa-{slug}"[:63].rstrip("-")


def prepuller_values(releases: Iterable[Release], config: PlanConfig) -> dict[str, object]:
    """z2jh values: ``prePuller.extraImages`` for the given releases.

    Images picked by a callable profile list are invisible to the chart, so they are listed here.
    """
    images: dict[str, dict[str, str]] = {}
    for release in releases:
        name, tag = split_reference(image_for(release, config))
        images[prepuller_name(release)] = {"name": name, "tag": tag}
    return {"prePuller": {"extraImages": images}}


def input_hash(recipe: Recipe, files: Mapping[str, bytes], parent_id: str) -> str:
    """Hash everything that determines an image.

    That is the recipe files, build arguments, labels and parent image.
    """
    digest = hashlib.sha256()

    def feed(*parts: str | bytes) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)

    feed("casaspawner-image-v1", recipe.kind, recipe.containerfile, parent_id)
    for path in sorted(files):
        feed(path, files[path])
    for key in sorted(recipe.build_args):
        feed(key, recipe.build_args[key])
    for key in sorted(recipe.labels):
        feed(key, recipe.labels[key])
    return digest.hexdigest()

"""Typed, validated view of the release catalog ``releases.yaml``.

The catalog pairs ALMA pipeline releases with CASA releases.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from casaspawner.catalog.versions import (
    CasaVersion,
    is_pipeline_series,
    normalize_casa,
    normalize_pipeline,
    parse_casa,
    pipeline_sort_key,
)
from casaspawner.errors import CasaspawnerError, CatalogError, shown

Role = Literal["pipeline", "manual", "modular"]
ROLES: tuple[Role, ...] = ("pipeline", "manual", "modular")
CONFIDENCE = ("confirmed", "secondary", "unconfirmed", "planned")
#: ``ops.end`` of a build that was replaced in operations on a date no source records.
OPS_END_UNKNOWN = "unknown"
#: The largest catalog file read: the bundled one is about 40 kB.
CATALOG_LIMIT = 4 << 20
_ID = re.compile(r"[a-z0-9][a-z0-9.\-]{1,62}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}(?:-[0-9]{2})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RELEASE_KEYS = {
    "id",
    "role",
    "casa",
    "casa_internal",
    "pipeline",
    "pipeline_branch",
    "cycles",
    "manual",
    "ops",
    "python",
    "os",
    "tarball",
    "wheels",
    "restore_with",
    "data",
    "confidence",
    "source_url",
    "sources",
    "note",
}


@dataclass(frozen=True)
class Tarball:
    """A monolithic CASA distribution, optionally with a known SHA-256.

    Its URL is ``url_dir + name``.
    """

    name: str
    url_dir: str
    sha256: str | None = None

    @property
    def url(self) -> str:
        return self.url_dir.rstrip("/") + "/" + self.name


@dataclass(frozen=True)
class Wheels:
    """Modular CASA, as the PyPI wheels of exactly one CASA build.

    ``python`` lists the Python versions the wheels exist for.
    """

    python: tuple[str, ...]
    casatools: str
    casatasks: str
    casaplotms: str | None = None
    casaviewer: str | None = None

    def requirements(self) -> list[str]:
        """Return pip requirement strings pinning every wheel of the build."""
        pins = {"casatools": self.casatools, "casatasks": self.casatasks}
        if self.casaplotms:
            pins["casaplotms"] = self.casaplotms
        if self.casaviewer:
            pins["casaviewer"] = self.casaviewer
        return [f"{name}=={version}" for name, version in pins.items()]


@dataclass(frozen=True)
class ManualUse:
    """ALMA cycles whose manual calibration also used a pipeline release's CASA build.

    Manual calibration is calibration done without the pipeline.
    """

    cycles: tuple[int, ...]
    confidence: str
    sources: tuple[str, ...] = ()
    note: str | None = None


@dataclass(frozen=True)
class Release:
    """One CASA build in the catalog.

    See the field notes at the top of ``releases.yaml``. ``ops_end`` is a date, or
    ``OPS_END_UNKNOWN`` for a build replaced on an unrecorded date. It is None while the build is
    in operations, or for a planned release, not yet.
    """

    id: str
    role: Role
    casa: str
    confidence: str
    cycles: tuple[int, ...] = ()
    casa_internal: str | None = None
    pipeline: str | None = None
    pipeline_branch: str | None = None
    manual: ManualUse | None = None
    ops_start: str | None = None
    ops_end: str | None = None
    python: str | None = None
    os: str | None = None
    tarball: Tarball | None = None
    wheels: Wheels | None = None
    restore_with: str | None = None
    data: str | None = None
    source_url: str | None = None
    sources: tuple[str, ...] = ()
    note: str | None = None

    @property
    def casa_version(self) -> CasaVersion:
        return parse_casa(self.casa)

    @property
    def available(self) -> bool:
        """Tell whether a public tarball or wheels let a session run it."""
        return self.tarball is not None or self.wheels is not None

    @property
    def packaging(self) -> str:
        """How the build is published: ``monolithic``, ``modular`` or ``unpublished``.

        ``monolithic`` means a tarball, ``modular`` means wheels only.
        """
        if self.tarball is not None:
            return "monolithic"
        return "modular" if self.wheels is not None else "unpublished"

    @property
    def manual_cycles(self) -> tuple[int, ...]:
        """Cycles whose manual calibration used this CASA build.

        For a manual release these are its own cycles.
        """
        if self.role == "manual":
            return self.cycles
        return self.manual.cycles if self.manual else ()

    @property
    def uses(self) -> str:
        """What ALMA used the build for, and in which cycles.

        For example ``pipeline (2,3), manual (3)`` or ``manual (0)``.
        """
        if self.role == "modular":
            return "modular"
        uses = [] if self.role == "manual" else [("pipeline", self.cycles)]
        if self.manual_cycles:
            uses.append(("manual", self.manual_cycles))
        return ", ".join(
            f"{use} ({','.join(map(str, cycles))})" if cycles else use for use, cycles in uses
        )

    @property
    def is_current(self) -> bool:
        """Tell whether ALMA operations use this build now.

        That is, operations started and have not ended, and the release is not merely planned.
        """
        return self.ops_start is not None and self.ops_end is None and self.confidence != "planned"

    @property
    def ops_period(self) -> str:
        """The operations period, written for people.

        For example ``2016-10-25 → 2017-04-17``, ``2026-05-01 → now``,
        ``2018-10 → superseded`` when the end date is unknown, or ``planned from 2026-10``. It is
        empty when ALMA operations never ran the build.
        """
        if self.ops_start is None:
            return ""
        if self.confidence == "planned":
            return f"planned from {self.ops_start}"
        if self.ops_end is None:
            return f"{self.ops_start} → now"
        end = "superseded" if self.ops_end == OPS_END_UNKNOWN else self.ops_end
        return f"{self.ops_start} → {end}"

    @property
    def tag(self) -> str:
        """Image tag and stable short name of the build.

        For example ``6.5.4-9-pipeline-2023.1.0.124``, ``4.2.2`` or ``6.6.5-31``.
        """
        return f"{self.casa}-pipeline-{self.pipeline}" if self.pipeline else self.casa

    @property
    def label(self) -> str:
        """Name for people, e.g. ``CASA 6.5.4-9 (pipeline 2023.1.0.124)``."""
        return (
            f"CASA {self.casa} (pipeline {self.pipeline})"
            if self.pipeline
            else f"CASA {self.casa}"
        )

    @property
    def kernel_name(self) -> str:
        """Jupyter kernel display name for this build."""
        return f"CASA {self.casa}"

    def matches_pipeline(self, version: str) -> bool:
        """Tell whether a normalised pipeline version is this release's build.

        For a planned series, any version in the series matches.
        """
        if self.pipeline is None:
            return False
        if version == self.pipeline:
            return True
        return is_pipeline_series(self.pipeline) and version.startswith(self.pipeline + ".")

    def summary_row(self) -> dict[str, Any]:
        """The release as a flat JSON-able mapping with every catalog field.

        The CLI's ``catalog --json`` and the docs use it.
        """
        manual = self.manual
        return {
            "id": self.id,
            "role": self.role,
            "casa": self.casa,
            "casa_internal": self.casa_internal,
            "pipeline": self.pipeline,
            "pipeline_branch": self.pipeline_branch,
            "cycles": list(self.cycles),
            "manual": (
                {
                    "cycles": list(manual.cycles),
                    "confidence": manual.confidence,
                    "sources": list(manual.sources),
                    "note": manual.note,
                }
                if manual
                else None
            ),
            "ops_start": self.ops_start,
            "ops_end": self.ops_end,
            "ops_period": self.ops_period,
            "python": self.python,
            "os": self.os,
            "packaging": self.packaging,
            "tarball": self.tarball.url if self.tarball else None,
            "sha256": self.tarball.sha256 if self.tarball else None,
            "wheels": self.wheels.requirements() if self.wheels else None,
            "wheels_python": list(self.wheels.python) if self.wheels else None,
            "restore_with": self.restore_with,
            "data": self.data,
            "tag": self.tag,
            "confidence": self.confidence,
            "source_url": self.source_url,
            "sources": list(self.sources),
            "note": self.note,
        }


@dataclass(frozen=True)
class RestoreBuild:
    """An unpublished CASA build ALMA ran, and the release restoring it.

    ``restore_with`` is the release ALMA restores the build with.
    """

    casa: str
    restore_with: str
    reason: str


@dataclass(frozen=True)
class Catalog:
    """All releases, and the rules that tell ALMA builds from VLA/VLASS builds.

    The VLA/VLASS builds may carry the same numbers as ALMA's.
    """

    releases: tuple[Release, ...]
    non_alma_pipelines: tuple[str, ...] = ()
    restore_builds: tuple[RestoreBuild, ...] = ()
    source: str = "releases.yaml"
    _by_id: Mapping[str, Release] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {release.id: release for release in self.releases})

    def __iter__(self) -> Iterator[Release]:
        return iter(self.releases)

    def __len__(self) -> int:
        return len(self.releases)

    def get(self, release_id: str) -> Release:
        """Return the release with this id.

        An unknown id raises a one-sentence ``CatalogError``.
        """
        try:
            return self._by_id[release_id]
        except KeyError:
            raise CatalogError(
                f"{release_id!r} is not a release in the catalog; "
                "`casaspawner catalog` lists them."
            ) from None

    def __contains__(self, release_id: object) -> bool:
        return release_id in self._by_id

    def by_tag(self, tag: str) -> Release | None:
        return next((release for release in self.releases if release.tag == tag), None)

    def with_casa(self, casa: CasaVersion) -> list[Release]:
        """Releases whose CASA build is exactly ``casa``.

        A build number, if ``casa`` gives one, must match.
        """
        return [release for release in self.releases if casa.satisfied_by(release.casa_version)]

    def with_pipeline(self, pipeline: str) -> list[Release]:
        return [release for release in self.releases if release.matches_pipeline(pipeline)]

    def is_non_alma_pipeline(self, pipeline: str) -> bool:
        return any(fnmatch.fnmatchcase(pipeline, pattern) for pattern in self.non_alma_pipelines)

    def restore_build(self, casa: CasaVersion) -> RestoreBuild | None:
        return next((rb for rb in self.restore_builds if parse_casa(rb.casa) == casa), None)

    def available(self, roles: Iterable[Role] = ROLES) -> list[Release]:
        """Releases a session can run, in catalog order.

        Those are the releases with a public tarball or wheels.
        """
        wanted = set(roles)
        return [
            release for release in self.releases if release.available and release.role in wanted
        ]

    def latest_pipeline(self) -> Release:
        """The newest ALMA pipeline release with a public distribution."""
        candidates = [r for r in self.available(("pipeline",)) if r.pipeline]
        return max(candidates, key=lambda r: pipeline_sort_key(cast(str, r.pipeline)))

    def public_release_for(self, release: Release) -> Release:
        """Return the public release ALMA restores an unpublished build with.

        This follows ``restore_with`` from the unpublished build.
        """
        seen = {release.id}
        while not release.available and release.restore_with:
            release = self.get(release.restore_with)
            # Validated at load; kept as a guard.
            if release.id in seen:
                raise CatalogError(f"restore_with forms a cycle at {release.id!r}.")
            seen.add(release.id)
        return release


# Loading


class _Entry:
    """Reads one YAML mapping, turning every problem into a CatalogError.

    The error names the entry and the field.
    """

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, dict):
            raise CatalogError(f"{where} is not a mapping.")
        self.raw: dict[str, Any] = raw
        self.where = where

    def fail(self, key: str, problem: str) -> CatalogError:
        return CatalogError(f"{self.where}, field {key!r}: {problem}.")

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.raw.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return None
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.fail(key, f"must be text, not {type(value).__name__}")
        return str(value)

    def texts(self, key: str) -> tuple[str, ...]:
        value = self.raw.get(key) or []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, "must be a list of text")
        return tuple(value)

    def cycles(self, key: str) -> tuple[int, ...]:
        value = self.raw.get(key) or []
        if not isinstance(value, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value
        ):
            raise self.fail(key, "must be a list of cycle numbers")
        return tuple(value)


def _parse_release(raw: object, index: int) -> Release:
    entry = _Entry(raw, f"release #{index + 1}")
    release_id = entry.text("id", required=True)
    assert release_id is not None
    entry.where = f"release {release_id!r}"
    unknown = sorted(set(entry.raw) - _RELEASE_KEYS)
    if unknown:
        raise entry.fail(unknown[0], "is not a known field")
    if not _ID.fullmatch(release_id):
        raise entry.fail("id", "must be lower-case letters, digits, '.' and '-'")
    role = entry.text("role", required=True)
    if role not in ROLES:
        raise entry.fail("role", f"must be one of {', '.join(ROLES)}")
    casa = entry.text("casa", required=True)
    assert casa is not None
    try:
        if normalize_casa(casa) != casa:
            raise entry.fail("casa", f"must be written {normalize_casa(casa)!r}")
    except CatalogError:
        raise
    except CasaspawnerError as exc:
        raise entry.fail("casa", str(exc).rstrip(".")) from None
    pipeline = entry.text("pipeline")
    if pipeline is not None and not is_pipeline_series(pipeline):
        try:
            if normalize_pipeline(pipeline) != pipeline:
                raise entry.fail("pipeline", f"must be written {normalize_pipeline(pipeline)!r}")
        except CatalogError:
            raise
        except CasaspawnerError as exc:
            raise entry.fail("pipeline", str(exc).rstrip(".")) from None
    if role == "pipeline" and pipeline is None:
        raise entry.fail("pipeline", "is required for a pipeline release")
    confidence = entry.text("confidence", required=True)
    if confidence not in CONFIDENCE:
        raise entry.fail("confidence", f"must be one of {', '.join(CONFIDENCE)}")
    cycles = entry.cycles("cycles")
    ops = entry.raw.get("ops") or {}
    if not isinstance(ops, dict) or set(ops) - {"start", "end"}:
        raise entry.fail("ops", "must be a mapping with start and end")
    ops_start, ops_end = _ops_date(entry, ops, "start"), _ops_date(entry, ops, "end")
    if ops_end is not None and ops_start is None:
        raise entry.fail("ops", "has an end but no start")
    if entry.raw.get("manual") is not None and role != "pipeline":
        raise entry.fail(
            "manual", "belongs on pipeline releases; a manual release's cycles already say it"
        )
    manual = _parse_manual(entry)
    return Release(
        id=release_id,
        role=role,
        casa=casa,
        confidence=confidence,
        cycles=cycles,
        casa_internal=entry.text("casa_internal"),
        pipeline=pipeline,
        pipeline_branch=entry.text("pipeline_branch"),
        manual=manual,
        ops_start=ops_start,
        ops_end=ops_end,
        python=entry.text("python"),
        os=entry.text("os"),
        tarball=_parse_tarball(entry),
        wheels=_parse_wheels(entry),
        restore_with=entry.text("restore_with"),
        data=entry.text("data"),
        source_url=entry.text("source_url"),
        sources=entry.texts("sources"),
        note=entry.text("note"),
    )


def _ops_date(entry: _Entry, ops: dict[str, Any], key: str) -> str | None:
    """Return ``ops.start`` or ``ops.end`` as text.

    The value may be a quoted or unquoted YAML date, YYYY-MM, or, for the end only, ``unknown``.
    """
    value = ops.get(key)
    if value is None:
        return None
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, str) and (
        _DATE.fullmatch(value) or (key == "end" and value == OPS_END_UNKNOWN)
    ):
        return value
    extra = (
        f", or {OPS_END_UNKNOWN} for a build replaced on an unrecorded date"
        if key == "end"
        else ""
    )
    raise entry.fail("ops", f"{key} must be a date written YYYY-MM-DD or YYYY-MM{extra}")


def _parse_manual(entry: _Entry) -> ManualUse | None:
    raw = entry.raw.get("manual")
    if raw is None:
        return None
    sub = _Entry(raw, f"{entry.where}, manual")
    if set(sub.raw) - {"cycles", "confidence", "sources", "note"}:
        raise entry.fail("manual", "may only have cycles, confidence, sources and note")
    cycles = sub.cycles("cycles")
    if not cycles:
        raise entry.fail(
            "manual", "cycles must list the cycles whose manual calibration used this build"
        )
    confidence = sub.text("confidence", required=True)
    if confidence not in CONFIDENCE:
        raise entry.fail("manual", f"confidence must be one of {', '.join(CONFIDENCE)}")
    sources = sub.texts("sources")
    if not sources:
        raise entry.fail("manual", "sources must say where the manual use is recorded")
    assert confidence is not None
    return ManualUse(cycles, confidence, sources, sub.text("note"))


def _parse_tarball(entry: _Entry) -> Tarball | None:
    raw = entry.raw.get("tarball")
    if raw is None:
        return None
    sub = _Entry(raw, f"{entry.where}, tarball")
    name, url_dir, sha256 = (
        sub.text("name", required=True),
        sub.text("url_dir", required=True),
        sub.text("sha256"),
    )
    assert name is not None and url_dir is not None
    if set(sub.raw) - {"name", "url_dir", "sha256"}:
        raise entry.fail("tarball", "may only have name, url_dir and sha256")
    if "/" in name or not name.endswith((".tar.gz", ".tar.xz", ".tgz")):
        raise entry.fail("tarball", f"name {name!r} must be a .tar.gz or .tar.xz file name")
    if not url_dir.startswith(("https://", "http://")):
        raise entry.fail("tarball", "url_dir must be an http(s) URL")
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise entry.fail("tarball", "sha256 must be 64 lower-case hex digits")
    return Tarball(name=name, url_dir=url_dir, sha256=sha256)


def _parse_wheels(entry: _Entry) -> Wheels | None:
    raw = entry.raw.get("wheels")
    if raw is None:
        return None
    sub = _Entry(raw, f"{entry.where}, wheels")
    if set(sub.raw) - {"python", "casatools", "casatasks", "casaplotms", "casaviewer"}:
        raise entry.fail(
            "wheels", "may only have python, casatools, casatasks, casaplotms and casaviewer"
        )
    pythons = sub.texts("python")
    if not pythons:
        raise entry.fail("wheels", "python must list the Python versions the wheels exist for")
    casatools, casatasks = (
        sub.text("casatools", required=True),
        sub.text("casatasks", required=True),
    )
    assert casatools is not None and casatasks is not None
    casa = entry.raw.get("casa")
    if isinstance(casa, str) and normalize_casa(casatools) != casa:
        raise entry.fail("wheels", f"casatools {casatools} is not CASA build {casa}")
    return Wheels(pythons, casatools, casatasks, sub.text("casaplotms"), sub.text("casaviewer"))


def parse_catalog(data: object, source: str = "releases.yaml") -> Catalog:
    """Validate a parsed catalog document.

    Every problem raises a ``CatalogError`` naming the entry and the field.
    """
    try:
        return _parse_catalog(data, source)
    except CatalogError as exc:
        raise CatalogError(f"{source}: {exc}") from None


def _parse_catalog(data: object, source: str) -> Catalog:
    top = _Entry(data, "the catalog")
    if top.raw.get("schema") != 1:
        raise CatalogError("the catalog must declare `schema: 1`.")
    raw_releases = top.raw.get("releases")
    if not isinstance(raw_releases, list) or not raw_releases:
        raise CatalogError("the catalog has no `releases:` list.")
    releases = tuple(_parse_release(raw, index) for index, raw in enumerate(raw_releases))
    seen_ids: set[str] = set()
    seen_tags: dict[str, str] = {}
    for release in releases:
        if release.id in seen_ids:
            raise CatalogError(f"release {release.id!r} appears twice.")
        seen_ids.add(release.id)
        if release.tag in seen_tags:
            raise CatalogError(
                f"releases {seen_tags[release.tag]!r} and {release.id!r} "
                f"share image tag {release.tag!r}."
            )
        seen_tags[release.tag] = release.id
    by_id = {release.id: release for release in releases}
    for release in releases:
        if release.restore_with is None:
            continue
        target = by_id.get(release.restore_with)
        if target is None:
            raise CatalogError(
                f"release {release.id!r}, field 'restore_with': "
                f"{release.restore_with!r} is not a release."
            )
        if not target.available:
            raise CatalogError(
                f"release {release.id!r}, field 'restore_with': "
                f"{target.id!r} has no public tarball or wheels."
            )
    non_alma = _Entry(
        top.raw.get("non_alma_pipelines") or {"versions": []}, "non_alma_pipelines"
    ).texts("versions")
    raw_restore = top.raw.get("restore_builds") or []
    if not isinstance(raw_restore, list):
        raise CatalogError("`restore_builds:` must be a list.")
    restore_builds = []
    for index, raw in enumerate(raw_restore):
        entry = _Entry(raw, f"restore_builds #{index + 1}")
        casa, target_id, reason = (
            entry.text(k, required=True) for k in ("casa", "restore_with", "reason")
        )
        assert casa is not None and target_id is not None and reason is not None
        if target_id not in by_id or not by_id[target_id].available:
            raise entry.fail(
                "restore_with", f"{target_id!r} is not a release with a public distribution"
            )
        try:
            restore_builds.append(RestoreBuild(normalize_casa(casa), target_id, reason))
        except CasaspawnerError as exc:
            raise entry.fail("casa", str(exc).rstrip(".")) from None
    for release in releases:
        if release.pipeline and any(fnmatch.fnmatchcase(release.pipeline, p) for p in non_alma):
            raise CatalogError(
                f"release {release.id!r} uses pipeline {release.pipeline}, "
                "listed as a non-ALMA build."
            )
    return Catalog(releases, tuple(non_alma), tuple(restore_builds), source)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate a catalog file.

    Without a path, this loads the catalog shipped in the package, and caches it.
    """
    if path is None:
        return _bundled_catalog()
    name = shown(str(path))
    try:
        data = _read_regular_file(Path(path), CATALOG_LIMIT)
    except OSError as exc:
        raise CatalogError(f"The catalog {name} cannot be read ({exc.strerror or exc}).") from None
    if data is None:
        raise CatalogError(
            f"The catalog {name} is not a regular file of at most {CATALOG_LIMIT >> 20} MiB."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CatalogError(f"The catalog {name} is not UTF-8 text.") from None
    return _parse_text(text, name)


def _read_regular_file(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes; None for anything else.

    Opened without blocking, so a FIFO or a device never hangs or floods the reader.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None


def _parse_text(text: str, source: str) -> Catalog:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CatalogError(f"{source} is not valid YAML{where}.") from None
    except RecursionError:
        raise CatalogError(f"{source} is nested too deeply to be a catalog.") from None
    return parse_catalog(data, source)


@lru_cache(maxsize=1)
def _bundled_catalog() -> Catalog:
    text = (
        resources.files("casaspawner.catalog")
        .joinpath("releases.yaml")
        .read_text(encoding="utf-8")
    )
    return _parse_text(text, "casaspawner/catalog/releases.yaml")

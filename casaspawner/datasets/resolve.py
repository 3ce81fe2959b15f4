"""ALMA's rule: which release a dataset runs with, and why.

Evidence is read in ALMA's order: pipeline manifest → AQUA report → weblog → manual script
guard → CASA log. The first file that states a version decides. The release is then chosen from
the catalog:

1. Pipeline data: the catalog's release of that pipeline build, when its CASA build agrees. This
   is exact. When the CASA build differs, that release anyway, not exact.
2. An ALMA operations build that was never published (r42030, r42833, r30594, 2020.1.0.36,
   2025.1.0.37): the public release ALMA restores it with, not exact.
3. A VLA/VLASS build number, a pipeline build the catalog lacks, or a pipeline version that
   cannot be read: the ALMA release of the same CASA build, found as in 4, not exact.
4. Manual data, or CASA-only evidence: the release of exactly that CASA build. A guard's series
   such as ``4.2`` is satisfied by the catalog's newest 4.2.x. Manual releases are preferred,
   then pipeline builds also used for manual calibration. Next come known restore builds. Then,
   not exact, the nearest newer public build of the same CASA X.Y series, else its newest older
   one (alma-casa.md §8.6, "unknown → latest"). A series the catalog has no public build of is
   an error, since another series would not run the dataset's scripts.

Every reason is one sentence saying what the evidence names, what the session runs and why.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from casaspawner.catalog.model import Catalog, Release
from casaspawner.catalog.versions import CasaVersion, parse_casa, pipeline_sort_key
from casaspawner.datasets.archive import ArchiveClient
from casaspawner.datasets.evidence import READERS, UnreadableEvidence, read_manifest
from casaspawner.datasets.ids import looks_like_identifier, parse_identifier
from casaspawner.datasets.layout import open_mous, path_kind
from casaspawner.datasets.model import Evidence, Resolution
from casaspawner.datasets.tree import open_directory
from casaspawner.errors import ArchiveUnavailable, InvalidInput, VersionUnknown, shown


def read_evidence(path: Path, label: str | None = None) -> Evidence:
    """Return the first evidence, in ALMA's order, found in the dataset at ``path``.

    Errors name the dataset ``label``. The directory at ``path`` is opened once, and everything
    below it is read through that descriptor.
    """
    name = shown(str(path) if label is None else label)
    problems: list[str] = []
    with open_mous(path, label) as mous:
        for _kind, reader in READERS:
            try:
                evidence = reader(mous)
            except UnreadableEvidence as exc:
                problems.append(str(exc))
                continue
            except OSError as exc:
                problems.append(f"a file could not be read ({exc.strerror})")
                continue
            if evidence is not None:
                return evidence
    if problems:
        raise VersionUnknown(
            f"Nothing readable in {name} tells its CASA version: {problems[0]}", advice=""
        )
    raise VersionUnknown(
        f"Nothing in {name} tells which CASA version processed it "
        "(it has no pipeline manifest, AQUA report, "
        "weblog, calibration script or CASA log that names one)"
    )


def resolve_path(path: str | Path, catalog: Catalog, *, label: str | None = None) -> Resolution:
    """Resolve a dataset directory.

    ``label`` is how the dataset is named in the result. It defaults to the path.
    """
    path = Path(path)
    evidence = read_evidence(path, label)
    release, exact, reason = choose_release(catalog, evidence)
    return Resolution(label or str(path), evidence, release, exact, reason)


def resolve_target(
    target: str,
    catalog: Catalog,
    *,
    archive: ArchiveClient | None = None,
    base: Path | None = None,
) -> Resolution:
    """Resolve a dataset directory, or an ALMA identifier through ``archive``."""
    text = target.strip()
    if not text:
        raise InvalidInput(
            "No dataset given; give an ALMA dataset directory or an ALMA identifier."
        )
    path = (base / text) if base is not None else Path(text)
    try:
        kind = path_kind(path)
    except OSError:
        # Too long, not permitted …: a path-shaped target gets find_mous's sentence.
        kind = None
    if kind == "dir":
        return resolve_path(path, catalog, label=text)
    if not looks_like_identifier(text) and ("/" in text or text.startswith(".") or kind == "file"):
        # find_mous words the error.
        return resolve_path(path, catalog, label=text)
    identifier = parse_identifier(text)
    if archive is None:
        raise ArchiveUnavailable(
            f"No ALMA archive is configured to look up {identifier}; "
            "give the dataset's directory instead."
        )
    manifest = archive.fetch_manifest(identifier)
    try:
        with open_directory(manifest.parent) as cached:
            evidence = read_manifest(cached)
    except OSError as exc:
        raise ArchiveUnavailable(
            f"The archive's pipeline manifest for {identifier} could not be read from "
            f"{shown(str(manifest.parent))} ({exc.strerror or exc}); "
            "download the dataset and give its directory instead."
        ) from None
    if evidence is None:
        raise VersionUnknown(
            f"The archive's pipeline manifest for {identifier} does not name a CASA version "
            "(data of Cycles 2-4 or manually calibrated)",
            advice="download the dataset and give its directory instead",
        )
    evidence = replace(
        evidence,
        kind="archive-manifest",
        path=f"{archive.name}:{manifest.name}",
        sha256=hashlib.sha256(manifest.read_bytes()).hexdigest(),
    )
    release, exact, reason = choose_release(catalog, evidence)
    return Resolution(str(identifier), evidence, release, exact, reason)


def choose_release(catalog: Catalog, evidence: Evidence) -> tuple[Release, bool, str]:
    """Apply ALMA's rule to one piece of evidence.

    Returns the release to run, whether it is exact, and a one-sentence reason.
    """
    where = _where(evidence)
    if evidence.casa is None:
        raise VersionUnknown(f"{where} names no CASA version", advice="")
    casa = parse_casa(evidence.casa, allow_partial=True)
    pipeline = evidence.pipeline
    if pipeline is None:
        if evidence.pipeline_unreadable is not None:
            said = (
                f"{where} names CASA {casa} and a pipeline version that cannot be read "
                f"({evidence.pipeline_unreadable!r})"
            )
            return _by_casa(catalog, casa, said, manual=False, exact_possible=False)
        return _by_casa(
            catalog, casa, f"{where} names CASA {casa}", manual=evidence.kind == "script"
        )
    if catalog.is_non_alma_pipeline(pipeline):
        said = (
            f"{where} names pipeline {pipeline}, "
            f"a VLA/VLASS build that never processed ALMA data, with CASA {casa}"
        )
        return _by_casa(catalog, casa, said, manual=False, exact_possible=False)
    by_pipeline = [r for r in catalog.with_pipeline(pipeline) if r.role == "pipeline"]
    if not by_pipeline:
        said = f"{where} names pipeline {pipeline}, which is not in the catalog, with CASA {casa}"
        return _by_casa(catalog, casa, said, manual=False, exact_possible=False)
    release, said = by_pipeline[0], f"{where} names pipeline {pipeline} with CASA {casa}"
    if casa.satisfied_by(release.casa_version):
        return _public(catalog, release, said)
    differs = f"{said}, but the catalog has that pipeline build with CASA {release.casa}"
    chosen, _, why = _public(catalog, release, differs)
    if chosen is release:
        return (
            release,
            False,
            f"{differs}, so the session runs {release.label}, not the exact build.",
        )
    return chosen, False, why


def _by_casa(
    catalog: Catalog, casa: CasaVersion, said: str, *, manual: bool, exact_possible: bool = True
) -> tuple[Release, bool, str]:
    """Choose the release of a CASA build, or the nearest in its series.

    The build is the one ``said`` names. The nearest is a public build of the same CASA X.Y series.

    ``exact_possible`` is False when the evidence's pipeline build is not one the catalog can run.
    Then even the same CASA build is not the exact build.
    """
    matches = catalog.with_casa(casa)
    public = [r for r in matches if r.available]
    if public:
        release = _best(public, manual)
        newest = "" if casa.is_complete else f" (its newest {casa}.x build)"
        if exact_possible:
            return release, True, f"{said}; {release.label} is that build{newest}."
        return (
            release,
            False,
            f"{said}; the session runs the ALMA release of that CASA build{newest}, "
            f"{release.label}, not the exact build.",
        )
    if matches:
        chosen, _, why = _public(catalog, _best(matches, manual), said)
        return chosen, False, why
    restore = catalog.restore_build(casa)
    if restore is not None:
        return catalog.get(restore.restore_with), False, f"{said}; {restore.reason}."
    name = f"CASA {casa.major}.{casa.minor}"
    series = [
        r
        for r in catalog.available(("pipeline", "manual"))
        if (r.casa_version.major, r.casa_version.minor) == (casa.major, casa.minor)
    ]
    newer = [r for r in series if r.casa_version > casa]
    if newer:
        nearest = min(r.casa_version for r in newer)
        release = _best([r for r in newer if r.casa_version == nearest], manual)
        return (
            release,
            False,
            f"{said}; the catalog lacks that CASA build, "
            f"so the session runs the nearest newer build of {name}, {release.label}.",
        )
    if series:
        top = max(r.casa_version for r in series)
        release = _best([r for r in series if r.casa_version == top], manual)
        return (
            release,
            False,
            f"{said}; the catalog lacks that CASA build and has only older builds of {name}, "
            f"so the session runs the newest of them, {release.label}.",
        )
    raise VersionUnknown(
        f"{said}, but the catalog has no public build of {name}", "choose a release yourself"
    )


def _public(catalog: Catalog, release: Release, said: str) -> tuple[Release, bool, str]:
    """Choose ``release`` when it can run, else its public restore release.

    That is the public release ALMA restores it with. Only ``release`` itself is exact.
    """
    if release.available:
        return release, True, f"{said}; {release.label} is that exact build."
    public = catalog.public_release_for(release)
    if public.available:
        build = "that operations build" if release.role == "pipeline" else "that build"
        return (
            public,
            False,
            f"{said}; {build} was never published, and ALMA restores it with {public.label}.",
        )
    if release.confidence == "planned":
        raise VersionUnknown(
            f"{said}; {release.label} is a planned release with no public build yet",
            "choose a release yourself",
        )
    raise VersionUnknown(
        f"{said}; {release.label} has no public distribution, so no session can run it",
        "choose a release yourself",
    )


def _best(releases: list[Release], manual: bool) -> Release:
    """The preferred release among builds of the same CASA version.

    For manual data, manual releases come first.
    """
    return max(releases, key=lambda r: _preference(r, manual))


def _preference(release: Release, manual: bool) -> tuple[int, CasaVersion, tuple[int, ...]]:
    if manual:
        # A manual release first, then a pipeline build also used for manual calibration.
        if release.role == "manual":
            rank = 3
        elif release.manual_cycles:
            rank = 2
        else:
            rank = int(release.role == "pipeline")
    else:
        rank = {"pipeline": 2, "manual": 1, "modular": 0}[release.role]
    return (rank, release.casa_version, pipeline_sort_key(release.pipeline or "r0"))


def _where(evidence: Evidence) -> str:
    names = {
        "manifest": "The pipeline manifest",
        "aquareport": "The AQUA report",
        "weblog": "The weblog",
        "script": "The calibration script",
        "casalog": "The CASA log",
        "archive-manifest": "The archive's pipeline manifest",
    }
    return names[evidence.kind]

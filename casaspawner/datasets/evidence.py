"""One small reader per kind of evidence of a dataset's processing version.

Every reader takes the MOUS directory and the dataset root the user gave (paths in evidence are relative to
it) and returns the Evidence it finds, None when its kind of file is absent or says nothing about versions,
or raises ``UnreadableEvidence`` for a file that is there but cannot be read safely. Files are read with size
limits; XML goes through defusedxml with DTDs forbidden; archives are read in memory, never extracted;
files reached through a symbolic link that leaves the dataset are ignored.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import BinaryIO, cast
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from casaspawner.catalog.versions import normalize_pipeline, parse_casa
from casaspawner.datasets.model import Evidence, EvidenceKind
from casaspawner.errors import CasaspawnerError

MiB = 1024 * 1024
LIMITS = {
    "manifest": 32 * MiB,
    "aquareport": 8 * MiB,
    "weblog": 4 * MiB,
    "script": MiB // 4,
    "casalog": 2 * MiB,
}
GiB = 1024 * MiB
_MAX_TAR_MEMBERS = 200_000
#: Packed archives: the largest read at all, and how much they may unpack to while being scanned —
#: ``_TAR_RATIO`` times their size (at least ``_TAR_FLOOR``, at most ``_TAR_EXPANDED``). Weblogs are mostly
#: PNG plots and HTML (ratios of 1-10); a decompression bomb is refused long before it fills memory or time.
_TAR_COMPRESSED = 4 * GiB
_TAR_EXPANDED = 4 * GiB
_TAR_RATIO = 50
_TAR_FLOOR = 64 * MiB
_SEARCH_DIRS = (".", "script", "qa", "log", "calibration", "product")


class UnreadableEvidence(CasaspawnerError):
    """A candidate evidence file exists but cannot be read safely; the message says which and why."""


Reader = Callable[[Path, Path], "Evidence | None"]


# ------------------------------------------------------------------------------------------- file access


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def _candidates(
    mous: Path, root: Path, patterns: tuple[str, ...], dirs: tuple[str, ...] = _SEARCH_DIRS
) -> list[Path]:
    """Regular files matching ``patterns`` in the MOUS's usual subdirectories, sorted, staying in ``root``."""
    found: set[Path] = set()
    for sub in dirs:
        directory = mous / sub
        if not directory.is_dir() or not _inside(directory, root):
            continue
        for pattern in patterns:
            for path in directory.glob(pattern):
                if path.is_file() and _inside(path, root):
                    found.add(path)
    return sorted(found)


def _read(path: Path, limit: int, *, truncate: bool = False) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        if truncate:
            return data[:limit]
        raise UnreadableEvidence(
            f"{path.name} is larger than {limit // MiB or 1} MiB, too large to be evidence."
        )
    return data


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _parse_xml(data: bytes, name: str) -> Element:
    try:
        tree: Element = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
        return tree
    except DefusedXmlException:
        raise UnreadableEvidence(
            f"{name} declares a DTD or entities, which evidence files never do; ignored."
        ) from None
    except ParseError:
        raise UnreadableEvidence(f"{name} is not well-formed XML.") from None


def _casa(text: str | None, name: str, *, partial: bool = False) -> str | None:
    if text is None or not text.strip():
        return None
    try:
        return str(parse_casa(text, allow_partial=partial))
    except CasaspawnerError:
        raise UnreadableEvidence(
            f"{name} gives the CASA version as {text.strip()[:40]!r}, which is not one."
        ) from None


def _stated(
    kind: EvidenceKind, path: str, casa_text: str | None, pipeline_text: str | None, name: str
) -> Evidence | None:
    """Evidence from a file that names a CASA and a pipeline version (manifest, AQUA report, weblog).

    No CASA version: None (the next file or kind decides). A CASA version that is not one: the file is
    unreadable. A pipeline version that is not one does not throw the CASA version away: it is kept, as
    written (shortened), in ``pipeline_unreadable`` so the resolver can say so.
    """
    casa = _casa(casa_text, name)
    if casa is None:
        return None
    pipeline = unreadable = None
    if pipeline_text is not None and pipeline_text.strip():
        try:
            pipeline = normalize_pipeline(pipeline_text)
        except CasaspawnerError:
            unreadable = pipeline_text.strip()[:40]
    return Evidence(kind, path, casa, pipeline, unreadable)


# -------------------------------------------------------------------------------------------- the readers


def read_manifest(mous: Path, root: Path) -> Evidence | None:
    """``*.pipeline_manifest.xml``: ``ous/casaversion@name`` and ``ous/pipeline_version@name`` (Cycle 5 on).

    Several manifests (one per recipe) are read calibration-first; manifests of Cycles 2-4 carry no versions
    and yield None so the next kind of evidence is consulted.
    """
    paths = sorted(
        _candidates(mous, root, ("*pipeline_manifest.xml",)),
        key=lambda p: (0 if "cal" in p.name else 1, p.name),
    )
    for path in paths:
        tree = _parse_xml(_read(path, LIMITS["manifest"]), path.name)
        casa_el = tree.find(".//ous/casaversion")
        if casa_el is None:
            casa_el = tree.find(".//casaversion")
        pipe_el = tree.find(".//ous/pipeline_version")
        if pipe_el is None:
            pipe_el = tree.find(".//pipeline_version")
        evidence = _stated(
            "manifest",
            _rel(path, root),
            casa_el.get("name") if casa_el is not None else None,
            pipe_el.get("name") if pipe_el is not None else None,
            path.name,
        )
        if evidence is not None:
            return evidence
    return None


def read_aquareport(mous: Path, root: Path) -> Evidence | None:
    """``*pipeline_aquareport.xml``: ``QaSummary/CasaVersion`` and ``QaSummary/PipelineVersion``."""
    for path in _candidates(mous, root, ("*pipeline_aquareport.xml",)):
        tree = _parse_xml(_read(path, LIMITS["aquareport"]), path.name)
        evidence = _stated(
            "aquareport",
            _rel(path, root),
            tree.findtext(".//QaSummary/CasaVersion") or tree.findtext(".//CasaVersion"),
            tree.findtext(".//QaSummary/PipelineVersion") or tree.findtext(".//PipelineVersion"),
            path.name,
        )
        if evidence is not None:
            return evidence
    return None


class _RowParser(HTMLParser):
    """Collects the text of each table row's cells (``th`` and ``td``)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._finish_cell()
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th", "tr"):
            self._finish_cell()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def _finish_cell(self) -> None:
        if self._cell is not None and self.rows:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
        self._cell = None


def weblog_versions(html: bytes) -> tuple[str | None, str | None]:
    """The CASA and pipeline version texts of a weblog home page (``t1-1.html``), links stripped."""
    parser = _RowParser()
    parser.feed(html.decode("utf-8", errors="replace"))
    parser.close()
    values: dict[str, str] = {}
    for row in parser.rows:
        if len(row) >= 2:
            values.setdefault(row[0].rstrip(":").strip().lower(), row[1])
    # Cells carry links after the version: "6.5.4.9 (environment)", "2023.1.0.124 (documentation)",
    # "42254M (Pipeline-CASA54-P1-B) (documentation)", "4.7.2-REL (r39762)".
    casa = _WEBLOG_CASA.match(values.get("casa version", ""))
    pipeline = _WEBLOG_PIPELINE.match(values.get("pipeline version", ""))
    return (
        casa.group(0) if casa else values.get("casa version"),
        pipeline.group(0) if pipeline else values.get("pipeline version"),
    )


_WEBLOG_CASA = re.compile(r"\s*[0-9]+\.[0-9]+\.[0-9]+(?:[-.][0-9]+)?(?:-REL)?(?:\s*\(r[0-9]+\))?")
_WEBLOG_PIPELINE = re.compile(
    r"\s*(?:[0-9]{4}\.[0-9]+\.[0-9]+\.[0-9]+(?:\+\S+)?|r?[0-9]{5}M?(?:\s*\([^()]*\))?)"
)


def read_weblog(mous: Path, root: Path) -> Evidence | None:
    """Weblog home page ``html/t1-1.html``: unpacked, or inside ``qa/*.weblog.tgz`` (read in memory)."""
    pages = [
        page
        for qa in (mous / "qa", mous)
        if qa.is_dir() and _inside(qa, root)
        for page in _walk_for(qa, "t1-1.html", depth=5)
        if page.parent.name == "html" and _inside(page, root)
    ]
    for page in sorted(pages):
        evidence = _stated(
            "weblog", _rel(page, root), *weblog_versions(_read(page, LIMITS["weblog"])), page.name
        )
        if evidence is not None:
            return evidence
    for archive in _candidates(mous, root, ("*weblog.tgz", "*weblog.tar.gz"), ("qa", ".")):
        for member_name, data in _tar_members(
            archive, lambda n: n.endswith("html/t1-1.html"), LIMITS["weblog"]
        ):
            where = f"{_rel(archive, root)}!{member_name}"
            evidence = _stated("weblog", where, *weblog_versions(data), f"{archive.name}!{member_name}")
            if evidence is not None:
                return evidence
    return None


_GUARD_PATTERNS = (
    re.compile(r"GENERATING THE SCRIPT:\s*([0-9][0-9A-Za-z.\-]*)"),
    re.compile(r"""re\.search\(\s*['"]\^?([0-9][0-9.\-]*)['"]\s*,\s*casadef\.casa_version"""),
    re.compile(r"""casadef\.casa_version\s*[!=]=\s*['"]([0-9][0-9.\-]*)['"]"""),
    re.compile(r"""casa\[['"]build['"]\]\[['"]version['"]\]\s*[!=]=\s*['"]([0-9][0-9.\-]*)['"]"""),
)


def script_version(text: str, name: str) -> str | None:
    """The CASA version a manual calibration script's guard demands (series such as ``4.2`` allowed)."""
    head = "\n".join(text.splitlines()[:80])
    for pattern in _GUARD_PATTERNS:
        match = pattern.search(head)
        if match:
            return _casa(match.group(1).rstrip(".-"), name, partial=True)
    return None


def read_script(mous: Path, root: Path) -> Evidence | None:
    """The version guard at the top of manual ``*.scriptForCalibration.py`` files (one per EB).

    When the scripts disagree, the version most of them demand wins (ties: the newest).
    """
    versions: dict[str, Path] = {}
    counts: Counter[str] = Counter()
    for path in _candidates(mous, root, ("*scriptForCalibration.py",), ("script", ".")):
        text = _read(path, LIMITS["script"], truncate=True).decode("utf-8", errors="replace")
        version = script_version(text, path.name)
        if version:
            counts[version] += 1
            versions.setdefault(version, path)
    if not counts:
        return None
    best = max(counts, key=lambda v: (counts[v], parse_casa(v, allow_partial=True)))
    return Evidence("script", _rel(versions[best], root), best, None)


_LOG_LINE = re.compile(
    rb"CASA Version:?\s+(?:CASA\s+)?([0-9]+\.[0-9]+\.[0-9]+(?:[-.][0-9]+)?(?:-REL)?(?:\s*\(r[0-9]+\))?)"
)


def log_version(data: bytes, name: str) -> str | None:
    match = _LOG_LINE.search(data)
    return _casa(match.group(1).decode("ascii"), name) if match else None


def read_casalog(mous: Path, root: Path) -> Evidence | None:
    """A ``CASA Version`` line in ``log/casa*.log`` (``casapy-*.log`` for CASA ≤ 4), or in a ``log/*.tgz``."""
    for path in _candidates(mous, root, ("casa*.log",), ("log",)):
        version = log_version(_read(path, LIMITS["casalog"], truncate=True), path.name)
        if version:
            return Evidence("casalog", _rel(path, root), version, None)
    for archive in _candidates(mous, root, ("*.tgz", "*.tar.gz"), ("log",)):
        for member_name, data in _tar_members(archive, _is_casa_log, LIMITS["casalog"], True):
            version = log_version(data, member_name)
            if version:
                return Evidence("casalog", f"{_rel(archive, root)}!{member_name}", version, None)
    return None


def _is_casa_log(name: str) -> bool:
    return _LOG_MEMBER.fullmatch(name) is not None


_LOG_MEMBER = re.compile(r"(?:.*/)?casa(?:py)?-[^/]*\.log")

#: The readers in ALMA's order of trust.
READERS: tuple[tuple[str, Reader], ...] = (
    ("manifest", read_manifest),
    ("aquareport", read_aquareport),
    ("weblog", read_weblog),
    ("script", read_script),
    ("casalog", read_casalog),
)


# --------------------------------------------------------------------------------------------- utilities


def _walk_for(top: Path, filename: str, depth: int) -> Iterator[Path]:
    """Files named ``filename`` under ``top`` within ``depth`` levels, without following symbolic links."""
    stack = [(top, 0)]
    while stack:
        directory, level = stack.pop()
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                continue
            if entry.is_dir() and level < depth:
                stack.append((entry, level + 1))
            elif entry.name == filename and entry.is_file():
                yield entry


def _tar_members(
    archive: Path, wanted: Callable[[str], bool], limit: int, truncate: bool = False
) -> Iterator[tuple[str, bytes]]:
    """Contents of the wanted regular members of a tar archive, read in memory (never extracted).

    Only members with safe names (relative, no ``..``, printable) are considered, so no other name is ever
    reported. The archive's size and how much it unpacks to while being scanned are capped (see
    ``_TAR_EXPANDED``); going over either makes it unreadable evidence.
    """
    try:
        with archive.open("rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            if size > _TAR_COMPRESSED:
                raise UnreadableEvidence(
                    f"{archive.name} is larger than {_TAR_COMPRESSED // GiB} GiB, too large to read as evidence."
                )
            budget = min(_TAR_EXPANDED, max(_TAR_FLOOR, _TAR_RATIO * size))
            stream = cast(BinaryIO, _Budget(_decompressed(raw), budget, archive.name))
            with tarfile.open(fileobj=stream, mode="r|", bufsize=64 * 1024) as tar:
                for index, member in enumerate(tar):
                    if index > _MAX_TAR_MEMBERS:
                        return
                    if not member.isreg() or not _safe_member(member.name) or not wanted(member.name):
                        continue
                    if member.size > limit and not truncate:
                        raise UnreadableEvidence(f"{archive.name}!{member.name} is too large to be evidence.")
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read(limit)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError):
        raise UnreadableEvidence(f"{archive.name} is not a readable tar archive.") from None


def _safe_member(name: str) -> bool:
    """A member name that stays inside the archive's tree and prints as itself."""
    parts = name.split("/")
    return (
        bool(name)
        and name.isprintable()
        and not name.startswith("/")
        and "\\" not in name
        and ".." not in parts
    )


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """The archive's tar stream: gzip, bzip2 and xz are recognised by their magic bytes, else plain tar."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if magic.startswith(b"BZh"):
        return cast(BinaryIO, bz2.BZ2File(raw))
    if magic.startswith(b"\xfd7zXZ\x00"):
        return cast(BinaryIO, lzma.LZMAFile(raw))
    return raw


class _Budget:
    """A read-only stream that refuses to deliver more than ``budget`` bytes in total."""

    def __init__(self, stream: BinaryIO, budget: int, name: str) -> None:
        self.stream, self.left, self.name, self.budget = stream, budget, name, budget

    def read(self, size: int = -1) -> bytes:
        wanted = self.left + 1 if size < 0 or size > self.left else size
        data = self.stream.read(wanted)
        self.left -= len(data)
        if self.left < 0:
            raise UnreadableEvidence(
                f"{self.name} unpacks to more than {self.budget // MiB} MiB, too much to read as evidence."
            )
        return data

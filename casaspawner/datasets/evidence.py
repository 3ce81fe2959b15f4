"""One small reader per kind of evidence of a dataset's processing version.

Every reader takes the open MOUS directory, whose path is relative to the dataset directory the
user gave. Evidence paths are reported the same way. A reader returns the Evidence it finds, or
None when its kind of file is absent or says nothing about versions. It raises
``UnreadableEvidence`` for a file that is there but cannot be read safely.

Files are read with size limits. XML goes through defusedxml with DTDs forbidden. Archives are
read in memory, never extracted. Everything is opened relative to the MOUS directory's descriptor
without following a link (see ``tree``). A symbolic link, there all along or swapped in while the
dataset is read, is passed over.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import html
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import BinaryIO, cast
from xml.etree.ElementTree import Element, ParseError, TreeBuilder, XMLPullParser

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from casaspawner.catalog.versions import normalize_pipeline, parse_casa
from casaspawner.datasets.model import Evidence, EvidenceKind
from casaspawner.datasets.tree import Directory, listing, open_file, subdirectory, walk
from casaspawner.errors import CasaspawnerError, shown

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
#: The most files of one kind read in one dataset.
_MAX_FILES = 16
#: Packed archives: the largest read at all, and how much they may unpack to.
#:
#: While being scanned, an archive may unpack to ``_TAR_RATIO`` times its size, at least
#: ``_TAR_FLOOR`` and at most ``_TAR_EXPANDED``. Weblogs are mostly PNG plots and HTML, with ratios
#: of 1-10. A decompression bomb is refused long before it fills memory or time.
_TAR_COMPRESSED = 4 * GiB
_TAR_EXPANDED = 4 * GiB
_TAR_RATIO = 50
_TAR_FLOOR = 64 * MiB
_SEARCH_DIRS = (".", "script", "qa", "log", "calibration", "product")
#: XML evidence is streamed: at most this many elements, nested at most this deep.
#:
#: Real manifests and AQUA reports have thousands of elements, ten levels deep. So a file within
#: its size limit costs little.
_XML_ELEMENTS = 1_000_000
_XML_DEPTH = 100
_XML_CHUNK = 1 << 20
#: How far into a manual calibration script its version guard is looked for.
#:
#: The guard comes after the step list.
_SCRIPT_HEAD_LINES = 400


class UnreadableEvidence(CasaspawnerError):
    """A candidate evidence file exists but cannot be read safely.

    The message says which file and why.
    """


Reader = Callable[[Directory], "Evidence | None"]


# File access


def _candidates(
    mous: Directory, patterns: tuple[str, ...], dirs: tuple[str, ...] = _SEARCH_DIRS
) -> list[PurePosixPath]:
    """Regular files matching ``patterns`` in the MOUS's usual subdirectories.

    Links are left out. The paths are relative to the MOUS, and sorted.
    """
    found: set[PurePosixPath] = set()
    # Case-sensitive.
    wanted = re.compile("|".join(fnmatch.translate(pattern) for pattern in patterns))
    for sub in dirs:
        with subdirectory(mous, PurePosixPath(sub)) as directory:
            if directory is None:
                continue
            matching = listing(directory, wanted.match)
            found.update(PurePosixPath(sub, name) for name, kind in matching if kind == "file")
    return sorted(found)


def _read(
    mous: Directory, path: PurePosixPath, limit: int, *, truncate: bool = False
) -> bytes | None:
    """Read at most ``limit`` bytes of the file ``path`` below the MOUS.

    With ``truncate``, a larger file gives its first ``limit`` bytes. Without it, a larger file is
    unreadable evidence. Returns None when the path is not, or no longer, a regular file.
    """
    with open_file(mous, path) as handle:
        if handle is None:
            return None
        too_large = not truncate and os.fstat(handle.fileno()).st_size > limit
        data = b"" if too_large else handle.read(limit + 1)
    if too_large or len(data) > limit:
        if truncate:
            return data[:limit]
        raise UnreadableEvidence(
            f"{shown(path.name)} is larger than {limit // MiB or 1} MiB, too large to be evidence."
        )
    return data


def _contents(
    mous: Directory, paths: list[PurePosixPath], limit: int, *, truncate: bool = False
) -> Iterator[tuple[PurePosixPath, bytes]]:
    """Yield each of the first ``_MAX_FILES`` of ``paths`` with its contents, in order.

    See ``_read``. A path that is no longer a regular file is passed over. A real MOUS has a few
    files of each kind; reading no more bounds what a directory of thousands costs.
    """
    for path in paths[:_MAX_FILES]:
        data = _read(mous, path, limit, truncate=truncate)
        if data is not None:
            yield path, data


def _rel(mous: Directory, path: PurePosixPath) -> str:
    """A path below the MOUS as evidence reports it.

    That is relative to the dataset directory the user gave.
    """
    return str(mous.path / path)


def xml_values(
    data: bytes, name: str, wanted: dict[str, tuple[str, str | None]]
) -> dict[str, str | None]:
    """Read the values of the ``wanted`` elements of the XML document ``data``.

    ``name`` is the file, for messages. ``wanted`` maps an element's tag, namespaces ignored, to
    its preferred parent's tag and the attribute holding the value. An attribute of None means the
    element's text.

    Each value comes from the first such element under its preferred parent, else from the first
    one anywhere. It is None when there is none.

    The document is streamed through defusedxml, with no DTD and no entities. Every element is
    dropped once read. Reading stops as soon as every value was found under its preferred parent.
    The parser is fed large chunks: expat before 2.6 parses a token again from its start with
    every chunk, so a huge attribute fed in small chunks costs time quadratic in its size.
    """
    preferred: dict[str, str] = {}
    anywhere: dict[str, str] = {}
    open_elements: list[Element] = []
    try:
        events = _xml_events(data)
        for count, (event, element) in enumerate(events):
            if event == "start":
                open_elements.append(element)
                if len(open_elements) > _XML_DEPTH or count > 2 * _XML_ELEMENTS:
                    raise UnreadableEvidence(
                        f"{shown(name)} holds more or deeper-nested XML elements "
                        "than evidence files do."
                    )
                continue
            open_elements.pop()
            tag = element.tag.rsplit("}", 1)[-1]
            if tag in wanted:
                parent, attribute = wanted[tag]
                value = element.get(attribute) if attribute else element.text
                if value and value.strip():
                    anywhere.setdefault(tag, value)
                    if open_elements and open_elements[-1].tag.rsplit("}", 1)[-1] == parent:
                        preferred.setdefault(tag, value)
                        if len(preferred) == len(wanted):
                            break
            if open_elements:
                # Once read, an element is dropped with its earlier siblings, which have all
                # ended, so memory stays small; dropping them all at once costs linear time.
                del open_elements[-1][:]
    except DefusedXmlException:
        raise UnreadableEvidence(
            f"{shown(name)} declares a DTD or entities, which evidence files never do; ignored."
        ) from None
    except ParseError:
        raise UnreadableEvidence(f"{shown(name)} is not well-formed XML.") from None
    return {tag: preferred.get(tag, anywhere.get(tag)) for tag in wanted}


def _xml_events(data: bytes) -> Iterator[tuple[str, Element]]:
    """The start and end events of an XML document, parsed by defusedxml in 1 MiB chunks."""
    parser = XMLPullParser(
        ("start", "end"),
        _parser=DefusedXMLParser(
            target=TreeBuilder(), forbid_dtd=True, forbid_entities=True, forbid_external=True
        ),
    )
    view = memoryview(data)
    chunks = [view[start : start + _XML_CHUNK] for start in range(0, len(data), _XML_CHUNK)]
    for chunk in [*chunks, None]:
        if chunk is None:
            parser.close()
        else:
            parser.feed(chunk)
        # Only start and end events were asked for: each is (event, element).
        yield from cast(Iterator[tuple[str, Element]], parser.read_events())


#: What a pipeline manifest says: ``ous/casaversion@name`` and ``ous/pipeline_version@name``.
MANIFEST_VALUES: dict[str, tuple[str, str | None]] = {
    "casaversion": ("ous", "name"),
    "pipeline_version": ("ous", "name"),
}


def _casa(text: str | None, name: str, *, partial: bool = False) -> str | None:
    if text is None or not text.strip():
        return None
    try:
        return str(parse_casa(text, allow_partial=partial))
    except CasaspawnerError:
        raise UnreadableEvidence(
            f"{shown(name)} gives the CASA version as {text.strip()[:40]!r}, which is not one."
        ) from None


def _stated(
    kind: EvidenceKind, path: str, casa_text: str | None, pipeline_text: str | None, name: str
) -> Evidence | None:
    """Evidence from a file that names a CASA and a pipeline version.

    Such files are the manifest, the AQUA report and the weblog. With no CASA version this returns
    None, and the next file or kind decides. A CASA version that is not one makes the file
    unreadable.

    A pipeline version that is not one does not throw the CASA version away. It is kept as written,
    shortened, in ``pipeline_unreadable``, so the resolver can say so.
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


# The readers


def read_manifest(mous: Directory) -> Evidence | None:
    """Read the versions in ``*.pipeline_manifest.xml``, from Cycle 5 on.

    They are ``ous/casaversion@name`` and ``ous/pipeline_version@name``. Several manifests, one per
    recipe, are read calibration-first. Manifests of Cycles 2-4 carry no versions and yield None,
    so the next kind of evidence is consulted.
    """
    paths = sorted(
        _candidates(mous, ("*pipeline_manifest.xml",)),
        key=lambda p: (0 if "cal" in p.name else 1, p.name),
    )
    for path, data in _contents(mous, paths, LIMITS["manifest"]):
        values = xml_values(data, path.name, MANIFEST_VALUES)
        evidence = _stated(
            "manifest",
            _rel(mous, path),
            values["casaversion"],
            values["pipeline_version"],
            path.name,
        )
        if evidence is not None:
            return evidence
    return None


def read_aquareport(mous: Directory) -> Evidence | None:
    """Read the versions in ``*pipeline_aquareport.xml``.

    They are ``QaSummary/CasaVersion`` and ``QaSummary/PipelineVersion``.
    """
    paths = _candidates(mous, ("*pipeline_aquareport.xml",))
    for path, data in _contents(mous, paths, LIMITS["aquareport"]):
        values = xml_values(
            data,
            path.name,
            {"CasaVersion": ("QaSummary", None), "PipelineVersion": ("QaSummary", None)},
        )
        evidence = _stated(
            "aquareport",
            _rel(mous, path),
            values["CasaVersion"],
            values["PipelineVersion"],
            path.name,
        )
        if evidence is not None:
            return evidence
    return None


#: A start or end tag, in linear time: a candidate never reaches past the next ``<`` or ``>``.
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)(?:[\s/][^<>]*)?>")


def _without_comments(text: str) -> str:
    """``text`` without ``<!-- … -->`` comments; an unclosed one runs to the end."""
    kept: list[str] = []
    start = 0
    while (opening := text.find("<!--", start)) != -1:
        kept.append(text[start:opening])
        closing = text.find("-->", opening + 4)
        if closing == -1:
            return "".join(kept)
        start = closing + 3
    kept.append(text[start:])
    return "".join(kept)


def table_rows(page: str) -> list[list[str]]:
    """The text of each table row's ``th`` and ``td`` cells, in time linear in the page.

    Malformed markup never raises: what is not a tag is text, as browsers read it.
    """
    rows: list[list[str]] = []
    cell: list[str] | None = None

    def finish_cell() -> None:
        nonlocal cell
        if cell is not None and rows:
            rows[-1].append(" ".join(html.unescape("".join(cell)).split()))
        cell = None

    text = _without_comments(page)
    position = 0
    for match in _TAG.finditer(text):
        if cell is not None:
            cell.append(text[position : match.start()])
        position = match.end()
        closing, tag = match.group(1), match.group(2).lower()
        if tag == "tr" and not closing:
            finish_cell()
            rows.append([])
        elif tag in ("td", "th") and not closing:
            finish_cell()
            cell = []
        elif tag in ("td", "th", "tr"):
            finish_cell()
    if cell is not None:
        cell.append(text[position:])
    finish_cell()
    return rows


def weblog_versions(page: bytes) -> tuple[str | None, str | None]:
    """Return the CASA and pipeline version texts of a weblog home page.

    The home page is ``t1-1.html``. Links are stripped from the texts.
    """
    values: dict[str, str] = {}
    for row in table_rows(page.decode("utf-8", errors="replace")):
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


def read_weblog(mous: Directory) -> Evidence | None:
    """Read the versions on the weblog home page ``html/t1-1.html``.

    The page is unpacked, or inside ``qa/*.weblog.tgz`` and read in memory.
    """
    pages = _pages(mous, "t1-1.html", ("qa", "."), depth=5)
    for page, data in _contents(mous, pages, LIMITS["weblog"]):
        evidence = _stated("weblog", _rel(mous, page), *weblog_versions(data), page.name)
        if evidence is not None:
            return evidence
    for archive in _candidates(mous, ("*weblog.tgz", "*weblog.tar.gz"), ("qa", ".")):
        for member_name, data in _tar_members(
            mous, archive, lambda n: n.endswith("html/t1-1.html"), LIMITS["weblog"]
        ):
            where = f"{_rel(mous, archive)}!{member_name}"
            evidence = _stated(
                "weblog", where, *weblog_versions(data), f"{archive.name}!{member_name}"
            )
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
    """Return the CASA version a manual calibration script's guard demands.

    A series such as ``4.2`` is allowed.
    """
    head = "\n".join(text.splitlines()[:_SCRIPT_HEAD_LINES])
    for pattern in _GUARD_PATTERNS:
        match = pattern.search(head)
        if match:
            return _casa(match.group(1).rstrip(".-"), name, partial=True)
    return None


def read_script(mous: Directory) -> Evidence | None:
    """Read the version guard at the top of manual ``*.scriptForCalibration.py`` files.

    There is one script per EB. When the scripts disagree, the version most of them demand wins.
    A tie goes to the newest.
    """
    versions: dict[str, PurePosixPath] = {}
    counts: Counter[str] = Counter()
    paths = _candidates(mous, ("*scriptForCalibration.py",), ("script", "."))
    for path, data in _contents(mous, paths, LIMITS["script"], truncate=True):
        version = script_version(data.decode("utf-8", errors="replace"), path.name)
        if version:
            counts[version] += 1
            versions.setdefault(version, path)
    if not counts:
        return None
    best = max(counts, key=lambda v: (counts[v], parse_casa(v, allow_partial=True)))
    return Evidence("script", _rel(mous, versions[best]), best, None)


_LOG_LINE = re.compile(
    rb"CASA Version:?\s+(?:CASA\s+)?"
    rb"([0-9]+\.[0-9]+\.[0-9]+(?:[-.][0-9]+)?(?:-REL)?(?:\s*\(r[0-9]+\))?)"
)


def log_version(data: bytes, name: str) -> str | None:
    match = _LOG_LINE.search(data)
    return _casa(match.group(1).decode("ascii"), name) if match else None


def read_casalog(mous: Directory) -> Evidence | None:
    """Read a ``CASA Version`` line in ``log/casa*.log``, or in a ``log/*.tgz``.

    For CASA ≤ 4 the logs are ``casapy-*.log``.
    """
    paths = _candidates(mous, ("casa*.log",), ("log",))
    for path, data in _contents(mous, paths, LIMITS["casalog"], truncate=True):
        version = log_version(data, path.name)
        if version:
            return Evidence("casalog", _rel(mous, path), version, None)
    for archive in _candidates(mous, ("*.tgz", "*.tar.gz"), ("log",)):
        for member_name, data in _tar_members(
            mous, archive, _is_casa_log, LIMITS["casalog"], True
        ):
            version = log_version(data, member_name)
            if version:
                return Evidence("casalog", f"{_rel(mous, archive)}!{member_name}", version, None)
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


# Utilities


def _pages(
    mous: Directory, filename: str, tops: tuple[str, ...], depth: int
) -> list[PurePosixPath]:
    """Regular files named ``filename`` in ``html`` directories under each of ``tops``.

    ``tops`` are below the MOUS, and the search goes ``depth`` levels down. The paths are relative
    to the MOUS, and sorted. Links are neither followed nor reported.
    """
    found: set[PurePosixPath] = set()
    for top in tops:
        with subdirectory(mous, PurePosixPath(top)) as start:
            if start is None:
                continue
            for directory, entries in walk(start, depth):
                if directory.name == "html" and (filename, "file") in entries:
                    found.add(directory.path.relative_to(mous.path) / filename)
    return sorted(found)


def _tar_members(
    mous: Directory,
    archive: PurePosixPath,
    wanted: Callable[[str], bool],
    limit: int,
    truncate: bool = False,
) -> Iterator[tuple[str, bytes]]:
    """Yield the contents of the wanted regular members of a tar archive.

    They are read in memory, never extracted. Only members with safe names are considered:
    relative, without ``..`` and printable. So no other name is ever reported.

    The archive's size, and how much it unpacks to while being scanned, are capped; see
    ``_TAR_EXPANDED``. Going over either makes it unreadable evidence.
    """
    try:
        with open_file(mous, archive) as raw:
            # Not a regular file, or no longer one: passed over.
            if raw is None:
                return
            size = os.fstat(raw.fileno()).st_size
            if size > _TAR_COMPRESSED:
                raise UnreadableEvidence(
                    f"{shown(archive.name)} is larger than {_TAR_COMPRESSED // GiB} GiB, "
                    "too large to read as evidence."
                )
            budget = min(_TAR_EXPANDED, max(_TAR_FLOOR, _TAR_RATIO * size))
            stream = cast(BinaryIO, _Budget(_decompressed(raw), budget, shown(archive.name)))
            with tarfile.open(fileobj=stream, mode="r|", bufsize=64 * 1024) as tar:
                for index, member in enumerate(tar):
                    if index > _MAX_TAR_MEMBERS:
                        return
                    if (
                        not member.isreg()
                        or not _safe_member(member.name)
                        or not wanted(member.name)
                    ):
                        continue
                    if member.size > limit and not truncate:
                        raise UnreadableEvidence(
                            f"{shown(f'{archive.name}!{member.name}')} "
                            "is too large to be evidence."
                        )
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read(limit)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError):
        raise UnreadableEvidence(f"{shown(archive.name)} is not a readable tar archive.") from None


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
    """Return the archive's tar stream, decompressed.

    gzip, bzip2 and xz are recognised by their magic bytes. Anything else is read as plain tar.
    """
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
                f"{self.name} unpacks to more than {self.budget // MiB} MiB, "
                "too much to read as evidence."
            )
        return data

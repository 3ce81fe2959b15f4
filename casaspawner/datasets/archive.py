"""Look up a dataset's pipeline manifest in the ALMA archive.

The dataset itself is not downloaded.

``ArchiveClient`` is the pluggable interface. ``AlmaDataLinkClient`` asks an ALMA archive mirror's
TAP service for the MOUS of a project code, and its DataLink service for the MOUS's files. It
downloads only the ``*.pipeline_manifest.xml``, size-limited and with timeouts. It caches the
manifest on disk, per mirror, since manifests never change. A reply that is not a readable
manifest is refused and never cached.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol, cast
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from casaspawner import runtime
from casaspawner.datasets.evidence import MANIFEST_VALUES, UnreadableEvidence, xml_values
from casaspawner.datasets.ids import ProjectCode, Uid, parse_uid
from casaspawner.errors import ArchiveUnavailable, ResolutionError, shown

MANIFEST_LIMIT = 32 * 1024 * 1024
LISTING_LIMIT = 16 * 1024 * 1024
_MANIFEST_NAME = re.compile(r"[A-Za-z0-9_.\-]*pipeline_manifest\.xml")


class ArchiveClient(Protocol):
    """Fetches the pipeline manifest of an ALMA dataset into a local file.

    Each manifest gets a directory of its own.
    """

    name: str

    def fetch_manifest(self, identifier: ProjectCode | Uid) -> Path: ...


class AlmaDataLinkClient:
    """ALMA archive client using the TAP and DataLink services.

    TAP maps a project code to its MOUS. DataLink maps a MOUS to its manifest file.
    """

    def __init__(
        self,
        base_url: str = "https://almascience.org",
        *,
        timeout: float = 10.0,
        cache_dir: Path | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.cache_dir = cache_dir or runtime.cache_dir() / "archive"
        self.name = urllib.parse.urlsplit(self.base_url).netloc or self.base_url
        #: This mirror's part of the cache.
        #: What one mirror sent is never reported as another's.
        self.mirror_cache = self.cache_dir / re.sub(r"[^A-Za-z0-9.\-]", "_", self.name)

    # Public
    def fetch_manifest(self, identifier: ProjectCode | Uid) -> Path:
        """Return the MOUS's pipeline manifest, from the cache or the archive.

        Every failure is one sentence that reads the same on the command line and on a spawn page.
        When the archive cannot help, the sentence ends with the directory to give instead, named
        after what was asked for.
        """
        deadline = time.monotonic() + self.timeout
        mous = identifier if isinstance(identifier, Uid) else None
        try:
            if mous is None:
                mous = self.mous_for(cast(ProjectCode, identifier), deadline)
            return self._fetch(mous, deadline)
        except ArchiveUnavailable as exc:
            raise ArchiveUnavailable(
                f"{str(exc).rstrip('.')}; {_give_directory(mous or identifier)}."
            ) from None

    def _fetch(self, mous: Uid, deadline: float) -> Path:
        cached = self._cached(mous)
        if cached is not None:
            return cached
        url = self._find_manifest_url(mous, deadline)
        if url is None:
            raise ResolutionError(
                f"The ALMA archive lists no pipeline manifest for {mous} "
                "(manually calibrated or Cycle 0-4 data); "
                f"{_give_directory(mous)}."
            )
        name = Path(urllib.parse.urlsplit(url).path).name
        if not _MANIFEST_NAME.fullmatch(name):
            name = f"member.{mous.sanitized}.pipeline_manifest.xml"
        data = self._get(url, MANIFEST_LIMIT, deadline)
        try:
            xml_values(data, name, MANIFEST_VALUES)
        except UnreadableEvidence as exc:
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} sent a pipeline manifest for {mous} "
                f"that cannot be read ({str(exc).rstrip('.')})"
            ) from None
        directory = self.mirror_cache / mous.sanitized
        try:
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / (name + ".part")
            partial.write_bytes(data)
            partial.replace(directory / name)
        except OSError as exc:
            raise ArchiveUnavailable(
                f"The manifest of {mous} could not be stored "
                f"in the archive cache {shown(str(self.cache_dir))} "
                f"({exc.strerror or exc})"
            ) from None
        return directory / name

    def mous_for(self, code: ProjectCode, deadline: float | None = None) -> Uid:
        """Return the single MOUS of a project code.

        A project with several raises a ResolutionError listing some of them. ``deadline`` is a
        ``time.monotonic()`` by which the answer must have come; default: ``timeout`` from now.
        """
        deadline = deadline or time.monotonic() + self.timeout
        # str(code) is built from the strict project-code pattern: digits, dots and capitals only.
        query = (
            "SELECT DISTINCT member_ous_uid FROM ivoa.obscore "  # noqa: S608
            f"WHERE proposal_id = '{code}'"
        )
        params = urllib.parse.urlencode(
            {"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "votable", "QUERY": query}
        )
        rows = _votable_rows(self._xml(f"{self.base_url}/tap/sync?{params}", deadline))
        uids = sorted({row.get("member_ous_uid", "") for row in rows} - {""})
        if not uids:
            raise ResolutionError(f"The ALMA archive has no data for project {code}.")
        if len(uids) > 1:
            listed = ", ".join(uids[:5]) + (f" and {len(uids) - 5} more" if len(uids) > 5 else "")
            raise ResolutionError(
                f"Project {code} has {len(uids)} datasets (MOUS {listed}); give one uid instead."
            )
        return parse_uid(uids[0])

    # Internals
    def _cached(self, mous: Uid) -> Path | None:
        try:
            found = sorted(
                p
                for p in (self.mirror_cache / mous.sanitized).iterdir()
                if _MANIFEST_NAME.fullmatch(p.name)
            )
        except OSError:
            # Not cached yet, or the cache cannot be read: fetch again.
            return None
        return found[0] if found else None

    def _find_manifest_url(
        self, mous: Uid, deadline: float, depth: int = 0, url: str | None = None
    ) -> str | None:
        url = url or f"{self.base_url}/datalink/sync?{urllib.parse.urlencode({'ID': str(mous)})}"
        tree = self._xml(url, deadline)
        rows = _votable_rows(tree)
        manifests = sorted(
            (
                row["access_url"]
                for row in rows
                if row.get("access_url", "").endswith("pipeline_manifest.xml")
            ),
            key=lambda u: (0 if "cal" in u.rsplit("/", 1)[-1] else 1, u),
        )
        if manifests:
            return manifests[0]
        if depth >= 2:
            return None
        services = _service_urls(tree)
        for row in rows:
            service = services.get(row.get("service_def", ""))
            if service and row.get("ID") and row.get("semantics") in ("#auxiliary", "#this", ""):
                found = self._find_manifest_url(
                    mous,
                    deadline,
                    depth + 1,
                    f"{service}?{urllib.parse.urlencode({'ID': row['ID']})}",
                )
                if found:
                    return found
        return None

    def _xml(self, url: str, deadline: float) -> Element:
        data = self._get(url, LISTING_LIMIT, deadline)
        try:
            tree: Element = SafeET.fromstring(
                data, forbid_dtd=True, forbid_entities=True, forbid_external=True
            )
        except (DefusedXmlException, ParseError):
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} sent a reply that is not a VOTable"
            ) from None
        return tree

    def _get(self, url: str, limit: int, deadline: float) -> bytes:
        """GET ``url`` within ``limit`` bytes, all of it before ``deadline``.

        The deadline bounds the whole exchange: a server sending a byte every few seconds is cut
        off at it, however many reads that takes.
        """
        if not url.startswith(("https://", "http://")):
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} pointed to a non-HTTP location"
            )
        late = ArchiveUnavailable(
            f"The ALMA archive at {self.name} did not answer within "
            f"{self.timeout:g} second{'' if self.timeout == 1 else 's'}"
        )
        request = urllib.request.Request(url, headers={"User-Agent": "casaspawner"})  # noqa: S310
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise late
            response = urllib.request.urlopen(request, timeout=remaining)  # noqa: S310
            with response:
                data = _read_before(response, limit + 1, deadline)
        except urllib.error.HTTPError as exc:
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} answered {exc.code} {exc.reason}"
            ) from None
        except _Late:
            raise late from None
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise late from None
            # ValueError means a malformed URL.
            reason = getattr(exc, "reason", exc)
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} could not be reached ({reason})"
            ) from None
        if len(data) > limit:
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} sent more than {limit // 2**20} MiB, "
                "so the reply was refused"
            )
        return data


class _Late(Exception):
    """The deadline passed while a reply was read."""


def _read_before(response: Any, limit: int, deadline: float) -> bytes:
    """Up to ``limit`` bytes of ``response``, read before ``deadline``.

    Each read waits at most until the deadline: the socket's timeout is set to what is left.
    """
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Late
        if sock is not None:
            sock.settimeout(remaining)
        try:
            chunk = response.read1(min(1 << 16, limit - size))
        except TimeoutError:
            raise _Late from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _give_directory(asked: ProjectCode | Uid) -> str:
    """The end of every archive error: the directory to give instead.

    The directory is named after what was asked for.
    """
    directory = f"member.{asked.sanitized}" if isinstance(asked, Uid) else str(asked)
    return f"download the dataset and give its directory ({directory}) instead"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _votable_rows(tree: Element) -> list[dict[str, str]]:
    """Rows of the first TABLE of a VOTable, keyed by FIELD name.

    XML namespaces are ignored.
    """
    for table in tree.iter():
        if _local(table.tag) != "TABLE":
            continue
        names = [f.get("name") or f.get("ID") or "" for f in table if _local(f.tag) == "FIELD"]
        rows = []
        for tr in table.iter():
            if _local(tr.tag) == "TR":
                cells = [(td.text or "").strip() for td in tr if _local(td.tag) == "TD"]
                rows.append(dict(zip(names, cells, strict=False)))
        return rows
    return []


def _service_urls(tree: Element) -> dict[str, str]:
    """Map DataLink service descriptors' RESOURCE IDs to their ``accessURL`` PARAM."""
    services = {}
    for resource in tree.iter():
        if (
            _local(resource.tag) == "RESOURCE"
            and resource.get("type") == "meta"
            and resource.get("ID")
        ):
            for param in resource.iter():
                if (
                    _local(param.tag) == "PARAM"
                    and param.get("name") == "accessURL"
                    and param.get("value")
                ):
                    services[resource.get("ID", "")] = param.get("value", "")
    return services

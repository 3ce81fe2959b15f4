"""Look up a dataset's pipeline manifest in the ALMA archive.

The dataset itself is not downloaded.

``ArchiveClient`` is the pluggable interface. ``AlmaDataLinkClient`` asks an ALMA archive mirror's
TAP service for the MOUS of a project code, and its DataLink service for the MOUS's files,
following DataLink service descriptors into the packages (the auxiliary one first). pyvo speaks
both protocols and parses their VOTables; the transport under it is a
:class:`~casaspawner.datasets.transfer.BoundedSession`, so one deadline bounds the whole lookup
and every reply is size-limited while it is read. Only the ``*.pipeline_manifest.xml`` is
downloaded. It is cached on disk, per mirror, since manifests never change; a reply that is not
a readable manifest is refused and never cached.

pyvo comes with the ``clients`` extra and is imported only when the archive is asked; without it,
a cached manifest is still found, and anything else is one sentence.
"""

from __future__ import annotations

import contextlib
import http
import os
import re
import sys
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast
from xml.etree.ElementTree import ParseError, TreeBuilder, XMLPullParser

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from casaspawner import runtime
from casaspawner.datasets.evidence import MANIFEST_VALUES, UnreadableEvidence, xml_values
from casaspawner.datasets.ids import ProjectCode, Uid, parse_uid
from casaspawner.errors import (
    ArchiveUnavailable,
    CasaspawnerError,
    ResolutionError,
    printable,
    shown,
)

if TYPE_CHECKING:
    from casaspawner.datasets.transfer import BoundedSession, TransferError

MANIFEST_LIMIT = 32 * 1024 * 1024
LISTING_LIMIT = 16 * 1024 * 1024
#: The most MOUS a project-code query asks for (``MAXREC``): one is needed, two are too many.
MAX_MOUS = 100
#: The most DataLink documents one lookup reads, the MOUS's own included.
MAX_LISTINGS = 8
_MANIFEST_NAME = re.compile(r"[A-Za-z0-9_.\-]*pipeline_manifest\.xml")
#: DataLink rows whose service descriptors are followed, in this order: ALMA puts the pipeline
#: manifest in the auxiliary package.
_FOLLOWED = ("#auxiliary", "#this", "")
_DATALINK_STANDARD = "ivo://ivoa.net/std/datalink#links"
_T = TypeVar("_T")


class ArchiveClient(Protocol):
    """Fetches the pipeline manifest of an ALMA dataset into a local file.

    Each manifest gets a directory of its own.
    """

    name: str

    def fetch_manifest(self, identifier: ProjectCode | Uid) -> Path: ...


class AlmaDataLinkClient:
    """ALMA archive client using the TAP and DataLink services, through pyvo.

    TAP maps a project code to its MOUS. DataLink maps a MOUS to its manifest file. ``timeout``
    bounds a whole lookup, however many requests it takes.
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
            cached = self._cached(mous) if mous is not None else None
            if cached is not None:
                return cached
            with self._session(deadline) as session:
                if mous is None:
                    mous = self._mous_for(session, cast(ProjectCode, identifier))
                    cached = self._cached(mous)
                    if cached is not None:
                        return cached
                return self._fetch(session, mous)
        except ArchiveUnavailable as exc:
            raise ArchiveUnavailable(
                f"{str(exc).rstrip('.')}; {_give_directory(mous or identifier)}."
            ) from None

    def mous_for(self, code: ProjectCode, deadline: float | None = None) -> Uid:
        """Return the single MOUS of a project code.

        A project with several raises a ResolutionError listing some of them. ``deadline`` is a
        ``time.monotonic()`` by which the answer must have come; default: ``timeout`` from now.
        """
        with self._session(deadline or time.monotonic() + self.timeout) as session:
            return self._mous_for(session, code)

    # The lookup
    def _mous_for(self, session: BoundedSession, code: ProjectCode) -> Uid:
        from pyvo.dal import TAPService

        # str(code) is built from the strict project-code pattern: digits, dots and capitals only.
        query = (
            "SELECT DISTINCT member_ous_uid FROM ivoa.obscore "  # noqa: S608
            f"WHERE proposal_id = '{code}'"
        )
        service = TAPService(f"{self.base_url}/tap", session=session)
        results = self._votable(session, lambda: service.run_sync(query, maxrec=MAX_MOUS))
        if "member_ous_uid" not in results.fieldnames:
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} answered the query for project {code} "
                "without a member_ous_uid column"
            )
        uids = sorted({_text(record, "member_ous_uid") for record in results} - {""})
        overflow = _overflowed(results)
        if not uids:
            raise ResolutionError(f"The ALMA archive has no data for project {code}.")
        if len(uids) > 1 or overflow:
            listed = ", ".join(uids[:5]) + (f" and {len(uids) - 5} more" if len(uids) > 5 else "")
            count = f"more than {len(uids)}" if overflow else str(len(uids))
            raise ResolutionError(
                f"Project {code} has {count} datasets (MOUS {listed}); give one uid instead."
            )
        try:
            return parse_uid(uids[0])
        except CasaspawnerError:
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} named the dataset of project {code} "
                f"{_quoted(uids[0])!r}, which is not an ALMA uid"
            ) from None

    def _fetch(self, session: BoundedSession, mous: Uid) -> Path:
        from casaspawner.datasets.transfer import TransferError

        url = self._find_manifest_url(session, mous)
        if url is None:
            raise ResolutionError(
                f"The ALMA archive lists no pipeline manifest for {mous} "
                "(manually calibrated or Cycle 0-4 data); "
                f"{_give_directory(mous)}."
            )
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} pointed to a non-HTTP location"
            )
        name = Path(urllib.parse.urlsplit(url).path).name
        if not _MANIFEST_NAME.fullmatch(name):
            name = f"member.{mous.sanitized}.pipeline_manifest.xml"
        session.limit = MANIFEST_LIMIT
        try:
            response = session.get(url)
        except TransferError as exc:
            raise self._failed(exc) from None
        if response.status_code != 200:
            raise self._answered(response.status_code)
        data = response.content
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

    def _find_manifest_url(self, session: BoundedSession, mous: Uid) -> str | None:
        """The URL of the MOUS's pipeline manifest, calibration recipe first; None if unlisted.

        The MOUS's own DataLink document is read first; then, breadth first and at most two
        levels down, the DataLink documents its service descriptors point to. Rows with an
        ``error_message`` are passed over.
        """
        from pyvo.dal.adhoc import DatalinkService

        service = DatalinkService(f"{self.base_url}/datalink/sync", session=session)
        top = self._votable(session, lambda: service.run_sync(str(mous)))
        rows = list(top)
        if rows and all(_text(row, "error_message") for row in rows):
            fault = _quoted(_text(rows[0], "error_message"))
            if fault.startswith("NotFoundFault"):
                raise ResolutionError(
                    f"The ALMA archive does not know {mous} ({fault}); {_give_directory(mous)}."
                )
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} could not list the files of {mous} ({fault})"
            )
        # Descriptors to follow, breadth first, each read only when its turn comes.
        queue: list[tuple[Any, Any, int]] = []
        results, depth, read = top, 0, 1
        overflow, faults = False, []
        while True:
            overflow = overflow or _overflowed(results)
            manifests = []
            for row in results:
                fault, url = _text(row, "error_message"), _text(row, "access_url")
                if fault:
                    faults.append(fault)
                elif _MANIFEST_NAME.fullmatch(url.rsplit("/", 1)[-1]):
                    manifests.append(url)
            if manifests:
                return min(manifests, key=lambda u: ("cal" not in u.rsplit("/", 1)[-1], u))
            if depth < 2:
                followed = sorted(
                    (row for row in results if _text(row, "semantics") in _FOLLOWED),
                    key=lambda row: _FOLLOWED.index(_text(row, "semantics")),
                )
                for row in followed:
                    descriptor = _datalink_descriptor(results, _text(row, "service_def"))
                    if descriptor is not None:
                        queue.append((row, descriptor, depth + 1))
            if not queue or read >= MAX_LISTINGS:
                break
            row, descriptor, depth = queue.pop(0)
            results = self._follow(session, row, descriptor)
            read += 1
        if faults:
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} could not list every file of {mous} "
                f"({_quoted(faults[0])}), and none it listed is a pipeline manifest"
            )
        if overflow:
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} listed only part of the files of {mous} "
                "(its reply overflowed), and none of them is a pipeline manifest"
            )
        return None

    def _follow(self, session: BoundedSession, row: Any, descriptor: Any) -> Any:
        """The DataLink document a row's service descriptor points to."""
        from pyvo.dal.adhoc import DatalinkQuery

        return self._votable(
            session,
            lambda: DatalinkQuery.from_resource(row, descriptor, session=session).execute(),
        )

    # Internals
    @contextlib.contextmanager
    def _session(self, deadline: float) -> Iterator[BoundedSession]:
        """A session for one lookup, ending by ``deadline``; pyvo must be there."""
        if "numpy" not in sys.modules:
            # pyvo brings numpy, whose OpenBLAS reserves about 40 MiB of address space per core
            # at import: on a large hub that alone would exceed the resolver worker's limit.
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        try:
            import pyvo  # noqa: F401

            from casaspawner.datasets.transfer import BoundedSession
        except ImportError:
            raise ArchiveUnavailable(
                "Looking up ALMA identifiers needs the pyvo package, which this installation "
                "lacks (the casaspawner[clients] extra)"
            ) from None
        session = BoundedSession(deadline, LISTING_LIMIT)
        try:
            yield session
        finally:
            session.close()

    def _votable(self, session: BoundedSession, query: Callable[[], _T]) -> _T:
        """Run a pyvo query, and word whatever goes wrong as one sentence.

        Replies are screened for a DTD first, which VOTables never have: no entity of a reply is
        expanded. pyvo wraps what the session raises, so the session's own record of a failure
        decides the sentence.
        """
        from pyvo.dal import DALQueryError, DALServiceError

        session.failure = None
        session.limit = LISTING_LIMIT
        session.screen = _refuse_dtd
        try:
            with warnings.catch_warnings():
                # pyvo and astropy warn about replies on stderr; what matters is checked here.
                warnings.simplefilter("ignore")
                return query()
        # pyvo and astropy raise many kinds for a reply they cannot read.
        except Exception as exc:
            if session.failure is not None:
                raise self._failed(session.failure) from None
            if isinstance(exc, DALQueryError):
                raise ArchiveUnavailable(
                    f"The ALMA archive at {self.name} refused the query "
                    f"({_quoted(str(exc.reason))})"
                ) from None
            if isinstance(exc, DALServiceError) and exc.code:
                raise self._answered(int(exc.code)) from None
            raise ArchiveUnavailable(
                f"The ALMA archive at {self.name} sent a reply that is not a VOTable"
            ) from None
        finally:
            session.screen = None

    def _failed(self, failure: TransferError) -> ArchiveUnavailable:
        from casaspawner.datasets.transfer import Late, Malformed, TooLarge

        if isinstance(failure, Late):
            return ArchiveUnavailable(
                f"The ALMA archive at {self.name} did not answer within "
                f"{self.timeout:g} second{'' if self.timeout == 1 else 's'}"
            )
        if isinstance(failure, TooLarge):
            return ArchiveUnavailable(
                f"The ALMA archive at {self.name} sent more than {failure.limit // 2**20} MiB, "
                "so the reply was refused"
            )
        if isinstance(failure, Malformed) and failure.status >= 400:
            return self._answered(failure.status)
        if isinstance(failure, Malformed):
            return ArchiveUnavailable(
                f"The ALMA archive at {self.name} sent a reply that is not a VOTable"
            )
        return ArchiveUnavailable(
            f"The ALMA archive at {self.name} could not be reached ({failure})"
        )

    def _answered(self, code: int) -> ArchiveUnavailable:
        try:
            phrase = http.HTTPStatus(code).phrase
        except ValueError:
            phrase = "an unknown status"
        return ArchiveUnavailable(f"The ALMA archive at {self.name} answered {code} {phrase}")

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


def _give_directory(asked: ProjectCode | Uid) -> str:
    """The end of every archive error: the directory to give instead.

    The directory is named after what was asked for.
    """
    directory = f"member.{asked.sanitized}" if isinstance(asked, Uid) else str(asked)
    return f"download the dataset and give its directory ({directory}) instead"


def _refuse_dtd(data: bytes) -> None:
    """Raise ``ValueError`` unless ``data`` reaches its root element without a DTD.

    A DTD can only come before the root element, and entities only from a DTD, so this is
    enough to keep every entity of a reply unexpanded, whoever parses it next.
    """
    parser = XMLPullParser(
        ("start",),
        _parser=DefusedXMLParser(
            target=TreeBuilder(), forbid_dtd=True, forbid_entities=True, forbid_external=True
        ),
    )
    try:
        for start in range(0, len(data), 1 << 16):
            parser.feed(data[start : start + (1 << 16)])
            for _ in parser.read_events():
                return
    except (DefusedXmlException, ParseError):
        pass
    raise ValueError("not an XML document without a DTD")


def _text(record: Any, key: str) -> str:
    """A VOTable cell as text; empty when absent or null."""
    value = record.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value.strip() if isinstance(value, str) else ""


def _quoted(text: str) -> str:
    """What a server said, as one line of at most 100 characters."""
    line = printable(" ".join(text.split())).rstrip(" .;")
    return line if len(line) <= 100 else line[:99] + "…"


def _overflowed(results: Any) -> bool:
    """Whether a DALI reply says it was cut short (``QUERY_STATUS`` ``OVERFLOW``)."""
    status = results.status[0] if results.status else ""
    return str(status).strip().upper() == "OVERFLOW"


def _datalink_descriptor(results: Any, service_def: str) -> Any:
    """The DataLink service descriptor named ``service_def`` in a reply, if any."""
    if not service_def:
        return None
    for resource in results.iter_adhocservices():
        if service_def != resource.ID:
            continue
        standard = next((p.value for p in resource.params if p.name == "standardID"), "")
        if isinstance(standard, bytes):
            standard = standard.decode("ascii", errors="replace")
        if str(standard).lower().startswith(_DATALINK_STANDARD):
            return resource
    return None

"""A stand-in ALMA archive on 127.0.0.1 answering real TAP and DataLink documents.

Where the shapes come from (read, not copied):

- IVOA TAP 1.1 (REC-TAP-1.1) with DALI 1.1: a synchronous query is ``POST {tap}/sync`` (or GET)
  with ``REQUEST=doQuery``, ``LANG=ADQL``, ``QUERY`` and ``MAXREC``; the answer is a VOTable whose
  ``RESOURCE type="results"`` carries ``INFO name="QUERY_STATUS"``: ``OK`` before the table,
  ``OVERFLOW`` after a table cut at MAXREC, ``ERROR`` (with the message as its content) and no
  table for a query that failed, with an HTTP error status.
- IVOA DataLink 1.1 (REC-DataLink-1.1): ``GET {links}?ID=…`` answers a VOTable with the columns
  ``ID``, ``access_url``, ``service_def``, ``error_message``, ``semantics``, ``description``,
  ``content_type``, ``content_length``; a row that could not be made carries an
  ``error_message`` starting with a fault name (``NotFoundFault: …``) and no link; a service
  descriptor is a ``RESOURCE type="meta" utype="adhoc:service"`` with the PARAMs
  ``standardID`` and ``accessURL`` and a ``GROUP name="inputParams"``.
- VOTable 1.4 (REC-VOTable-1.4): the ``http://www.ivoa.net/xml/VOTable/v1.3`` namespace,
  ``version="1.4"``, ``TABLEDATA``.
- The ALMA archive's own replies, as astroquery records them in its tests
  (``astroquery/alma/tests/data/alma-datalink.xml``, ``alma-datalink-recurse-aux.xml``,
  ``sgra_query.xml``): a MOUS's links are its packages (``#this`` products,
  ``#auxiliary``, ``#progenitor`` raw data, ``#documentation`` README), each package with a
  ``DataLink.<package>`` service descriptor (standardID ``ivo://ivoa.net/std/DataLink#links-1.0``,
  accessURL ``…/datalink/sync?ID=<package>``, an empty ``inputParams`` group); the auxiliary
  package lists the scripts, QA reports, logs and pipeline manifests one by one, as files under
  ``…/dataPortal/``.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from xml.sax.saxutils import escape, quoteattr

from support.servers import serving

VOTABLE = "http://www.ivoa.net/xml/VOTable/v1.3"
DATALINK = "ivo://ivoa.net/std/DataLink#links-1.0"
#: The execution block every stand-in MOUS has as raw data (``#progenitor``).
ASDM = "uid___A002_Xd28a9e_X71b8"
LINK_FIELDS = (
    ("ID", 'datatype="char" arraysize="*" ucd="meta.id;meta.main"'),
    ("access_url", 'datatype="char" arraysize="*" ucd="meta.ref.url"'),
    ("service_def", 'datatype="char" arraysize="*" ucd="meta.ref"'),
    ("error_message", 'datatype="char" arraysize="*" ucd="meta.code.error"'),
    ("semantics", 'datatype="char" arraysize="*" ucd="meta.code"'),
    ("description", 'datatype="char" arraysize="*" ucd="meta.note"'),
    ("content_type", 'datatype="char" arraysize="*" ucd="meta.code.mime"'),
    ("content_length", 'datatype="long" ucd="phys.size;meta.file" unit="byte"'),
    ("readable", 'datatype="boolean"'),
)


def _table(fields: tuple[tuple[str, str], ...], rows: list[list[str]]) -> str:
    head = "".join(f"<FIELD name={quoteattr(name)} {attrs}/>" for name, attrs in fields)
    body = "".join(
        "<TR>" + "".join(f"<TD>{escape(cell)}</TD>" if cell else "<TD/>" for cell in row) + "</TR>"
        for row in rows
    )
    return f"<TABLE>{head}<DATA><TABLEDATA>{body}</TABLEDATA></DATA></TABLE>"


def votable(resources: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<VOTABLE xmlns="{VOTABLE}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'version="1.4">{resources}</VOTABLE>'
    ).encode()


def tap_reply(uids: list[str], query: str, maxrec: int | None) -> bytes:
    """A sync TAP answer with the MOUS column, cut at ``maxrec``.

    A cut table is followed by QUERY_STATUS OVERFLOW.
    """
    shown = uids if maxrec is None else uids[:maxrec]
    overflow = maxrec is not None and len(uids) > maxrec
    fields = (
        (
            "member_ous_uid",
            'datatype="char" arraysize="*" ucd="meta.id;obs" xtype="adql:VARCHAR"',
        ),
    )
    return votable(
        '<RESOURCE type="results"><INFO name="QUERY_STATUS" value="OK"/>'
        f'<INFO name="QUERY" value={quoteattr(query)}/>'
        + _table(fields, [[uid] for uid in shown])
        + ('<INFO name="QUERY_STATUS" value="OVERFLOW"/>' if overflow else "")
        + "</RESOURCE>"
    )


def tap_error(message: str) -> bytes:
    """A TAP error document: QUERY_STATUS ERROR, the message as its content, no table."""
    return votable(
        '<RESOURCE type="results">'
        f'<INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO></RESOURCE>'
    )


@dataclass(frozen=True)
class Link:
    """One DataLink row: a file, a package with a descriptor, or an error."""

    semantics: str
    url: str = ""
    service: str = ""
    error: str = ""
    content_type: str = "application/octet-stream"
    length: str = ""
    description: str = ""


def links_reply(
    identifier: str, links: list[Link], services: dict[str, str], *, overflow: bool = False
) -> bytes:
    """A DataLink ``{links}`` answer, with the service descriptors the rows name."""
    rows = [
        [
            identifier,
            link.url,
            link.service,
            link.error,
            link.semantics,
            link.description,
            "" if link.error else link.content_type,
            link.length,
            "" if link.error or link.service else "true",
        ]
        for link in links
    ]
    descriptors = "".join(
        f'<RESOURCE type="meta" ID={quoteattr(service_id)} utype="adhoc:service">'
        f'<PARAM name="standardID" datatype="char" arraysize="*" value="{DATALINK}"/>'
        f'<PARAM name="accessURL" datatype="char" arraysize="*" value={quoteattr(url)}/>'
        '<GROUP name="inputParams"/></RESOURCE>'
        for service_id, url in services.items()
        if any(link.service == service_id for link in links)
    )
    status = '<INFO name="QUERY_STATUS" value="OVERFLOW"/>' if overflow else ""
    return votable(
        f'<RESOURCE type="results">{_table(LINK_FIELDS, rows)}{status}</RESOURCE>{descriptors}'
    )


@dataclass
class Mous:
    """A MOUS as the archive holds it: project and auxiliary files."""

    uid: str
    project: str
    auxiliary: dict[str, bytes] = field(default_factory=dict)

    @property
    def sanitized(self) -> str:
        return self.uid.replace("://", "___").replace("/", "_")


@dataclass
class AlmaArchive:
    """The archive's state: its MOUS, what it was asked, and how it misbehaves.

    ``replies`` override whole answers by path (``/datalink/sync?ID=…``, ``/tap/sync``,
    ``/dataPortal/…``) with ``(status, content type, body)``; ``delay`` holds every answer back,
    ``trickle`` sends every answer a byte at a time, that many seconds apart.
    """

    base: str = ""
    mous: list[Mous] = field(default_factory=list)
    replies: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    delay: float = 0.0
    trickle: float = 0.0
    datalink_maxrec: int | None = None

    def add(self, uid: str, project: str, auxiliary: dict[str, bytes]) -> Mous:
        entry = Mous(uid, project, auxiliary)
        self.mous.append(entry)
        return entry

    def paths(self, method: str = "GET") -> list[str]:
        return [path for verb, path, _ in self.requests if verb == method]

    def answer(self, method: str, path: str, form: dict[str, list[str]]) -> tuple[int, str, bytes]:
        self.requests.append((method, path, form))
        parsed = urllib.parse.urlsplit(path)
        query = {**urllib.parse.parse_qs(parsed.query), **form}
        key = parsed.path + (f"?ID={query['ID'][0]}" if "ID" in query else "")
        if key in self.replies:
            return self.replies[key]
        if parsed.path == "/tap/sync":
            return self._tap(query)
        if parsed.path == "/datalink/sync" and "ID" in query:
            return self._links(query["ID"][0])
        name = parsed.path.removeprefix("/dataPortal/")
        for entry in self.mous:
            if name in entry.auxiliary:
                return 200, "application/xml", entry.auxiliary[name]
        return 404, "text/plain", b"NotFound"

    def _tap(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        adql = query.get("QUERY", [""])[0]
        if query.get("REQUEST") != ["doQuery"] or query.get("LANG") != ["ADQL"]:
            return 400, "application/x-votable+xml", tap_error("UsageFault: REQUEST, LANG")
        code = re.search(r"proposal_id = '([^']*)'", adql)
        if code is None:
            return 400, "application/x-votable+xml", tap_error("IllegalArgumentException: ADQL")
        maxrec = int(query["MAXREC"][0]) if "MAXREC" in query else None
        uids = sorted({m.uid for m in self.mous if m.project == code.group(1)})
        return 200, "application/x-votable+xml", tap_reply(uids, adql, maxrec)

    def _links(self, identifier: str) -> tuple[int, str, bytes]:
        kind = "application/x-votable+xml;content=datalink"
        services: dict[str, str] = {}
        for entry in self.mous:
            tar = f"{entry.project}_{entry.sanitized}"
            if identifier == entry.uid:
                for package in (f"{tar}_001_of_001.tar", f"{tar}_auxiliary.tar"):
                    services[f"DataLink.{package}"] = f"{self.base}/datalink/sync?ID={package}"
                links = [
                    Link(
                        "#documentation",
                        f"{self.base}/dataPortal/member.{entry.sanitized}.README.txt",
                        content_type="text/plain",
                        length="3523",
                    ),
                    Link("#this", f"{self.base}/dataPortal/{tar}_001_of_001.tar", length="5562"),
                    Link("#this", service=f"DataLink.{tar}_001_of_001.tar", content_type=kind),
                    Link(
                        "#auxiliary", f"{self.base}/dataPortal/{tar}_auxiliary.tar", length="1354"
                    ),
                    Link("#auxiliary", service=f"DataLink.{tar}_auxiliary.tar", content_type=kind),
                    Link(
                        "#progenitor",
                        f"{self.base}/dataPortal/{entry.project}_{ASDM}.asdm.sdm.tar",
                        length="2343569408",
                    ),
                ]
                return 200, kind, links_reply(identifier, links, services)
            if identifier == f"{tar}_auxiliary.tar":
                links = [
                    Link(
                        "#auxiliary",
                        f"{self.base}/dataPortal/{name}",
                        length=str(len(data)),
                        description="Download dataset of type: script, and class: AUX.",
                    )
                    for name, data in entry.auxiliary.items()
                ]
                cut = self.datalink_maxrec
                overflow = cut is not None and len(links) > cut
                return 200, kind, links_reply(identifier, links[:cut], {}, overflow=overflow)
            if identifier == f"{tar}_001_of_001.tar":
                product = f"member.{entry.sanitized}.spw0.cube.I.pbcor.fits"
                links = [Link("#this", f"{self.base}/dataPortal/{product}", length="405008640")]
                return 200, kind, links_reply(identifier, links, {})
        fault = Link("#this", error=f"NotFoundFault: {identifier} not found")
        return 200, kind, links_reply(identifier, [fault], {})


class _Handler(BaseHTTPRequestHandler):
    archive: AlmaArchive

    def do_GET(self) -> None:
        self._reply(self.archive.answer("GET", self.path, {}))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        self._reply(self.archive.answer("POST", self.path, form))

    def _reply(self, answer: tuple[int, str, bytes]) -> None:
        status, content_type, body = answer
        time.sleep(self.archive.delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not self.archive.trickle:
                self.wfile.write(body)
                return
            for index in range(len(body)):
                self.wfile.write(body[index : index + 1])
                self.wfile.flush()
                time.sleep(self.archive.trickle)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up: it had its deadline.
            return

    def log_message(self, *args: object) -> None:
        return


def serve_archive(host: str = "127.0.0.1") -> Iterator[AlmaArchive]:
    """Serve a fresh :class:`AlmaArchive` on ``host``; for a fixture to yield from."""
    archive = AlmaArchive()
    handler = type("Handler", (_Handler,), {"archive": archive})
    with serving(handler, host) as archive.base:
        yield archive

"""The ALMA DataLink/TAP client against a real HTTP server on 127.0.0.1 serving archive-shaped
replies."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from casaspawner.catalog import Catalog
from casaspawner.datasets.archive import AlmaDataLinkClient
from casaspawner.datasets.ids import ProjectCode, Uid, parse_identifier
from casaspawner.datasets.resolve import resolve_target
from casaspawner.datasets.synth import ERAS, manifest_xml
from casaspawner.errors import ArchiveUnavailable, ResolutionError

NS = "http://www.ivoa.net/xml/VOTable/v1.3"


def votable(fields: list[str], rows: list[list[str]], extra: str = "") -> bytes:
    head = "".join(f'<FIELD name="{f}" datatype="char" arraysize="*"/>' for f in fields)
    body = "".join("<TR>" + "".join(f"<TD>{c}</TD>" for c in row) + "</TR>" for row in rows)
    return (
        f'<?xml version="1.0"?><VOTABLE xmlns="{NS}" version="1.3"><RESOURCE '
        f'type="results"><TABLE>{head}'
        f"<DATA><TABLEDATA>{body}</TABLEDATA></DATA></TABLE></RESOURCE>{extra}</VOTABLE>"
    ).encode()


class Archive(BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {}
    delay = 0.0
    hits: list[str] = []

    def do_GET(self) -> None:
        Archive.hits.append(self.path)
        time.sleep(Archive.delay)
        parsed = urllib.parse.urlsplit(self.path)
        key = parsed.path + (
            "?" + urllib.parse.unquote(parsed.query) if "ID=" in parsed.query else ""
        )
        if "QUERY=" in parsed.query:
            key = parsed.path + "?" + urllib.parse.parse_qs(parsed.query)["QUERY"][0].split("'")[1]
        body = Archive.routes.get(key)
        try:
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"not found")
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (timeout test).
            return

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def archive() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Archive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Archive.routes, Archive.delay, Archive.hits = {}, 0.0, []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fields() -> list[str]:
    return ["ID", "access_url", "service_def", "semantics", "content_type", "content_length"]


def test_uid_manifest_is_fetched_cached_and_resolved(
    archive: str, tmp_path: Path, catalog: Catalog
) -> None:
    spec = ERAS["cycle10"]
    uid = "uid://A001/X3621/X3d68"
    manifest_url = f"{archive}/dataPortal/member.{spec.mous}.hifa_calimage.pipeline_manifest.xml"
    Archive.routes = {
        f"/datalink/sync?ID={uid}": votable(
            fields(),
            [
                [
                    uid,
                    f"{archive}/dataPortal/{spec.project}_{spec.mous}_001_of_001.tar",
                    "",
                    "#this",
                    "",
                    "1",
                ],
                [uid, manifest_url, "", "#auxiliary", "text/xml", "100"],
            ],
        ),
        urllib.parse.urlsplit(manifest_url).path: manifest_xml(spec).encode(),
    }
    client = AlmaDataLinkClient(archive, timeout=5, cache_dir=tmp_path)
    resolution = resolve_target(uid, catalog, archive=client)
    assert (resolution.release.id, resolution.exact, resolution.dataset) == (
        "pl-2023.1.0.124",
        True,
        uid,
    )
    assert resolution.evidence.kind == "archive-manifest"
    assert resolution.evidence.path.endswith("pipeline_manifest.xml")
    hits = len(Archive.hits)
    again = resolve_target("uid___A001_X3621_X3d68", catalog, archive=client)
    assert again.release.id == "pl-2023.1.0.124"
    assert len(Archive.hits) == hits, "the cached manifest was fetched again"

    class Cleared(AlmaDataLinkClient):
        """The cache is cleared by someone else between the fetch and the read."""

        def fetch_manifest(self, identifier: ProjectCode | Uid) -> Path:
            manifest = super().fetch_manifest(identifier)
            shutil.rmtree(manifest.parent)
            return manifest

    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target(uid, catalog, archive=Cleared(archive, timeout=5, cache_dir=tmp_path))
    assert str(info.value).endswith(
        "(No such file or directory); download the dataset and give its directory instead."
    )


def test_recursive_datalink_and_project_codes(
    archive: str, tmp_path: Path, catalog: Catalog
) -> None:
    spec = ERAS["cycle7"]
    uid = "uid://A001/X1470/X2ef"
    meta = (
        '<RESOURCE type="meta" utype="adhoc:service" ID="aux">'
        '<PARAM name="accessURL" datatype="char" arraysize="*" '
        f'value="{archive}/datalink/sync"/></RESOURCE>'
    )
    Archive.routes = {
        f"/tap/sync?{spec.project}": votable(["member_ous_uid"], [[uid], [uid]]),
        f"/datalink/sync?ID={uid}": votable(
            fields(), [[f"{uid}-aux", "", "aux", "#auxiliary", "", ""]], meta
        ),
        f"/datalink/sync?ID={uid}-aux": votable(
            fields(),
            [
                [
                    uid,
                    f"{archive}/files/member.{spec.mous}.hifa_calimage.pipeline_manifest.xml",
                    "",
                    "#this",
                    "",
                    "",
                ]
            ],
        ),
        f"/files/member.{spec.mous}.hifa_calimage.pipeline_manifest.xml": manifest_xml(
            spec
        ).encode(),
    }
    client = AlmaDataLinkClient(archive, timeout=5, cache_dir=tmp_path)
    resolution = resolve_target(spec.project, catalog, archive=client)
    assert (resolution.release.id, resolution.dataset) == ("pl-2020.1.0.40", spec.project)


def test_project_with_several_datasets(archive: str, tmp_path: Path, catalog: Catalog) -> None:
    Archive.routes = {
        "/tap/sync?2019.1.00994.S": votable(
            ["member_ous_uid"], [["uid://A001/X1/X1"], ["uid://A001/X1/X2"]]
        )
    }
    client = AlmaDataLinkClient(archive, timeout=5, cache_dir=tmp_path)
    with pytest.raises(ResolutionError, match="has 2 datasets .*uid://A001/X1/X1.*give one uid"):
        resolve_target("2019.1.00994.S", catalog, archive=client)


def test_dataset_without_manifest(archive: str, tmp_path: Path, catalog: Catalog) -> None:
    uid = "uid://A001/X12a3/Xe9"
    Archive.routes = {
        f"/datalink/sync?ID={uid}": votable(
            fields(), [[uid, f"{archive}/x.tar", "", "#this", "", ""]]
        )
    }
    client = AlmaDataLinkClient(archive, timeout=5, cache_dir=tmp_path)
    with pytest.raises(
        ResolutionError,
        match=r"lists no pipeline manifest .* give its directory \(member.uid___A001_X12a3_Xe9\)",
    ):
        client.fetch_manifest(parse_identifier(uid))


def test_unreachable_slow_and_broken_archives(
    archive: str, tmp_path: Path, catalog: Catalog
) -> None:
    closed = AlmaDataLinkClient("http://127.0.0.1:9", timeout=2, cache_dir=tmp_path)
    # the suggestion is built from what was asked, and reads well on a spawn page too (no CLI
    # command in it)
    for asked, directory in (
        ("uid://A001/X1/X2", "member.uid___A001_X1_X2"),
        ("uid___A001_X3621_X3d68", "member.uid___A001_X3621_X3d68"),
        ("2017.1.01355.L", "2017.1.01355.L"),
    ):
        with pytest.raises(ArchiveUnavailable) as info:
            resolve_target(asked, catalog, archive=closed)
        message = str(info.value)
        assert (
            "could not be reached" in message
            and f"give its directory ({directory}) instead." in message
        )
        assert "casaspawner" not in message and "\n" not in message
    Archive.delay = 1.5
    slow = AlmaDataLinkClient(archive, timeout=0.5, cache_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(ArchiveUnavailable, match="did not answer within 0.5 seconds"):
        resolve_target("uid://A001/X1/X2", catalog, archive=slow)
    assert time.monotonic() - started < 1.4
    Archive.delay = 0
    with pytest.raises(ArchiveUnavailable, match="answered 404"):
        resolve_target(
            "uid://A001/X1/X2", catalog, archive=AlmaDataLinkClient(archive, cache_dir=tmp_path)
        )
    Archive.routes = {
        "/datalink/sync?ID=uid://A001/X1/X3": b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>'
    }
    with pytest.raises(ArchiveUnavailable, match="not a VOTable"):
        resolve_target(
            "uid://A001/X1/X3", catalog, archive=AlmaDataLinkClient(archive, cache_dir=tmp_path)
        )


def test_no_archive_configured(catalog: Catalog) -> None:
    with pytest.raises(ArchiveUnavailable, match="No ALMA archive is configured"):
        resolve_target("uid://A001/X1/X2", catalog)


def test_an_unwritable_cache_is_one_sentence(
    archive: str, tmp_path: Path, catalog: Catalog
) -> None:
    spec = ERAS["cycle10"]
    uid = "uid://A001/X3621/X3d68"
    manifest_url = f"{archive}/dataPortal/member.{spec.mous}.pipeline_manifest.xml"
    Archive.routes = {
        f"/datalink/sync?ID={uid}": votable(
            fields(), [[uid, manifest_url, "", "#auxiliary", "text/xml", "1"]]
        ),
        urllib.parse.urlsplit(manifest_url).path: manifest_xml(spec).encode(),
    }
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    client = AlmaDataLinkClient(archive, timeout=5, cache_dir=blocker)
    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target(uid, catalog, archive=client)
    message = str(info.value)
    assert (
        "could not be stored in the archive cache" in message
        and "(member.uid___A001_X3621_X3d68)" in message
    )
    assert message.endswith(" instead.") and "\n" not in message


def test_a_bad_manifest_is_refused_not_cached_and_each_mirror_has_its_own_cache(
    archive: str, tmp_path: Path, catalog: Catalog
) -> None:
    spec = ERAS["cycle10"]
    uid = "uid://A001/X3621/X3d68"
    path = f"/dataPortal/member.{spec.mous}.pipeline_manifest.xml"
    listing = votable(fields(), [[uid, f"{archive}{path}", "", "#auxiliary", "text/xml", "1"]])
    Archive.routes = {
        f"/datalink/sync?ID={uid}": listing,
        path: b'<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]><m>&x;</m>',
    }
    client = AlmaDataLinkClient(archive, timeout=5, cache_dir=tmp_path)
    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target(uid, catalog, archive=client)
    assert "sent a pipeline manifest for uid://A001/X3621/X3d68 that cannot be read" in str(
        info.value
    )
    assert str(info.value).endswith("give its directory (member.uid___A001_X3621_X3d68) instead.")
    assert not list(tmp_path.rglob("*.xml")), "a refused reply was cached"
    # The archive is fixed: the next request succeeds.
    Archive.routes[path] = manifest_xml(spec).encode()
    assert resolve_target(uid, catalog, archive=client).release.id == "pl-2023.1.0.124"
    # the same uid through another mirror is fetched from it, and reported as coming from it
    other = archive.replace("127.0.0.1", "localhost")
    hits = len(Archive.hits)
    through_other = resolve_target(
        uid, catalog, archive=AlmaDataLinkClient(other, timeout=5, cache_dir=tmp_path)
    )
    assert len(Archive.hits) > hits
    assert through_other.evidence.path.startswith(urllib.parse.urlsplit(other).netloc + ":")

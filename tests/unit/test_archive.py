"""The ALMA archive client (pyvo) against a stand-in archive on 127.0.0.1.

The stand-in (tests/support/alma.py) answers TAP 1.1 and DataLink 1.1 requests with VOTable 1.4
documents shaped as the ALMA archive's; its docstring names the sources.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.alma import AlmaArchive, Link, links_reply, serve_archive, tap_error

from casaspawner.catalog import Catalog
from casaspawner.datasets.archive import MAX_MOUS, AlmaDataLinkClient
from casaspawner.datasets.ids import ProjectCode, Uid, parse_identifier
from casaspawner.datasets.resolve import resolve_target
from casaspawner.datasets.synth import ERAS, DatasetSpec, manifest_xml
from casaspawner.errors import ArchiveUnavailable, ResolutionError

CYCLE10 = ERAS["cycle10"]
UID = "uid://A001/X3621/X3d68"
MANIFEST = f"member.{CYCLE10.mous}.hifa_calimage.pipeline_manifest.xml"
IMAGING = f"member.{CYCLE10.mous}.hif_mpdr_imaging.pipeline_manifest.xml"
DATALINK = "application/x-votable+xml;content=datalink"


@pytest.fixture
def archive() -> Iterator[AlmaArchive]:
    yield from serve_archive()


def auxiliary(spec: DatasetSpec = CYCLE10) -> dict[str, bytes]:
    """An auxiliary package as ALMA lists it: scripts, QA, logs, and two manifests."""
    prefix = f"member.{spec.mous}"
    imaging = DatasetSpec(spec.project, spec.mous, "6.6.1.17", "2024.1.0.8", recipe="hif_mpdr")
    return {
        f"{prefix}.scriptForPI.py": b"# scriptForPI\n",
        f"{prefix}.hifa_calimage.casa_pipescript.py": b"# pipescript\n",
        f"{prefix}.{spec.project}_{spec.mous}.log.tgz": b"\x1f\x8b",
        f"{prefix}.hif_mpdr_imaging.pipeline_manifest.xml": manifest_xml(imaging).encode(),
        f"{prefix}.hifa_calimage.pipeline_manifest.xml": manifest_xml(spec).encode(),
        f"{prefix}.qa2_report.pdf": b"%PDF-1.4",
    }


def client(archive: AlmaArchive, tmp_path: Path, timeout: float = 5) -> AlmaDataLinkClient:
    return AlmaDataLinkClient(archive.base, timeout=timeout, cache_dir=tmp_path)


def test_a_uid_is_looked_up_through_the_auxiliary_package(archive, tmp_path, catalog):
    """The MOUS's links, then its auxiliary package's: the calibration manifest alone is
    downloaded, cached, and read; the raw data and product packages are never listed."""
    archive.add(UID, CYCLE10.project, auxiliary())
    resolution = resolve_target(UID, catalog, archive=client(archive, tmp_path))
    assert (resolution.release.id, resolution.exact, resolution.dataset) == (
        "pl-2023.1.0.124",
        True,
        UID,
    )
    assert resolution.evidence.kind == "archive-manifest"
    assert resolution.evidence.path == f"{archive.base.removeprefix('http://')}:{MANIFEST}"
    # The hub holds the manifest the archive sent, so it knows its digest.
    sent = auxiliary()[MANIFEST]
    assert resolution.evidence.sha256 == hashlib.sha256(sent).hexdigest()
    tar = f"{CYCLE10.project}_{CYCLE10.mous}"
    assert archive.paths() == [
        f"/datalink/sync?ID={UID.replace(':', '%3A').replace('/', '%2F')}",
        f"/datalink/sync?ID={tar}_auxiliary.tar",
        f"/dataPortal/{MANIFEST}",
    ]
    # Cached: the other spelling of the uid asks the archive nothing.
    asked = len(archive.requests)
    again = resolve_target("uid___A001_X3621_X3d68", catalog, archive=client(archive, tmp_path))
    assert again.release.id == "pl-2023.1.0.124" and len(archive.requests) == asked


def test_a_cache_cleared_between_fetch_and_read_is_one_sentence(archive, tmp_path, catalog):
    archive.add(UID, CYCLE10.project, auxiliary())

    class Cleared(AlmaDataLinkClient):
        """The cache is cleared by someone else between the fetch and the read."""

        def fetch_manifest(self, identifier: ProjectCode | Uid) -> Path:
            manifest = super().fetch_manifest(identifier)
            shutil.rmtree(manifest.parent)
            return manifest

    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target(UID, catalog, archive=Cleared(archive.base, timeout=5, cache_dir=tmp_path))
    assert str(info.value).endswith(
        "(No such file or directory); download the dataset and give its directory instead."
    )


def test_a_project_code_is_looked_up_through_tap(archive, tmp_path, catalog):
    spec = ERAS["cycle7"]
    uid = "uid://A001/X1470/X2ef"
    archive.add(uid, spec.project, auxiliary(spec))
    resolution = resolve_target(spec.project, catalog, archive=client(archive, tmp_path))
    assert (resolution.release.id, resolution.dataset) == ("pl-2020.1.0.40", spec.project)
    method, path, form = archive.requests[0]
    assert (method, path) == ("POST", "/tap/sync")
    assert form["REQUEST"] == ["doQuery"] and form["LANG"] == ["ADQL"]
    assert form["MAXREC"] == [str(MAX_MOUS)]
    assert form["QUERY"] == [
        f"SELECT DISTINCT member_ous_uid FROM ivoa.obscore WHERE proposal_id = '{spec.project}'"
    ]


def test_a_project_must_have_exactly_one_dataset(archive, tmp_path, catalog):
    for index in range(3):
        archive.add(f"uid://A001/X1/X{index}", "2019.1.00994.S", {})
    with pytest.raises(ResolutionError, match=r"has 3 datasets \(MOUS uid://A001/X1/X0, "):
        resolve_target("2019.1.00994.S", catalog, archive=client(archive, tmp_path))
    for index in range(3, MAX_MOUS + 5):
        archive.add(f"uid://A001/X1/X{index:x}", "2019.1.00994.S", {})
    # Cut at MAXREC, with OVERFLOW after the table.
    with pytest.raises(ResolutionError) as info:
        resolve_target("2019.1.00994.S", catalog, archive=client(archive, tmp_path))
    assert f"has more than {MAX_MOUS} datasets" in str(info.value)
    assert str(info.value).endswith(" and 95 more); give one uid instead.")
    with pytest.raises(ResolutionError, match=r"^The ALMA archive has no data for project"):
        resolve_target("2011.0.00004.SV", catalog, archive=client(archive, tmp_path))


def test_a_tap_error_document_is_one_sentence(archive, tmp_path, catalog):
    archive.replies["/tap/sync"] = (
        400,
        "application/x-votable+xml",
        tap_error("IllegalArgumentException: ivoa.obscore\nis not\tavailable right now."),
    )
    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target("2019.1.00994.S", catalog, archive=client(archive, tmp_path))
    assert str(info.value) == (
        f"The ALMA archive at {archive.base.removeprefix('http://')} refused the query "
        "(IllegalArgumentException: ivoa.obscore is not available right now); "
        "download the dataset and give its directory (2019.1.00994.S) instead."
    )


def test_an_unknown_uid_is_a_notfoundfault_row(archive, tmp_path, catalog):
    with pytest.raises(ResolutionError) as info:
        resolve_target("uid://A001/X12a3/Xe9", catalog, archive=client(archive, tmp_path))
    assert str(info.value) == (
        "The ALMA archive does not know uid://A001/X12a3/Xe9 "
        "(NotFoundFault: uid://A001/X12a3/Xe9 not found); "
        "download the dataset and give its directory (member.uid___A001_X12a3_Xe9) instead."
    )


def test_error_rows_are_passed_over(archive, tmp_path, catalog):
    """A row that could not be made does not hide the links beside it."""
    tar = f"{CYCLE10.project}_{CYCLE10.mous}_auxiliary.tar"
    links = [
        Link("#this", error="TransientFault: the product package is being staged"),
        Link("#auxiliary", service=f"DataLink.{tar}", content_type=DATALINK),
    ]
    services = {f"DataLink.{tar}": f"{archive.base}/datalink/sync?ID={tar}"}
    for uid in (UID, "uid://A001/X1/X9"):
        archive.replies[f"/datalink/sync?ID={uid}"] = (
            200,
            DATALINK,
            links_reply(uid, links, services),
        )
    archive.add(UID, CYCLE10.project, auxiliary())
    assert resolve_target(UID, catalog, archive=client(archive, tmp_path)).exact
    # When no manifest is listed beside them, the first fault is the sentence.
    faulty = [Link("#auxiliary", error="FatalFault: package table offline")]
    archive.replies[f"/datalink/sync?ID={tar}"] = (200, DATALINK, links_reply(tar, faulty, {}))
    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target("uid://A001/X1/X9", catalog, archive=client(archive, tmp_path))
    assert str(info.value) == (
        f"The ALMA archive at {archive.base.removeprefix('http://')} could not list every file "
        "of uid://A001/X1/X9 (TransientFault: the product package is being staged), and none it "
        "listed is a pipeline manifest; download the dataset and give its directory "
        "(member.uid___A001_X1_X9) instead."
    )


def test_an_overflowing_listing_without_manifest_is_one_sentence(archive, tmp_path, catalog):
    files = {f"member.{CYCLE10.mous}.plot{index}.png": b"png" for index in range(20)}
    archive.add(UID, CYCLE10.project, {**files, **auxiliary()})
    archive.datalink_maxrec = 10
    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target(UID, catalog, archive=client(archive, tmp_path))
    assert "listed only part of the files of uid://A001/X3621/X3d68 (its reply overflowed)" in str(
        info.value
    )
    # A manifest among the rows it did list is enough.
    archive.datalink_maxrec = 30
    assert resolve_target(UID, catalog, archive=client(archive, tmp_path)).exact


def test_a_dataset_without_manifest(archive, tmp_path):
    archive.add("uid://A001/X12a3/Xe9", "2017.1.01185.S", {"member.x.scriptForPI.py": b"#"})
    with pytest.raises(
        ResolutionError,
        match=r"lists no pipeline manifest .* give its directory \(member.uid___A001_X12a3_Xe9\)",
    ):
        client(archive, tmp_path).fetch_manifest(parse_identifier("uid://A001/X12a3/Xe9"))


def test_unreachable_slow_and_broken_archives(archive, tmp_path, catalog):
    closed = AlmaDataLinkClient("http://127.0.0.1:9", timeout=2, cache_dir=tmp_path)
    # The suggestion is built from what was asked, and reads well on a spawn page too (no CLI
    # command in it).
    for asked, directory in (
        ("uid://A001/X1/X2", "member.uid___A001_X1_X2"),
        ("uid___A001_X3621_X3d68", "member.uid___A001_X3621_X3d68"),
        ("2017.1.01355.L", "2017.1.01355.L"),
    ):
        with pytest.raises(ArchiveUnavailable) as info:
            resolve_target(asked, catalog, archive=closed)
        assert str(info.value) == (
            "The ALMA archive at 127.0.0.1:9 could not be reached (Connection refused); "
            f"download the dataset and give its directory ({directory}) instead."
        )
    archive.delay = 1.5
    started = time.monotonic()
    with pytest.raises(ArchiveUnavailable, match="did not answer within 0.5 seconds;"):
        resolve_target("uid://A001/X1/X2", catalog, archive=client(archive, tmp_path, 0.5))
    assert time.monotonic() - started < 1.4
    archive.delay = 0
    archive.replies["/datalink/sync?ID=uid://A001/X1/X2"] = (404, "text/html", b"<h1>gone</h1>")
    with pytest.raises(ArchiveUnavailable, match="answered 404 Not Found;"):
        resolve_target("uid://A001/X1/X2", catalog, archive=client(archive, tmp_path))
    for body in (
        b'<!DOCTYPE x [<!ENTITY a "b">]><VOTABLE>&a;</VOTABLE>',
        b"<html><body>Maintenance</body></html>",
        b"not xml at all",
    ):
        archive.replies["/datalink/sync?ID=uid://A001/X1/X3"] = (200, DATALINK, body)
        with pytest.raises(ArchiveUnavailable, match="sent a reply that is not a VOTable;"):
            resolve_target("uid://A001/X1/X3", catalog, archive=client(archive, tmp_path))
    archive.replies["/datalink/sync?ID=uid://A001/X1/X4"] = (200, DATALINK, b" " * (17 << 20))
    with pytest.raises(
        ArchiveUnavailable, match="sent more than 16 MiB, so the reply was refused;"
    ):
        resolve_target("uid://A001/X1/X4", catalog, archive=client(archive, tmp_path))


def test_a_manifest_elsewhere_than_http_is_refused(archive, tmp_path, catalog):
    links = [Link("#auxiliary", f"file:///etc/{MANIFEST}")]
    archive.replies[f"/datalink/sync?ID={UID}"] = (200, DATALINK, links_reply(UID, links, {}))
    with pytest.raises(ArchiveUnavailable, match="pointed to a non-HTTP location;"):
        resolve_target(UID, catalog, archive=client(archive, tmp_path))


def test_no_archive_configured(catalog: Catalog) -> None:
    with pytest.raises(ArchiveUnavailable, match="No ALMA archive is configured"):
        resolve_target("uid://A001/X1/X2", catalog)


def test_without_pyvo_a_lookup_is_one_sentence_and_the_cache_still_serves(
    archive, tmp_path, catalog, monkeypatch
):
    archive.add(UID, CYCLE10.project, auxiliary())
    resolve_target(UID, catalog, archive=client(archive, tmp_path))
    monkeypatch.setitem(sys.modules, "pyvo", None)
    assert resolve_target(UID, catalog, archive=client(archive, tmp_path)).exact
    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target("uid://A001/X1/X2", catalog, archive=client(archive, tmp_path))
    assert str(info.value) == (
        "Looking up ALMA identifiers needs the pyvo package, which this installation lacks "
        "(the casaspawner[clients] extra); download the dataset and give its directory "
        "(member.uid___A001_X1_X2) instead."
    )


def test_an_unwritable_cache_is_one_sentence(archive, tmp_path, catalog):
    archive.add(UID, CYCLE10.project, auxiliary())
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target(UID, catalog, archive=AlmaDataLinkClient(archive.base, cache_dir=blocker))
    message = str(info.value)
    assert (
        "could not be stored in the archive cache" in message
        and "(member.uid___A001_X3621_X3d68)" in message
    )
    assert message.endswith(" instead.") and "\n" not in message


def test_a_bad_manifest_is_refused_not_cached_and_each_mirror_has_its_own_cache(
    archive, tmp_path, catalog
):
    files = auxiliary()
    files[MANIFEST] = b'<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]><m>&x;</m>'
    del files[IMAGING]
    entry = archive.add(UID, CYCLE10.project, files)
    with pytest.raises(ArchiveUnavailable) as info:
        resolve_target(UID, catalog, archive=client(archive, tmp_path))
    assert "sent a pipeline manifest for uid://A001/X3621/X3d68 that cannot be read" in str(
        info.value
    )
    assert str(info.value).endswith("give its directory (member.uid___A001_X3621_X3d68) instead.")
    assert not list(tmp_path.rglob("*.xml")), "a refused reply was cached"
    # The archive is fixed: the next request succeeds.
    entry.auxiliary[MANIFEST] = manifest_xml(CYCLE10).encode()
    assert resolve_target(UID, catalog, archive=client(archive, tmp_path)).release.id == (
        "pl-2023.1.0.124"
    )
    # The same uid through another mirror is fetched from it, and reported as coming from it.
    other = archive.base.replace("127.0.0.1", "localhost")
    asked = len(archive.requests)
    through_other = resolve_target(
        UID, catalog, archive=AlmaDataLinkClient(other, timeout=5, cache_dir=tmp_path)
    )
    assert len(archive.requests) > asked
    assert through_other.evidence.path.startswith(other.removeprefix("http://") + ":")


def test_pyvo_is_imported_with_one_blas_thread(tmp_path):
    """numpy, under pyvo, reserves address space per OpenBLAS thread: one in the worker."""
    script = (
        "import os, sys, pathlib\n"
        "from casaspawner.datasets.archive import AlmaDataLinkClient\n"
        "client = AlmaDataLinkClient(\n"
        f"    'http://127.0.0.1:9', cache_dir=pathlib.Path({str(tmp_path)!r})\n"
        ")\n"
        "with client._session(0):\n"
        "    pass\n"
        "print('numpy' in sys.modules, os.environ.get('OPENBLAS_NUM_THREADS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", "1"]

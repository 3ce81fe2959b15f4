"""Dataset trees of every era resolve by ALMA's rule; attacks and malformed files leak nothing."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path, PurePosixPath

import pytest

from casaspawner.catalog import Catalog, normalize_casa, normalize_pipeline
from casaspawner.datasets.evidence import read_weblog
from casaspawner.datasets.layout import open_mous
from casaspawner.datasets.resolve import read_evidence, resolve_path, resolve_target
from casaspawner.datasets.synth import ERAS, DatasetSpec, write_dataset
from casaspawner.datasets.tree import Directory, open_directory, open_file
from casaspawner.errors import InvalidInput, ResolutionError, VersionUnknown

# era -> (release id the session runs, exact?, evidence kind, processed_with casa, processed_with
# pipeline)
EXPECTED = {
    "cycle0-manual": ("casa-3.4.0", True, "script", "3.4.0", None),
    "cycle2-manual": ("casa-4.2.2", True, "script", "4.2.2", None),
    "cycle2-pipeline": ("pl-cycle2-r31667", True, "weblog", "4.2.2", "r31667"),
    "cycle3-pipeline": ("pl-r36660", True, "weblog", "4.5.3", "r36660"),
    "cycle4-manual": ("pl-r39732", True, "script", "4.7.2", None),
    "cycle4-pipeline": ("pl-r39732", True, "weblog", "4.7.2", "r39732"),
    "cycle5": ("pl-r40896", True, "manifest", "5.1.1-5", "r40896"),
    "cycle5-internal": ("pl-r42254", False, "manifest", "5.4.0-68", "r42030"),
    "cycle6": ("pl-r42254", True, "manifest", "5.4.0-70", "r42254"),
    "cycle7": ("pl-2020.1.0.40", True, "manifest", "6.1.1-15", "2020.1.0.40"),
    "cycle7-internal": ("pl-2020.1.0.40", False, "manifest", "6.1.1-10", "2020.1.0.36"),
    "cycle8": ("pl-2021.2.0.128", True, "manifest", "6.2.1-7", "2021.2.0.128"),
    "cycle9": ("pl-2022.2.0.64", True, "manifest", "6.4.1-12", "2022.2.0.64"),
    "cycle10": ("pl-2023.1.0.124", True, "manifest", "6.5.4-9", "2023.1.0.124"),
    "cycle11": ("pl-2024.1.0.8", True, "aquareport", "6.6.1-17", "2024.1.0.8"),
    "cycle12": ("pl-2025.1.0.36", True, "manifest", "6.6.6-18", "2025.1.0.36"),
    "cycle12-patch2": ("pl-2025.1.0.36", False, "manifest", "6.6.6-18", "2025.1.0.37"),
    "vla-numbered": ("pl-2024.1.0.8", False, "manifest", "6.6.1-17", "2024.1.1.22"),
    "log-only": ("pl-r39732", True, "casalog", "4.7.2", None),
}


def test_every_named_era_is_covered() -> None:
    assert set(EXPECTED) | {"no-evidence"} == set(ERAS)


@pytest.mark.parametrize("era", sorted(EXPECTED))
@pytest.mark.parametrize("start", ["project", "member"])
def test_eras_resolve_by_almas_rule(
    tmp_path: Path, catalog: Catalog, era: str, start: str
) -> None:
    member = write_dataset(tmp_path, era)
    target = member if start == "member" else tmp_path / ERAS[era].project
    resolution = resolve_path(target, catalog)
    release_id, exact, kind, casa, pipeline = EXPECTED[era]
    assert resolution.release.id == release_id
    assert resolution.exact is exact
    assert resolution.evidence.kind == kind
    assert resolution.processed_with == {"casa": casa, "pipeline": pipeline}
    assert (target / resolution.evidence.path.split("!")[0]).is_file()
    reason = resolution.reason
    assert reason.endswith(".") and "\n" not in reason and resolution.release.casa in reason


def test_reasons_explain_the_rule(tmp_path: Path, catalog: Catalog) -> None:
    assert (
        "never published"
        in resolve_path(write_dataset(tmp_path / "a", "cycle5-internal"), catalog).reason
    )
    assert (
        "VLA/VLASS" in resolve_path(write_dataset(tmp_path / "b", "vla-numbered"), catalog).reason
    )


def test_no_evidence_is_a_clear_error(tmp_path: Path, catalog: Catalog) -> None:
    write_dataset(tmp_path, "no-evidence")
    with pytest.raises(
        ResolutionError, match="Nothing in .* tells which CASA version processed it"
    ):
        resolve_path(tmp_path, catalog)


def test_a_dataset_without_a_usable_version_says_so_apart_from_the_advice(
    tmp_path: Path, catalog: Catalog
) -> None:
    """VersionUnknown: one dataset was found; the finding and what to do are separate (a spawner
    replaces the advice with the user's own choice). Datasets that are not one dataset are plain
    ResolutionErrors."""
    write_dataset(tmp_path / "none", "no-evidence")
    planned = write_dataset(
        tmp_path / "planned", spec=DatasetSpec(casa="6.7.4.4", pipeline="2026.2.0.12")
    )
    old = write_dataset(
        tmp_path / "old", spec=DatasetSpec(casa="2.9.0", pipeline=None, evidence=("casalog",))
    )
    for path, finding, advice in (
        (
            tmp_path / "none",
            "Nothing in none tells which CASA version processed it (it has no pipeline manifest, "
            "AQUA report, weblog, calibration script or CASA log that names one)",
            "choose a CASA release yourself",
        ),
        (planned, "is a planned release with no public build yet", "choose a release yourself"),
        (old, "but the catalog has no public build of CASA 2.9", "choose a release yourself"),
    ):
        with pytest.raises(VersionUnknown) as info:
            resolve_path(path, catalog, label=path.name)
        assert info.value.finding.endswith(finding) and info.value.advice == advice
        assert str(info.value) == f"{info.value.finding}; {advice}."
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResolutionError) as not_one:
        resolve_path(tmp_path / "empty", catalog)
    assert not isinstance(not_one.value, VersionUnknown)


def test_evidence_order_manifest_beats_weblog_and_log(tmp_path: Path, catalog: Catalog) -> None:
    spec = DatasetSpec(casa="6.5.4.9", pipeline="2023.1.0.124", evidence=("manifest",))
    member = write_dataset(tmp_path, spec=spec)
    other = DatasetSpec(
        casa="6.4.1.12", pipeline="2022.2.0.64", evidence=("weblog", "aquareport", "casalog")
    )
    write_dataset(tmp_path, spec=other)
    assert read_evidence(member).kind == "manifest"
    assert resolve_path(member, catalog).release.id == "pl-2023.1.0.124"
    next(member.glob("script/*manifest.xml")).unlink()
    assert read_evidence(member).kind == "aquareport"


def test_several_mous_are_listed(tmp_path: Path, catalog: Catalog) -> None:
    write_dataset(tmp_path, spec=DatasetSpec(mous="uid___A001_X1_X2"))
    write_dataset(tmp_path, spec=DatasetSpec(mous="uid___A001_X1_X3"))
    with pytest.raises(ResolutionError) as info:
        resolve_path(tmp_path, catalog)
    assert "2 MOUS directories" in str(info.value)
    assert "member.uid___A001_X1_X2" in str(info.value) and "member.uid___A001_X1_X3" in str(
        info.value
    )


def test_paths_that_are_not_datasets(tmp_path: Path, catalog: Catalog) -> None:
    with pytest.raises(ResolutionError, match="does not exist"):
        resolve_path(tmp_path / "nope", catalog)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ResolutionError, match="is a file"):
        resolve_path(tmp_path / "file.txt", catalog)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResolutionError, match="holds no ALMA member"):
        resolve_path(tmp_path / "empty", catalog)


def test_resolve_target_distinguishes_paths_and_identifiers(
    tmp_path: Path, catalog: Catalog
) -> None:
    write_dataset(tmp_path, "cycle10")
    assert resolve_target(str(tmp_path), catalog).release.id == "pl-2023.1.0.124"
    with pytest.raises(InvalidInput, match="not an ALMA dataset identifier"):
        resolve_target("hello", catalog)
    with pytest.raises(ResolutionError, match="does not exist"):
        resolve_target("./no/such/dir", catalog)
    with pytest.raises(InvalidInput, match="No dataset given"):
        resolve_target("  ", catalog)


def test_manual_scripts_majority_and_series(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(
        tmp_path,
        spec=DatasetSpec(casa="4.2.1", pipeline=None, evidence=("script",), eb="uid___A002_X1_X1"),
    )
    write_dataset(
        tmp_path,
        spec=DatasetSpec(casa="4.2.2", pipeline=None, evidence=("script",), eb="uid___A002_X1_X2"),
    )
    write_dataset(
        tmp_path,
        spec=DatasetSpec(casa="4.2.2", pipeline=None, evidence=("script",), eb="uid___A002_X1_X3"),
    )
    assert read_evidence(member).casa == "4.2.2"
    series = write_dataset(
        tmp_path / "s", spec=DatasetSpec(casa="4.1", pipeline=None, evidence=("script",))
    )
    resolution = resolve_path(series, catalog)
    assert (resolution.release.casa, resolution.exact, resolution.evidence.casa) == (
        "4.1.0",
        True,
        "4.1",
    )


def test_unknown_builds_take_the_nearest_newer_public_build(
    tmp_path: Path, catalog: Catalog
) -> None:
    member = write_dataset(
        tmp_path, spec=DatasetSpec(casa="4.7.1", pipeline=None, evidence=("casalog",))
    )
    resolution = resolve_path(member, catalog)
    assert (resolution.release.casa, resolution.exact) == ("4.7.2", False)
    member = write_dataset(
        tmp_path / "b", spec=DatasetSpec(casa="6.5.4.7", pipeline="2023.1.0.99")
    )
    resolution = resolve_path(member, catalog)
    assert (resolution.release.id, resolution.exact) == ("pl-2023.1.0.124", False)
    assert "not in the catalog" in resolution.reason
    member = write_dataset(
        tmp_path / "c", spec=DatasetSpec(casa="2.9.0", pipeline=None, evidence=("casalog",))
    )
    with pytest.raises(ResolutionError, match="no public build of CASA 2.9"):
        resolve_path(member, catalog)


def test_planned_release_without_a_build_is_refused(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(tmp_path, spec=DatasetSpec(casa="6.7.4.4", pipeline="2026.2.0.12"))
    with pytest.raises(ResolutionError, match="is a planned release with no public build yet"):
        resolve_path(member, catalog)


# ------------------------------------------------------------------------------------------
# hostile input

SECRET = "TOP-SECRET-CASA-9.9.9-LEAK"

ATTACKS = {
    "billion-laughs": """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol">\
<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<piperesults><ous><casaversion name="&lol3;"/></ous></piperesults>""",
    "xxe-file": """<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file://{secret}">]>
<piperesults><ous><casaversion name="&xxe;"/>\
<pipeline_version name="&xxe;"/></ous></piperesults>""",
    "external-dtd": """<?xml version="1.0"?>
<!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd">
<piperesults><ous><casaversion name="6.5.4.9"/></ous></piperesults>""",
    "parameter-entity": """<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY % p SYSTEM "file://{secret}"> %p;]>
<piperesults><ous><casaversion name="6.5.4.9"/></ous></piperesults>""",
    "not-xml": "<piperesults><ous><casaversion name='6.5.4.9'></piperesults",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("where", ["manifest", "aquareport"])
def test_xml_attacks_leak_nothing(
    tmp_path: Path, catalog: Catalog, attack: str, where: str
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    spec = DatasetSpec(evidence=())
    member = write_dataset(tmp_path / "ds", spec=spec)
    name = (
        "script/x.pipeline_manifest.xml" if where == "manifest" else "qa/x.pipeline_aquareport.xml"
    )
    (member / name).write_text(ATTACKS[attack].format(secret=secret))
    with pytest.raises(ResolutionError) as info:
        resolve_path(member, catalog)
    assert SECRET not in str(info.value) and "lol" not in str(info.value)
    # with other evidence present, the hostile file is skipped and the next kind decides
    write_dataset(tmp_path / "ds", spec=DatasetSpec(evidence=("casalog",), casa="6.5.4.9"))
    resolution = resolve_path(member, catalog)
    assert resolution.evidence.kind == "casalog" and SECRET not in resolution.reason


def test_symlinks_out_of_the_dataset_are_ignored(tmp_path: Path, catalog: Catalog) -> None:
    outside = write_dataset(tmp_path / "outside", "cycle10")
    member = write_dataset(
        tmp_path / "ds", spec=DatasetSpec(evidence=("casalog",), casa="4.7.2", pipeline=None)
    )
    manifest = next(outside.glob("script/*manifest.xml"))
    os.symlink(manifest, member / "script" / manifest.name)
    assert resolve_path(member, catalog).evidence.kind == "casalog"


def test_links_within_the_dataset_are_passed_over_too(tmp_path: Path, catalog: Catalog) -> None:
    """Below the directory given, no link is followed, even one that stays inside the dataset:
    evidence files, directories the resolver looks in, weblog pages, packed archives and member
    directories alike."""
    member = write_dataset(
        tmp_path / "ds", spec=DatasetSpec(evidence=("casalog",), casa="4.7.2", pipeline=None)
    )
    # evidence of another version kept in the dataset, too deep to be searched, linked where it is
    # looked for
    kept = write_dataset(
        member / "calibration" / "kept",
        spec=DatasetSpec(evidence=("manifest", "aquareport", "weblog", "weblog-tgz")),
    )
    manifest = next(kept.glob("script/*manifest.xml"))
    (member / "script" / manifest.name).symlink_to(manifest)
    (member / "qa").rmdir()
    # An AQUA report, a weblog and a packed weblog behind a link.
    (member / "qa").symlink_to(kept / "qa")
    html = member / "product" / "weblog" / "html"
    html.mkdir(parents=True)
    (html / "t1-1.html").symlink_to(next(kept.glob("qa/*/*/html/t1-1.html")))
    (member / "weblog.tgz").symlink_to(next(kept.glob("qa/*.weblog.tgz")))
    (member / "log" / "casa-1.tgz").symlink_to(next(kept.glob("qa/*.weblog.tgz")))
    assert resolve_path(member, catalog).evidence.kind == "casalog"
    # the dataset directory itself may be given through a link: that is the directory the user
    # named
    (tmp_path / "given").symlink_to(member)
    assert (
        resolve_path(tmp_path / "given", catalog).evidence.path == "log/casapy-20161102-101201.log"
    )
    # a member directory that is a link is not a MOUS of the directory given
    project = tmp_path / "project"
    project.mkdir()
    (project / member.name).symlink_to(member)
    with pytest.raises(ResolutionError, match="project holds no ALMA member"):
        resolve_path(project, catalog)


def test_names_that_are_not_regular_files_are_passed_over_without_blocking(tmp_path: Path) -> None:
    """A name swapped for a FIFO, a directory or a link after it was listed opens as nothing: the
    open never waits for a FIFO's writer and never follows a link at any step."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"evidence")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to("d")
    (tmp_path / "d" / "f-link").symlink_to("f")
    results: dict[str, bool] = {}

    def opens(top: Directory, name: str) -> None:
        with open_file(top, PurePosixPath(name)) as handle:
            results[name] = handle is not None and handle.read() == b"evidence"

    with open_directory(tmp_path) as top:
        reader = threading.Thread(target=opens, args=(top, "fifo"), daemon=True)
        reader.start()
        reader.join(10)
        if reader.is_alive():
            # It blocked: let it go, then fail.
            os.close(os.open(tmp_path / "fifo", os.O_WRONLY | os.O_NONBLOCK))
        assert not reader.is_alive()
        for name in ("d/f", "d", "link/f", "d/f-link", "missing", "d/f/x", "d/../d/f"):
            opens(top, name)
    assert results == {
        "fifo": False,
        "d/f": True,
        "d": False,
        "link/f": False,
        "d/f-link": False,
        "missing": False,
        "d/f/x": False,
        "d/../d/f": False,
    }


def test_no_descriptor_is_left_open(tmp_path: Path, catalog: Catalog) -> None:
    """Every way out of a resolution (evidence found, each kind of error) closes what it opened."""
    for era in ERAS:
        write_dataset(tmp_path / era, era)
    write_dataset(tmp_path / "two", spec=DatasetSpec(mous="uid___A001_X1_X2"))
    write_dataset(tmp_path / "two", spec=DatasetSpec(mous="uid___A001_X1_X3"))
    (tmp_path / "empty").mkdir()
    bad = write_dataset(tmp_path / "bad", spec=DatasetSpec(evidence=()))
    (bad / "qa" / "x.weblog.tgz").write_bytes(b"\x1f\x8b not gzip")
    before = sorted(os.listdir("/proc/self/fd"))
    outcomes: list[str] = []
    for path in sorted(tmp_path.iterdir()):
        try:
            outcomes.append(resolve_path(path, catalog, label=path.name).evidence.kind)
        except ResolutionError as exc:
            outcomes.append(str(exc).split(";")[0].split(" ", 1)[1])
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert {
        "holds 2 MOUS directories (member.uid___A001_X1_X2, member.uid___A001_X1_X3)",
        "holds no ALMA member.uid___… (MOUS) directory",
        "readable in bad tells its CASA version: x.weblog.tgz is not a readable tar archive.",
        "in no-evidence tells which CASA version processed it (it has no pipeline manifest, AQUA "
        "report, weblog, calibration script or CASA log that names one)",
        "manifest",
        "weblog",
        "script",
    } <= set(outcomes), outcomes


def test_oversized_evidence_is_refused_not_read(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(tmp_path, spec=DatasetSpec(evidence=()))
    with (member / "qa" / "big.pipeline_aquareport.xml").open("wb") as handle:
        handle.truncate(9 * 1024 * 1024)
    with pytest.raises(ResolutionError, match="too large"):
        resolve_path(member, catalog)


def test_packed_weblog_is_read_without_extracting(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(tmp_path, "cycle3-pipeline")
    before = sorted(p for p in tmp_path.rglob("*"))
    with open_mous(tmp_path) as mous:
        evidence = read_weblog(mous)
    assert evidence is not None
    assert (
        evidence.path
        == str(member.relative_to(tmp_path) / "qa" / f"{member.name}.hifa_calimage.weblog.tgz")
        + "!pipeline-20231015T120000/html/t1-1.html"
    )
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_hostile_tar_members_are_neither_written_nor_reported(
    tmp_path: Path, catalog: Catalog
) -> None:
    member = write_dataset(tmp_path / "ds", spec=DatasetSpec(evidence=()))
    archive = member / "qa" / "x.weblog.tgz"
    page = b"<table><tr><th>CASA Version</th><td>6.5.4.9</td></tr></table>"
    hostile = [
        "../../../../escape/html/t1-1.html",
        "/tmp/escape/html/t1-1.html",
        "p/../../html/t1-1.html",
        "pipeline-1/\x1b[2Jhtml/t1-1.html",
    ]

    def pack(names: list[str]) -> None:
        with tarfile.open(archive, "w:gz") as tar:
            for name in names:
                # As written, unlike tar.add(), which strips a leading /.
                info = tarfile.TarInfo(name)
                info.size = len(page)
                tar.addfile(info, io.BytesIO(page))
            link = tarfile.TarInfo("pipeline-1/html/t1-1.html")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)

    pack(hostile)
    with tarfile.open(archive) as tar:
        assert tar.getnames()[:4] == hostile
    with pytest.raises(ResolutionError, match="Nothing in .* tells which CASA version"):
        # No member it would accept names a version.
        resolve_path(member, catalog)
    pack([*hostile, "pipeline-2/html/t1-1.html"])
    resolution = resolve_path(member, catalog)
    assert resolution.release.casa == "6.5.4-9"
    assert resolution.evidence.path.endswith("x.weblog.tgz!pipeline-2/html/t1-1.html")
    assert not (tmp_path / "escape").exists()
    (member / "qa" / "y.weblog.tgz").write_bytes(b"\x1f\x8b not really gzip")
    archive.unlink()
    with pytest.raises(ResolutionError, match="not a readable tar archive"):
        resolve_path(member, catalog)


@pytest.mark.parametrize(
    ("casa_cell", "pipeline_cell", "expected"),
    [
        (
            "6.5.4.9 (<a href='javascript:'>environment</a>)",
            "2023.1.0.124\n (<a href='x'>documentation</a>)",
            ("6.5.4-9", "2023.1.0.124"),
        ),
        ("5.4.0-70", "42254M (Pipeline-CASA54-P1-B)", ("5.4.0-70", "r42254")),
        (
            "4.7.2-REL (r39762) (<a>environment</a>)",
            "39732M (Pipeline-Cycle4-R2-B) (<a>documentation</a>)",
            ("4.7.2", "r39732"),
        ),
        ("6.1.1.15", "2020.1.0.40+dirty", ("6.1.1-15", "2020.1.0.40")),
    ],
)
def test_weblog_cells_of_every_template_generation(
    casa_cell: str, pipeline_cell: str, expected: tuple[str, str]
) -> None:
    from casaspawner.datasets.evidence import weblog_versions

    html = (
        "<table><thead><tr><th></th><th></th><th></th></tr></thead><tbody>"
        "<tr><th>PPR ID</th><td></td><td></td></tr>"
        f"<tr><th>Pipeline Version</th><td>{pipeline_cell}</td><td></td></tr>"
        f"<tr><th>CASA Version</th><td>{casa_cell}</td><td></td></tr></tbody></table>"
    )
    casa, pipeline = weblog_versions(html.encode())
    assert casa is not None and pipeline is not None
    assert (normalize_casa(casa), normalize_pipeline(pipeline)) == expected


def test_aquareport_versions_outside_qasummary(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(tmp_path, spec=DatasetSpec(evidence=()))
    (member / "qa" / "m.pipeline_aquareport.xml").write_text(
        "<PipelineAquaReport><CasaVersion>5.4.0-70</CasaVersion>"
        "<PipelineVersion>42254M</PipelineVersion></PipelineAquaReport>"
    )
    assert resolve_path(member, catalog).release.id == "pl-r42254"


def test_errors_name_the_dataset_as_the_user_gave_it(tmp_path: Path, catalog: Catalog) -> None:
    write_dataset(tmp_path / "hub" / "alice", "no-evidence")
    for path, label in (
        (tmp_path / "hub" / "alice", "my/project"),
        (tmp_path / "hub" / "nope", "my/nope"),
    ):
        with pytest.raises(ResolutionError) as info:
            resolve_path(path, catalog, label=label)
        assert label in str(info.value) and str(tmp_path) not in str(info.value)


def test_a_guard_after_a_long_step_list_is_found(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(
        tmp_path, spec=DatasetSpec(casa="4.5.3", pipeline=None, evidence=("script",))
    )
    (script,) = (member / "script").glob("*.scriptForCalibration.py")
    steps = "".join(f"              {n}: 'Step {n}',\n" for n in range(1, 81))
    text = script.read_text().replace(
        "{0: 'Import of the ASDM'}", "{0: 'Import of the ASDM',\n" + steps + "}"
    )
    script.write_text(text)
    assert text.splitlines().index("import casadef") > 80
    assert resolve_path(member, catalog).release.casa == "4.5.3"


def test_evidence_file_names_stay_inside_one_sentence(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(tmp_path, spec=DatasetSpec(evidence=()))
    (
        member / "script" / "x\nTraceback (most recent call last):\n\x1b[31m.pipeline_manifest.xml"
    ).write_text("<no")
    with pytest.raises(ResolutionError) as info:
        resolve_path(member, catalog)
    message = str(info.value)
    assert "is not well-formed XML" in message and message.isprintable(), message


def test_xml_evidence_is_streamed_within_element_and_depth_bounds(
    tmp_path: Path, catalog: Catalog
) -> None:
    spec = ERAS["cycle10"]
    versions = f'<casaversion name="{spec.casa}"/><pipeline_version name="{spec.pipeline}"/>'
    cases = {
        # the versions come first: reading stops there, whatever follows
        "first": f"<ousstatus><ous>{versions}</ous>" + "<x/>" * 3_000_000 + "<unclosed>",
        # the versions come last, after many (read and dropped) elements
        "last": "<ousstatus>" + "<x/>" * 300_000 + f"<ous>{versions}</ous></ousstatus>",
        "deep": "<a>" * 200 + "</a>" * 200,
        "many": "<m>" + "<x/>" * 1_100_000 + "</m>",
    }
    outcomes = {}
    for name, xml in cases.items():
        member = write_dataset(tmp_path / name, spec=DatasetSpec(evidence=()))
        (member / "script" / f"{name}.pipeline_manifest.xml").write_text(xml)
        try:
            outcomes[name] = resolve_path(member, catalog).release.id
        except ResolutionError as exc:
            outcomes[name] = str(exc).split(": ", 1)[1]
    assert outcomes == {
        "first": "pl-2023.1.0.124",
        "last": "pl-2023.1.0.124",
        "deep": "deep.pipeline_manifest.xml holds more or deeper-nested XML elements than "
        "evidence files do.",
        "many": "many.pipeline_manifest.xml holds more or deeper-nested XML elements than "
        "evidence files do.",
    }

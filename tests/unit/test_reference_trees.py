"""Dataset trees written straight from the reference formats (alma-casa.md §8), not with
``synth.py``.

``synth.py`` writes the trees of the other tests; if it and the readers shared a mistake, those
tests could not see it. The writers here are deliberately separate and minimal: each file is
spelled out as the reference describes it (archive layout §8.1, manifest §8.2, AQUA report §8.2,
weblog home page §8.3, calibration-script guard and CASA log §8.4), and every tree is resolved
through the installed command line, as ``casaspawner resolve DIR --json`` is run on the held-out
trees.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

PROJECT = "2019.1.00994.S"
OUS = "uid___A001_X1467_X29e"


def member_dir(root: Path, ous: str = OUS) -> Path:
    """§8.1: <project>/science_goal.uid___…/group.uid___…/member.uid___…/ with calibration,
    log, product, qa and script."""
    member = root / PROJECT / "science_goal.uid___A001_X1467_X29c" / "group.uid___A001_X1467_X29d"
    member = member / f"member.{ous}"
    for sub in ("calibration", "log", "product", "qa", "script"):
        (member / sub).mkdir(parents=True, exist_ok=True)
    return member


def manifest(casa: str | None, pipeline: str | None) -> str:
    """§8.2: <piperesults name=oussid><ous name=oussid><casaversion/><pipeline_version/>…"""
    versions = (f'<casaversion name="{casa}"/>' if casa else "") + (
        f'<pipeline_version name="{pipeline}"/>' if pipeline else ""
    )
    return (
        f'<?xml version="1.0" ?>\n<piperesults name="{OUS}">\n  <ous name="{OUS}">\n    '
        f"{versions}\n"
        '    <procedure_name name="hifa_calimage"/>\n'
        f'    <session name="session_1"><asdm name="uid___A002_Xe44309_X7d94"/></session>\n'
        f'    <weblog name="{OUS}.hifa_calimage.weblog.tgz"/>\n  </ous>\n</piperesults>\n'
    )


def aquareport(casa: str, pipeline: str) -> str:
    """§8.2: root PipelineAquaReport, text elements QaSummary/CasaVersion and
    QaSummary/PipelineVersion."""
    return (
        "<?xml version='1.0' encoding='UTF-8'?>\n<PipelineAquaReport>\n  <QaSummary>\n"
        f"    <CasaVersion>{casa}</CasaVersion>\n    "
        f"<PipelineVersion>{pipeline}</PipelineVersion>\n"
        "  </QaSummary>\n</PipelineAquaReport>\n"
    )


def home_page(casa: str, pipeline: str) -> str:
    """§8.3: t1-1.html, rows "PPR ID", "Pipeline Version", "Pipeline Recipe", "CASA Version"."""
    return (
        "<html><body><table>\n"
        "<tr><th>PPR ID</th><td>PPR_uid___A001_X1467_X2a0.xml</td></tr>\n"
        f'<tr><th>Pipeline Version</th><td>{pipeline} (<a href="#">documentation</a>)</td></tr>\n'
        "<tr><th>Pipeline Recipe</th><td>hifa_calimage</td></tr>\n"
        f'<tr><th>CASA Version</th><td>{casa} (<a href="#">environment</a>)</td></tr>\n'
        "</table></body></html>\n"
    )


def guard(version: str) -> str:
    """§8.4: the guard opening a manual uid___….ms.scriptForCalibration.py."""
    return (
        "import re\n\n"
        f"if re.search('^{version}', casadef.casa_version) == None:\n"
        " sys.exit('ERROR: PLEASE USE THE SAME VERSION OF CASA THAT YOU USED FOR GENERATING THE "
        f"SCRIPT: {version}')\n"
    )


def packed(path: Path, members: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def resolve(target: Path) -> tuple[int, dict[str, object] | None, str]:
    result = subprocess.run(
        [sys.executable, "-m", "casaspawner", "resolve", str(target), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr
    return (
        result.returncode,
        json.loads(result.stdout) if result.returncode == 0 else None,
        result.stderr,
    )


# name -> (files relative to the member directory, expected (casa, pipeline, exact, kind), reason
# fragments)
TREES: dict[str, tuple[dict[str, str], tuple[str, str | None, bool, str], tuple[str, ...]]] = {
    "cycle2-manual": (
        {"script/uid___A002_X8081ba_X4e8.ms.scriptForCalibration.py": guard("4.2.2")},
        ("4.2.2", None, True, "script"),
        ("is that build",),
    ),
    "cycle1-manual-series": (
        {"script/uid___A002_X6.ms.scriptForCalibration.py": guard("4.2")},
        ("4.2.2", None, True, "script"),
        ("its newest 4.2.x build",),
    ),
    "cycle4-manual-470": (
        {"script/uid___A002_Xb.ms.scriptForCalibration.py": guard("4.7.0")},
        ("4.7.0", "r38377", True, "script"),
        (),
    ),
    "cycle2-first-build": (
        {
            "qa/pipeline-20141001T120000/html/t1-1.html": home_page(
                "4.2.2-REL5 (r30721)", "30594M (Pipeline-Cycle2-R1-B)"
            )
        },
        ("4.2.2", "r31667", False, "weblog"),
        ("r30594", "never published", "CASA 4.2.2 (pipeline r31667)"),
    ),
    "cycle4-weblog": (
        {
            "qa/pipeline-20170501T120000/html/t1-1.html": home_page(
                "4.7.2-REL (r39762)", "39732M (Pipeline-Cycle4-R2-B)"
            )
        },
        ("4.7.2", "r39732", True, "weblog"),
        ("is that exact build",),
    ),
    "cycle7-initial-build": (
        {
            "script/member.uid___A001_X1467_X29e.hifa_calimage.pipeline_manifest.xml": manifest(
                "5.6.1-8", "42833M (Pipeline-CASA56-P1-B)"
            )
        },
        ("5.6.1-8", "r42866", False, "manifest"),
        ("r42833", "never published", "CASA 5.6.1-8 (pipeline r42866)"),
    ),
    "cycle10-casa-differs": (
        {
            "script/member.uid___A001_X1467_X29e.pipeline_manifest.xml": manifest(
                "6.5.4.10", "2023.1.0.124"
            )
        },
        ("6.5.4-9", "2023.1.0.124", False, "manifest"),
        ("CASA 6.5.4-10", "with CASA 6.5.4-9", "not the exact build"),
    ),
    "cycle12-patch2": (
        {
            "script/member.uid___A001_X1467_X29e.pipeline_manifest.xml": manifest(
                "6.6.6.18", "2025.1.0.37"
            )
        },
        ("6.6.6-18", "2025.1.0.36", False, "manifest"),
        ("never published",),
    ),
    "manual-4.5.4": (
        {"script/uid___A002_X1.ms.scriptForCalibration.py": guard("4.5.4")},
        ("4.5.3", "r36660", False, "script"),
        ("only older builds of CASA 4.5", "the newest of them, CASA 4.5.3"),
    ),
    "manual-5.6.2": (
        {"script/uid___A002_X1.ms.scriptForCalibration.py": guard("5.6.2")},
        ("5.6.1-8", "r42866", False, "script"),
        ("only older builds of CASA 5.6",),
    ),
    "vla-6.1.3": (
        {
            "script/member.uid___A001_X1467_X29e.pipeline_manifest.xml": manifest(
                "6.1.3.3", "2021.1.1.3"
            )
        },
        ("6.1.1-15", "2020.1.0.40", False, "manifest"),
        ("VLA/VLASS", "only older builds of CASA 6.1", "CASA 6.1.1-15 (pipeline 2020.1.0.40)"),
    ),
    "weblog-unreadable-pipeline": (
        # Packed below.
        {},
        ("6.2.1-7", "2021.2.0.128", False, "weblog"),
        ("cannot be read ('2021.2.0.128+r42xyz/PIPE-1')", "CASA 6.2.1-7", "not the exact build"),
    ),
    "aqua-unknown-pipeline": (
        {"qa/uid___A001_X1467_X29e.pipeline_aquareport.xml": aquareport("6.4.1.12", "unknown")},
        ("6.4.1-12", "2022.2.0.68", False, "aquareport"),
        ("cannot be read ('unknown')",),
    ),
    "log-only": (
        {
            "log/casa-20170502-101010.log": "2017-05-02 10:10:10\tINFO\t::casa\tCASA Version "
            "4.7.2-REL (r39762)\n"
        },
        ("4.7.2", "r39732", True, "casalog"),
        (),
    ),
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_reference_trees_resolve_by_almas_rule(tmp_path: Path, name: str) -> None:
    files, (casa, pipeline, exact, kind), fragments = TREES[name]
    member = member_dir(tmp_path)
    for relative, text in files.items():
        (member / relative).parent.mkdir(parents=True, exist_ok=True)
        (member / relative).write_text(text)
    if name == "weblog-unreadable-pipeline":
        page = home_page("6.2.1.7", "2021.2.0.128+r42xyz/PIPE-1").encode()
        packed(
            member / "qa" / f"{OUS}.hifa_calimage.weblog.tgz",
            [("pipeline-20211101T000000/html/t1-1.html", page)],
        )
    code, data, stderr = resolve(tmp_path / PROJECT)
    assert code == 0, stderr
    assert data is not None
    assert (data["casa"], data["pipeline"], data["exact"]) == (casa, pipeline, exact)
    evidence = data["evidence"]
    assert isinstance(evidence, dict) and evidence["kind"] == kind
    reason = str(data["reason"])
    assert reason.endswith(".") and "\n" not in reason
    for fragment in fragments:
        assert fragment in reason
    if not exact:
        # The reason never calls a build that is not exact "that exact build".
        assert "that exact build" not in reason and "is that build" not in reason


def test_a_cycle0_build_without_a_tarball_is_refused_in_one_sentence(tmp_path: Path) -> None:
    member = member_dir(tmp_path, "uid___A002_X1d54a1_X5")
    (member / "script" / "uid___A002_X1.ms.scriptForCalibration.py").write_text(guard("3.3"))
    code, _, stderr = resolve(tmp_path / PROJECT)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "CASA 3.3.0 has no public distribution" in stderr and "yet" not in stderr


class Zeros:
    """``size`` zero bytes, read in pieces (so a bomb never sits in the test's memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def test_a_decompression_bomb_is_refused_quickly_and_the_next_evidence_decides(
    tmp_path: Path,
) -> None:
    member = member_dir(tmp_path)
    archive = member / "qa" / f"{OUS}.hifa_calimage.weblog.tgz"
    page = home_page("6.5.4.9", "2023.1.0.124").encode()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("pipeline-20231015T120000/html/stage1/big.bin")
        # 256 MiB of zeros: about 256 KiB packed.
        info.size = 256 * 1024 * 1024
        tar.addfile(info, Zeros(info.size))  # type: ignore[arg-type]
        info = tarfile.TarInfo("pipeline-20231015T120000/html/t1-1.html")
        info.size = len(page)
        tar.addfile(info, io.BytesIO(page))
    assert archive.stat().st_size < 8 * 1024 * 1024
    started = time.monotonic()
    code, _, stderr = resolve(tmp_path / PROJECT)
    assert code == 2 and "unpacks to more than 64 MiB, too much to read as evidence" in stderr
    assert time.monotonic() - started < 20
    (member / "log" / "casa-20231015-120000.log").write_text(
        "CASA Version 6.5.4.9 -- Common Astronomy Software\n"
    )
    code, data, _ = resolve(tmp_path / PROJECT)
    assert code == 0 and data is not None
    evidence = data["evidence"]
    assert isinstance(evidence, dict) and evidence["kind"] == "casalog"
    assert evidence["path"].endswith(f"/member.{OUS}/log/casa-20231015-120000.log")


def test_an_oversized_archive_is_not_opened(tmp_path: Path) -> None:
    member = member_dir(tmp_path)
    with (member / "qa" / f"{OUS}.weblog.tgz").open("wb") as handle:
        # Sparse: takes no disk space.
        handle.truncate(5 * 1024**3)
    code, _, stderr = resolve(member)
    assert code == 2 and "is larger than 4 GiB, too large to read as evidence" in stderr


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", ""])
def test_a_weblog_of_plots_with_its_home_page_last_is_read(
    tmp_path: Path, compression: str
) -> None:
    member = member_dir(tmp_path)
    # The reader goes by content, not by name.
    archive = member / "qa" / f"{OUS}.hifa_calimage.weblog.tgz"
    page = home_page("6.6.1.17", "2024.1.0.8").encode()
    with tarfile.open(archive, f"w:{compression}" if compression else "w") as tar:
        for index in range(3):
            # Incompressible plots, as most of a weblog is.
            data = os.urandom(1024 * 1024)
            info = tarfile.TarInfo(f"pipeline-20241101T000000/html/stage{index}/plot.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("pipeline-20241101T000000/html/t1-1.html")
        info.size = len(page)
        tar.addfile(info, io.BytesIO(page))
    code, data, stderr = resolve(member)
    assert code == 0, stderr
    assert data is not None and (data["casa"], data["exact"]) == ("6.6.1-17", True)
    path = str(data["evidence"]["path"])  # type: ignore[index]
    assert path.endswith("!pipeline-20241101T000000/html/t1-1.html")

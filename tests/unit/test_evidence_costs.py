"""Hostile evidence files cost time linear in their size and never raise anything but a sentence.

The bounds are generous (seconds for what real files need milliseconds for): before the readers
were linear, the same inputs took minutes (a weblog page of repeated malformed tags, quadratic in
CPython's html.parser) or tens of seconds (a manifest with one huge attribute, quadratic in
expat before 2.6 when fed in small chunks).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from casaspawner.datasets.evidence import MANIFEST_VALUES, weblog_versions, xml_values
from casaspawner.datasets.synth import DatasetSpec, write_dataset

MiB = 1 << 20


@pytest.mark.parametrize("tag", ["<td", "<![", "<!--", "<a ", "<tr><td>", "</", "<!DOCTYPE"])
def test_a_weblog_page_of_repeated_malformed_tags_reads_in_linear_time(tag: str) -> None:
    page = (tag * (4 * MiB // len(tag))).encode()
    started = time.monotonic()
    assert weblog_versions(page) == (None, None)
    assert time.monotonic() - started < 5


def test_malformed_marked_sections_are_text_not_an_error() -> None:
    # html.parser raised AssertionError on "<![foo[": unknown status keyword in marked section.
    page = (
        b"<![foo[ x ]]><table><tr><th>CASA version</th><td>6.5.4.9</td></tr>"
        b"<![endif]><tr><th>Pipeline version</th><td>2023.1.0.124 <![xyz x</td></tr>"
    )
    assert weblog_versions(page)[0] == "6.5.4.9"


def test_a_weblog_cell_keeps_link_text_and_drops_comments() -> None:
    page = (
        b"<table><tr><th>CASA Version:</th><td>6.5.4.9 <a href='e'>(environment)</a>"
        b"<!-- 9.9.9 --></td></tr><tr><td>Pipeline Version</td><td>2023.1.0.124&#32;(doc)</td>"
    )
    assert weblog_versions(page) == ("6.5.4.9", "2023.1.0.124")


@pytest.mark.parametrize("size", [8 * MiB, 31 * MiB])
def test_a_manifest_with_one_huge_attribute_reads_in_linear_time(size: int) -> None:
    huge = b"x" * size
    document = b'<piperesults><ous><casaversion name="' + huge + b'"/></ous></piperesults>'
    started = time.monotonic()
    assert xml_values(document, "m.xml", MANIFEST_VALUES)["pipeline_version"] is None
    assert time.monotonic() - started < 5


def test_the_cli_says_one_sentence_for_a_hostile_weblog(tmp_path: Path) -> None:
    member = write_dataset(tmp_path, spec=DatasetSpec(evidence=()))
    (member / "qa").mkdir(exist_ok=True)
    html = member / "qa" / "html"
    html.mkdir()
    (html / "t1-1.html").write_bytes(b"<![" * 100_000 + b"<!x" * 100_000)
    result = subprocess.run(
        [sys.executable, "-m", "casaspawner", "resolve", str(member)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

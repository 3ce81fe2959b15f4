from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from casaspawner.catalog.versions import (
    CasaVersion,
    normalize_casa,
    normalize_pipeline,
    parse_casa,
    pipeline_sort_key,
)
from casaspawner.errors import InvalidInput


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("6.5.4.9", "6.5.4-9"),
        ("6.5.4-9", "6.5.4-9"),
        (" 6.1.1.15 ", "6.1.1-15"),
        ("5.4.0-68", "5.4.0-68"),
        ("4.7.2-REL (r39762)", "4.7.2"),
        ("4.2.2-REL5 r30721/r30986", "4.2.2"),
        ("4.7.2", "4.7.2"),
        ("5.1.1-5.el7", "5.1.1-5"),
        ("6.4.1-12-py3.6", "6.4.1-12"),
        ("10.0.1.3", "10.0.1-3"),
        ("6.12.100-12345", "6.12.100-12345"),
    ],
)
def test_casa_versions_normalise(raw: str, expected: str) -> None:
    assert normalize_casa(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "6",
        "6.5",
        "6.5.4.9.1",
        "v6.5.4",
        "6.5.4-",
        "6.5.4 junk",
        "٦.٥.٤",
        "6.5.4." + "9" * 300,
    ],
)
def test_casa_versions_reject(raw: str) -> None:
    with pytest.raises(InvalidInput, match="CASA version"):
        normalize_casa(raw)


def test_partial_casa_versions_only_when_allowed() -> None:
    assert parse_casa("4.2", allow_partial=True) == CasaVersion(4, 2)
    assert parse_casa("4.2", allow_partial=True).satisfied_by(parse_casa("4.2.2"))
    assert not parse_casa("4.2", allow_partial=True).satisfied_by(parse_casa("4.3.1"))
    assert not parse_casa("5.4.0-68").satisfied_by(parse_casa("5.4.0-70"))
    assert parse_casa("5.4.0").satisfied_by(parse_casa("5.4.0-70"))


def test_casa_ordering() -> None:
    ordered = ["4.2.2", "4.7.2", "5.4.0-68", "5.4.0-70", "6.1.1-15", "6.10.0-1"]
    assert sorted(ordered, key=parse_casa) == ordered
    assert sorted(reversed(ordered), key=parse_casa) == ordered


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2023.1.0.124", "2023.1.0.124"),
        ("2023.1.0.124+dirty", "2023.1.0.124"),
        ("2024.1.0.8+abc1234-PIPE-1234", "2024.1.0.8"),
        ("42254M (Pipeline-CASA54-P1-B)", "r42254"),
        ("42030M", "r42030"),
        ("r42866", "r42866"),
        ("31667", "r31667"),
        ("2023.10.100.123456", "2023.10.100.123456"),
        ("42866M (Pipeline-CASA56-P1-B (patched))", "r42866"),
    ],
)
def test_pipeline_versions_normalise(raw: str, expected: str) -> None:
    assert normalize_pipeline(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "2023.1.0", "2023.1.0.124-dirty", "4225", "r422545", "Pipeline-CASA54", "2023.1.0.1 2"],
)
def test_pipeline_versions_reject(raw: str) -> None:
    with pytest.raises(InvalidInput, match="pipeline version"):
        normalize_pipeline(raw)


def test_pipeline_order_puts_svn_first() -> None:
    versions = ["2020.1.0.40", "r42254", "2023.1.0.124", "r31667", "2021.2.0.128"]
    assert sorted(versions, key=pipeline_sort_key) == [
        "r31667",
        "r42254",
        "2020.1.0.40",
        "2021.2.0.128",
        "2023.1.0.124",
    ]


casa_parts = st.tuples(
    st.integers(0, 99),
    st.integers(0, 999),
    st.integers(0, 999),
    st.one_of(st.none(), st.integers(0, 10**6)),
)


@given(casa_parts, st.sampled_from(["-", "."]))
def test_casa_roundtrip(parts: tuple[int, int, int, int | None], sep: str) -> None:
    major, minor, patch, build = parts
    text = f"{major}.{minor}.{patch}" + (f"{sep}{build}" if build is not None else "")
    version = parse_casa(text)
    assert (version.major, version.minor, version.patch, version.build) == parts
    assert normalize_casa(str(version)) == str(version)


@given(st.text(max_size=40))
def test_casa_parser_never_crashes(text: str) -> None:
    try:
        version = parse_casa(text, allow_partial=True)
    except InvalidInput as exc:
        assert "\n" not in str(exc)
    else:
        assert str(version)[0].isdigit()


@given(st.text(max_size=40))
def test_pipeline_parser_never_crashes(text: str) -> None:
    try:
        version = normalize_pipeline(text)
    except InvalidInput as exc:
        assert "\n" not in str(exc)
    else:
        assert version == normalize_pipeline(version)


@given(
    st.integers(2000, 2099),
    st.integers(0, 9),
    st.integers(0, 9),
    st.integers(0, 99999),
    st.text("abcdef0123456789", max_size=8),
)
def test_git_pipeline_roundtrip(year: int, cycle: int, minor: int, build: int, label: str) -> None:
    raw = f"{year}.{cycle}.{minor}.{build}" + (f"+{label}" if label else "")
    assert normalize_pipeline(raw) == f"{year}.{cycle}.{minor}.{build}"


# The reference patterns (shared/reference/alma-casa-catalog.yaml, identifier_regex), ASCII digits:
# every string they accept is a version here, with the same numbers.
REFERENCE_CASA = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:[-.](\d+))?", re.ASCII)
REFERENCE_GIT = re.compile(r"(\d{4})\.(\d+)\.(\d+)\.(\d+)(\+[\w.\-]+)?", re.ASCII)
REFERENCE_SVN = re.compile(r"r?(\d{5})M?(\s*\(.*\))?", re.ASCII)


@given(st.from_regex(REFERENCE_CASA, fullmatch=True).filter(lambda t: len(t) <= 200))
def test_every_reference_casa_version_parses(text: str) -> None:
    match = REFERENCE_CASA.fullmatch(text)
    assert match is not None
    version = parse_casa(text)
    major, minor, patch, build = match.groups()
    assert (version.major, version.minor, version.patch) == (int(major), int(minor), int(patch))
    assert version.build == (int(build) if build is not None else None)


@given(st.from_regex(REFERENCE_GIT, fullmatch=True) | st.from_regex(REFERENCE_SVN, fullmatch=True))
def test_every_reference_pipeline_version_normalises(text: str) -> None:
    git = REFERENCE_GIT.fullmatch(text)
    if git is not None:
        assert normalize_pipeline(text) == ".".join(str(int(part)) for part in git.groups()[:4])
    else:
        svn = REFERENCE_SVN.fullmatch(text)
        assert svn is not None and normalize_pipeline(text) == "r" + svn.group(1)

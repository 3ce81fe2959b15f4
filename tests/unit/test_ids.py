from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from casaspawner.datasets.ids import (
    ProjectCode,
    Uid,
    parse_identifier,
    parse_project_code,
    parse_uid,
)
from casaspawner.errors import InvalidInput

# The identifier patterns of the reference catalog (shared/reference/alma-casa-catalog.yaml), ASCII
# digits.
CATALOG_PROJECT = re.compile(r"(20\d\d)\.(\d|[A-Z])\.(\d{5})\.([A-Z]{1,3})", re.ASCII)
CATALOG_UID = re.compile(r"uid://A\d{3}/X([0-9a-fA-F]+)/X([0-9a-fA-F]+)", re.ASCII)
CATALOG_UID_SANITIZED = re.compile(r"uid___A\d{3}_X([0-9a-fA-F]+)_X([0-9a-fA-F]+)", re.ASCII)


def catalog_says_valid(text: str) -> bool:
    return any(p.fullmatch(text) for p in (CATALOG_UID, CATALOG_UID_SANITIZED, CATALOG_PROJECT))


@pytest.mark.parametrize(
    ("text", "period", "kind"),
    [
        ("2019.1.00994.S", "1", "S"),
        ("2011.0.00004.SV", "0", "SV"),
        ("2017.A.00014.S", "A", "S"),
        ("2017.1.01355.L", "1", "L"),
    ],
)
def test_project_codes(text: str, period: str, kind: str) -> None:
    code = parse_project_code(text)
    assert (code.period, code.type, str(code)) == (period, kind, text)
    assert code.is_ddt == period.isalpha()


@pytest.mark.parametrize(
    "text",
    [
        "2019.1.0994.S",
        "1999.1.00994.S",
        "2019.1.00994",
        "2019.1.00994.SVXX",
        "2019.1.00994.s",
        "2019.ab.00994.S",
    ],
)
def test_bad_project_codes(text: str) -> None:
    with pytest.raises(InvalidInput, match="expected one such as 2019.1.00994.S"):
        parse_project_code(text)


def test_uids_in_both_spellings() -> None:
    a = parse_uid("uid://A001/X1467/X29e")
    b = parse_uid("uid___A001_X1467_X29e")
    assert a == b == Uid("A001", "1467", "29e")
    assert str(a) == "uid://A001/X1467/X29e"
    assert a.sanitized == "uid___A001_X1467_X29e"


@pytest.mark.parametrize(
    "text",
    [
        "uid://A01/X1/X2",
        "uid://A001/1467/X29e",
        "uid://A001/X1467",
        "uid://A001/Xg/X1",
        "UID://A001/X1/X2",
        "uid___A001_X1467-X29e",
        "uid://A001/X1467/X29e/",
        "member.uid___A001_X1467_X29e",
        "uid://A001/X1/X2 x",
    ],
)
def test_bad_uids(text: str) -> None:
    with pytest.raises(InvalidInput, match="expected one such as uid://A001/X1467/X29e"):
        parse_uid(text)


def test_identifier_error_says_what_was_expected() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_identifier("M87 please")
    message = str(info.value)
    assert "'M87 please' is not an ALMA dataset identifier" in message
    assert (
        "2019.1.00994.S" in message and "uid://A001/X1467/X29e" in message and "\n" not in message
    )


@given(
    st.text(max_size=60)
    | st.from_regex(CATALOG_UID, fullmatch=True)
    | st.from_regex(CATALOG_UID_SANITIZED, fullmatch=True)
    | st.from_regex(CATALOG_PROJECT, fullmatch=True)
)
def test_parse_identifier_agrees_with_the_catalog_regexes(text: str) -> None:
    try:
        parsed = parse_identifier(text)
    except InvalidInput as exc:
        assert "\n" not in str(exc)
        assert not catalog_says_valid(text.strip())
    else:
        assert catalog_says_valid(text.strip())
        assert isinstance(parsed, ProjectCode | Uid)


@given(
    st.sampled_from(["A001", "A002", "A123"]),
    st.text("0123456789abcdefABCDEF", min_size=1, max_size=40),
    st.text("0123456789abcdefABCDEF", min_size=1, max_size=40),
)
def test_uid_roundtrip(archive: str, first: str, second: str) -> None:
    uid = parse_uid(f"uid://{archive}/X{first}/X{second}")
    assert parse_uid(uid.sanitized) == uid
    assert parse_identifier(str(uid)) == uid


def test_long_hex_parts_are_uids_as_the_reference_says() -> None:
    uid = parse_uid("uid://A001/X" + "f" * 40 + "/X29e")
    assert uid.sanitized == "uid___A001_X" + "f" * 40 + "_X29e"


@given(
    st.integers(2000, 2099),
    st.sampled_from(list("0123456789ABZ")),
    st.integers(0, 99999),
    st.sampled_from(["S", "L", "T", "SV", "V", "P"]),
)
def test_project_roundtrip(year: int, period: str, number: int, kind: str) -> None:
    text = f"{year}.{period}.{number:05d}.{kind}"
    assert str(parse_identifier(text)) == text

"""ALMA identifiers: project codes and archive uids.

A uid is written ``uid://A001/X1467/X29e`` or ``uid___A001_X1467_X29e``. Parsers follow the
reference patterns (shared/reference/alma-casa-catalog.yaml, ``identifier_regex``) with ASCII
digits. They match the whole string, and reject anything else with one sentence saying what was
expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from casaspawner.errors import InvalidInput

_PROJECT = re.compile(r"(20[0-9]{2})\.([0-9]|[A-Z])\.([0-9]{5})\.([A-Z]{1,3})")
_UID = re.compile(r"uid://(A[0-9]{3})/X([0-9a-fA-F]+)/X([0-9a-fA-F]+)")
_UID_SANITIZED = re.compile(r"uid___(A[0-9]{3})_X([0-9a-fA-F]+)_X([0-9a-fA-F]+)")
EXPECTED = (
    "expected an ALMA project code such as 2019.1.00994.S "
    "or an ALMA uid such as uid://A001/X1467/X29e "
    "(or uid___A001_X1467_X29e)"
)


@dataclass(frozen=True)
class ProjectCode:
    """An ALMA project code such as ``2019.1.00994.S``.

    Its parts are the year, the period, the number and the type. The period is a digit, or a letter
    for DDT. The type is S, L, T, V, P, SV and so on.
    """

    year: int
    period: str
    number: str
    type: str

    def __str__(self) -> str:
        return f"{self.year}.{self.period}.{self.number}.{self.type}"

    @property
    def is_ddt(self) -> bool:
        return self.period.isalpha()


@dataclass(frozen=True)
class Uid:
    """An ALMA archive uid.

    ``str()`` gives the ``uid://`` form, and ``sanitized`` the file-name form.
    """

    archive: str
    first: str
    second: str

    def __str__(self) -> str:
        return f"uid://{self.archive}/X{self.first}/X{self.second}"

    @property
    def sanitized(self) -> str:
        return f"uid___{self.archive}_X{self.first}_X{self.second}"


def parse_project_code(text: str) -> ProjectCode:
    match = _PROJECT.fullmatch(text.strip())
    if match is None:
        raise InvalidInput(
            f"{_shown(text)} is not an ALMA project code; expected one such as 2019.1.00994.S."
        )
    year, period, number, kind = match.groups()
    return ProjectCode(int(year), period, number, kind)


def parse_uid(text: str) -> Uid:
    stripped = text.strip()
    match = _UID.fullmatch(stripped) or _UID_SANITIZED.fullmatch(stripped)
    if match is None:
        raise InvalidInput(
            f"{_shown(text)} is not an ALMA uid; expected one such as uid://A001/X1467/X29e "
            "or uid___A001_X1467_X29e."
        )
    return Uid(*match.groups())


def parse_identifier(text: str) -> ProjectCode | Uid:
    """Parse a project code or a uid in either spelling.

    Anything else raises ``InvalidInput``.
    """
    stripped = text.strip()
    if _PROJECT.fullmatch(stripped):
        return parse_project_code(stripped)
    if _UID.fullmatch(stripped) or _UID_SANITIZED.fullmatch(stripped):
        return parse_uid(stripped)
    raise InvalidInput(f"{_shown(text)} is not an ALMA dataset identifier; {EXPECTED}.")


def looks_like_identifier(text: str) -> bool:
    """Tell whether ``text`` is shaped like an identifier rather than a path.

    This picks the resolver.
    """
    stripped = text.strip()
    return stripped.startswith(("uid:", "uid___")) or bool(
        re.fullmatch(r"20[0-9]{2}\.[0-9A-Z]\..*", stripped)
    )


def _shown(text: str) -> str:
    """Quote user input for an error sentence.

    Long input is shortened, and control characters are made visible.
    """
    shortened = text if len(text) <= 80 else text[:77] + "..."
    return repr(shortened)

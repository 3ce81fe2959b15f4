"""Normalise CASA and ALMA pipeline version strings found in datasets.

The strings are as the evidence in datasets writes them.

CASA builds are written ``X.Y.Z-B``. ``6.5.4.9`` and ``6.5.4-9`` are the same build, and
``4.7.2-REL (r39762)`` is ``4.7.2``.

Pipeline versions are ``YYYY.N.N.N`` for git-era builds, with PEP 440 local labels such as
``+dirty`` dropped. SVN-era builds are ``rNNNNN``: ``42254M (Pipeline-CASA54-P1-B)`` is ``r42254``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from casaspawner.errors import InvalidInput

# The reference patterns (shared/reference/alma-casa-catalog.yaml, ``identifier_regex``), with
# ASCII digits, since ``\d`` would accept other scripts' digits. Text longer than _MAX_TEXT is
# never a version.
_MAX_TEXT = 200
_CASA_CORE = re.compile(r"([0-9]+)\.([0-9]+)(?:\.([0-9]+))?(?:[-.]([0-9]+))?")
# What may follow the core in strings CASA printed itself.
_CASA_SUFFIX = re.compile(
    r"(?:\s*(?:-?REL[0-9]*|\(?r[0-9]+(?:/r[0-9]+)*\)?|\.el[0-9]+|-py[0-9]\.[0-9]+))*\s*"
)
_PIPELINE_GIT = re.compile(r"([0-9]{4})\.([0-9]+)\.([0-9]+)\.([0-9]+)(?:\+[A-Za-z0-9_.\-]+)?")
_PIPELINE_SERIES = re.compile(r"([0-9]{4})\.([0-9]+)\.([0-9]+)")
_PIPELINE_SVN = re.compile(r"r?([0-9]{5})M?(?:[ \t\n\r\f\v]*\(.*\))?")


@total_ordering
@dataclass(frozen=True)
class CasaVersion:
    """A CASA build number.

    ``patch`` is None for a series such as ``4.2``, as a script guard may name.
    """

    major: int
    minor: int
    patch: int | None = None
    build: int | None = None

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}"
        if self.patch is not None:
            text += f".{self.patch}"
        if self.build is not None:
            text += f"-{self.build}"
        return text

    @property
    def is_complete(self) -> bool:
        """True for an X.Y.Z version, with or without a build number."""
        return self.patch is not None

    def _key(self) -> tuple[int, int, int, int]:
        return (self.major, self.minor, self.patch or 0, self.build or 0)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, CasaVersion):
            return NotImplemented
        return self._key() < other._key()

    def satisfied_by(self, build: CasaVersion) -> bool:
        """Tell whether ``build`` is this version.

        For a partial version, any build of its series satisfies it.
        """
        if (build.major, build.minor) != (self.major, self.minor):
            return False
        if self.patch is not None and build.patch != self.patch:
            return False
        return self.build is None or build.build == self.build


def parse_casa(text: str, *, allow_partial: bool = False) -> CasaVersion:
    """Parse a CASA version string as found in dataset evidence.

    The string is as printed by CASA, a manifest, a weblog or a script guard.

    >>> str(parse_casa("6.5.4.9")), str(parse_casa("4.7.2-REL (r39762)"))
    ('6.5.4-9', '4.7.2')
    """
    stripped = text.strip()
    match = _CASA_CORE.match(stripped) if len(stripped) <= _MAX_TEXT else None
    if match is None or _CASA_SUFFIX.fullmatch(stripped[match.end() :]) is None:
        raise InvalidInput(
            f"{text!r} is not a CASA version; expected a build such as 6.5.4-9 or 6.5.4.9."
        )
    major, minor, patch, build = match.groups()
    if patch is None:
        if build is not None or not allow_partial:
            raise InvalidInput(
                f"{text!r} is not a complete CASA version; expected a build such as 6.5.4-9."
            )
        return CasaVersion(int(major), int(minor))
    return CasaVersion(
        int(major), int(minor), int(patch), int(build) if build is not None else None
    )


def normalize_casa(text: str) -> str:
    """Return the canonical ``X.Y.Z[-B]`` spelling of a complete CASA version."""
    return str(parse_casa(text))


def normalize_pipeline(text: str) -> str:
    """Return the canonical pipeline version: ``2023.1.0.124`` or ``r42254``.

    >>> normalize_pipeline("2023.1.0.124+dirty")
    '2023.1.0.124'
    >>> normalize_pipeline("42254M (Pipeline-CASA54-P1-B)")
    'r42254'
    """
    stripped = text.strip() if len(text) <= _MAX_TEXT else ""
    git = _PIPELINE_GIT.fullmatch(stripped)
    if git is not None:
        return ".".join(str(int(part)) for part in git.groups())
    svn = _PIPELINE_SVN.fullmatch(stripped)
    if svn is not None:
        return f"r{svn.group(1)}"
    raise InvalidInput(
        f"{text!r} is not an ALMA pipeline version; "
        "expected a build such as 2023.1.0.124 or r42254."
    )


def is_pipeline_series(text: str) -> bool:
    """Tell whether ``text`` names a pipeline series without a build number.

    Planned releases name such a series, e.g. ``2026.2.0``.
    """
    return _PIPELINE_SERIES.fullmatch(text) is not None


def pipeline_sort_key(version: str) -> tuple[int, ...]:
    """Sort key ordering normalised pipeline versions.

    SVN builds come before git builds, each ordered numerically.
    """
    if version.startswith("r"):
        return (0, int(version[1:]))
    return (1, *(int(part) for part in version.split(".")))

"""The one family of errors a user or operator can cause.

Every message is a single sentence meant for a person: spawners turn these into ``SpawnException``
(a form/progress-page message), the CLI prints them on stderr and exits 2.
"""

from __future__ import annotations

#: Longest user-given text an error sentence repeats in full.
SHOWN_LIMIT = 240


class CasaspawnerError(Exception):
    """Base class: ``str(error)`` is one user-facing sentence."""


class InvalidInput(CasaspawnerError):
    """A value given by a user (identifier, option, path) is not acceptable."""


class NoSuchDataset(InvalidInput):
    """A dataset path names no directory (where a reader looked)."""


class CatalogError(CasaspawnerError):
    """The release catalog is malformed, or a release asked for does not exist."""


class ResolutionError(CasaspawnerError):
    """Nothing in a dataset tells which CASA build processed it, or no build can be chosen."""


class VersionUnknown(ResolutionError):
    """One dataset was found, but it tells no CASA version a session can run (no evidence, unreadable evidence,
    or a version with no public build): the user's own choice of release is the way on.

    ``finding`` says what was found, ``advice`` what to do; ``str()`` is the one sentence made of both.
    """

    def __init__(self, finding: str, advice: str = "choose a CASA release yourself") -> None:
        self.finding = finding.rstrip(" .;")
        self.advice = advice
        super().__init__(f"{self.finding}; {advice}." if advice else f"{self.finding}.")


class ArchiveUnavailable(CasaspawnerError):
    """The ALMA archive could not be reached or did not have what was asked for."""


def printable(text: str) -> str:
    """``text`` with its control (and other unprintable) characters escaped, so it prints on one line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(text: str) -> str:
    """User-given text (a path, a name) for an error sentence: as given when short and printable, else
    with control characters escaped and the middle left out, so a sentence stays one readable line."""
    escaped = printable(text)
    if len(escaped) <= SHOWN_LIMIT:
        return escaped
    return f"{escaped[: SHOWN_LIMIT // 2]}…{escaped[-SHOWN_LIMIT // 4 :]} ({len(text)} characters)"

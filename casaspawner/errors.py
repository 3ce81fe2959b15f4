"""The one family of errors a user or operator can cause.

Every message is a single sentence meant for a person. Spawners turn these into
``SpawnException``, a message on the form or progress page. The CLI prints them on stderr and
exits 2.
"""

from __future__ import annotations

#: Longest user-given text an error sentence repeats in full.
SHOWN_LIMIT = 240


class CasaspawnerError(Exception):
    """Base class of every error a user or operator can cause.

    ``str(error)`` is one user-facing sentence.
    """


class InvalidInput(CasaspawnerError):
    """A value given by a user is not acceptable.

    The value is an identifier, an option or a path.
    """


class NoSuchDataset(InvalidInput):
    """A dataset path names no directory where a reader looked."""


class CatalogError(CasaspawnerError):
    """The release catalog is malformed, or a requested release does not exist."""


class ResolutionError(CasaspawnerError):
    """No CASA build can be chosen for a dataset.

    Either nothing in the dataset tells which CASA build processed it, or no build fits.
    """


class VersionUnknown(ResolutionError):
    """A dataset names no CASA version a session can run.

    One dataset was found, but it has no evidence, its evidence cannot be read, or the version has
    no public build. The way on is the user's own choice of release.

    ``finding`` says what was found and ``advice`` what to do. ``str()`` is the one sentence made
    of both.
    """

    def __init__(self, finding: str, advice: str = "choose a CASA release yourself") -> None:
        self.finding = finding.rstrip(" .;")
        self.advice = advice
        super().__init__(f"{self.finding}; {advice}." if advice else f"{self.finding}.")


class ConfigurationError(CasaspawnerError):
    """An operator's setting cannot work.

    The sentence names the option. Nothing the user chose causes it, so spawners show it as the
    hub's fault, with status 500.
    """

    def __init__(self, detail: str) -> None:
        detail = detail.rstrip(".")
        first = detail.split(" ", 1)[0]
        # A sentence of its own, like "The storage volume …", continues this one.
        # An option name stays as it is.
        if first.istitle() and "." not in first:
            detail = detail[0].lower() + detail[1:]
        super().__init__(f"The hub's configuration is invalid: {detail}.")


class ReleaseBlocked(CasaspawnerError):
    """The operators drained a release, so it may not start now."""


class StorageUnavailable(CasaspawnerError):
    """The users' storage did not answer the hub in time."""


class ArchiveUnavailable(CasaspawnerError):
    """The ALMA archive was unreachable, or lacked what was asked for."""


def printable(text: str) -> str:
    """Return ``text`` with unprintable characters escaped, so it prints on one line.

    Control characters are among those escaped.
    """
    return (
        text
        if text.isprintable()
        else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    )


def shown(text: str) -> str:
    """Return user-given text fit for an error sentence.

    The text is a path or a name, for example. Control characters are escaped. Text still longer
    than ``SHOWN_LIMIT`` characters loses its middle, so a sentence stays one readable line.
    """
    escaped = printable(text)
    if len(escaped) <= SHOWN_LIMIT:
        return escaped
    head, tail = escaped[: SHOWN_LIMIT // 2], escaped[-SHOWN_LIMIT // 4 :]
    return f"{head}…{tail} ({len(text)} characters)"

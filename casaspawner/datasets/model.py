"""What the resolver reads from a dataset and what it decides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from casaspawner.catalog.model import Release

#: Kinds of evidence.
#:
#: ``none`` means nothing in the dataset tells a version, and the user chose the release. Only
#: spawners use it.
EvidenceKind = Literal[
    "manifest", "aquareport", "weblog", "script", "casalog", "archive-manifest", "none"
]

#: ALMA's order of trust for the evidence kinds found in a dataset.
EVIDENCE_ORDER: tuple[EvidenceKind, ...] = (
    "manifest",
    "aquareport",
    "weblog",
    "script",
    "casalog",
)


@dataclass(frozen=True)
class Evidence:
    """One statement of a processing version, found in one file.

    ``casa`` and ``pipeline`` are normalised. ``pipeline`` is None for manual data. ``casa`` may be
    a series such as ``4.2`` when a manual script's guard accepts any 4.2.x.

    ``path`` is the file, relative to the dataset directory given by the user. For a packed weblog
    it is ``archive.tgz!member``.

    ``pipeline_unreadable`` is the pipeline version as written, shortened, when the file names one
    that is not a pipeline version. ``pipeline`` is then None.

    ``sha256`` is the file's digest when the hub holds the file itself: the archive's manifest.
    The session hashes files in the user's storage.
    """

    kind: EvidenceKind
    path: str
    casa: str | None
    pipeline: str | None
    pipeline_unreadable: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Resolution:
    """The release a dataset should run with, following ALMA's rule, and why."""

    dataset: str
    evidence: Evidence
    release: Release
    exact: bool
    reason: str

    @property
    def processed_with(self) -> dict[str, str | None]:
        return {"casa": self.evidence.casa, "pipeline": self.evidence.pipeline}

    def to_json(self, image: str) -> dict[str, object]:
        """Exactly the keys ``casaspawner resolve --json`` prints."""
        return {
            "processed_with": self.processed_with,
            "release": self.release.id,
            "casa": self.release.casa,
            "pipeline": self.release.pipeline,
            "image": image,
            "exact": self.exact,
            "evidence": {"kind": self.evidence.kind, "path": self.evidence.path},
            "reason": self.reason,
        }

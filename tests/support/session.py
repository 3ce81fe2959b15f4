"""A plain backend for the session pipeline: the steps a spawner supplies, without a hub."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from casaspawner.catalog.model import Catalog, Release
from casaspawner.datasets.model import Resolution
from casaspawner.datasets.worker import resolve_in_worker
from casaspawner.plan import Identity, Substitution
from casaspawner.session.measures import measures_for
from casaspawner.session.readers import DatasetReader, LocalDirectoryReader
from casaspawner.session.relaunch import PastSession


@dataclass
class Backend:
    """The steps a spawner supplies, as a plain object: runs as uid 1000, reads local paths."""

    catalog: Catalog
    substitute_with: str | None = None
    blocked: dict[str, str] = field(default_factory=dict)
    past: list[PastSession] = field(default_factory=list)
    #: A measures volume kept by version, as the hub sees it; None reads it whole.
    measures_root: Path | None = None
    calls: list[str] = field(default_factory=list)

    async def session_identity(self) -> Identity:
        self.calls.append("identity")
        return Identity("alice", 1000, 1000)

    def get_dataset_reader(self) -> DatasetReader | None:
        return LocalDirectoryReader()

    async def kept_resolution(
        self, reader: DatasetReader, text: str, identity: Identity
    ) -> Resolution | None:
        # Keeps nothing: every dataset is read.
        return None

    async def read_dataset(self, target: Path | str, label: str, identity: Identity) -> Resolution:
        self.calls.append("read")
        return await resolve_in_worker(target, label, self.catalog)

    def resolved(self, resolution: Resolution) -> None:
        self.calls.append(f"resolved {resolution.release.id}")

    async def substitute(self, release: Release) -> Substitution | None:
        self.calls.append(f"substitute {release.id}")
        if self.substitute_with is None:
            return None
        return Substitution(self.catalog.get(self.substitute_with), "This machine cannot run it")

    async def blocked_release_messages(self) -> Mapping[str, str]:
        self.calls.append("blocked")
        return self.blocked

    def past_session(self, name: str) -> PastSession | None:
        self.calls.append(f"past {name}")
        return next((p for p in self.past if p.name == name), None)

    async def measures_version(self, earlier: str | None) -> str | None:
        self.calls.append(f"measures {earlier}")
        return None if self.measures_root is None else measures_for(self.measures_root, earlier)

"""Past sessions a user can relaunch exactly: same dataset, options, build and digest.

The spawner keeps the last few in its state (the hub's database), each with the sha256 of the
image (Kubernetes, from the pod's status) or environment (one machine, its package list) that
ran, the measures version it read (where the measures are kept by version) and the name of its
reproducibility record. The form offers them; a spawn request naming one (``relaunch``) runs the
same release again, by that digest, on those measures, or is refused with one sentence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from casaspawner.errors import InvalidInput
from casaspawner.plan import MEASURES_VERSION, SessionPlan

#: The spawn option naming a past session.
RELAUNCH_KEY = "relaunch"
#: Past sessions kept per server.
HISTORY_LIMIT = 10
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class PastSession:
    """A session that ran, as the spawn form offers it again."""

    #: The record's name, ``<UTC start>-<dataset>``: the choice the form sends.
    name: str
    started: str
    dataset: str
    interface: str
    size: str
    release: str
    label: str
    #: The sha256 of the image or environment that ran.
    sha256: str
    #: The measures volume's version directory it read; empty when it read the whole volume.
    measures: str = ""

    @classmethod
    def from_plan(
        cls, plan: SessionPlan, name: str, started: datetime, sha256: str
    ) -> PastSession:
        """The past session of ``plan``, which ran ``sha256``."""
        return cls(
            name,
            started.strftime("%Y-%m-%d %H:%M UTC"),
            plan.options.dataset,
            plan.interface,
            plan.options.size,
            plan.release.id,
            plan.release.label,
            sha256,
            plan.measures_version or "",
        )

    @classmethod
    def from_state(cls, saved: Any) -> PastSession | None:
        """A past session as the spawner's state saved it; None when it is not one."""
        if not isinstance(saved, Mapping):
            return None
        # Sessions remembered before measures were versioned have no ``measures``.
        try:
            past = cls(**{key: saved[key] for key in cls.__dataclass_fields__ if key in saved})
        except TypeError:
            return None
        texts = all(isinstance(getattr(past, key), str) for key in cls.__dataclass_fields__)
        if not texts or not _NAME.fullmatch(past.name) or not _SHA256.fullmatch(past.sha256):
            return None
        if past.measures and not MEASURES_VERSION.fullmatch(past.measures):
            return None
        return past

    def as_state(self) -> dict[str, str]:
        return asdict(self)

    def options(self, with_release: bool) -> dict[str, str]:
        """The spawn options that ran; the release only where users may choose one."""
        chosen = {"dataset": self.dataset, "interface": self.interface, "size": self.size}
        return {**chosen, "release": self.release} if with_release else chosen

    @property
    def title(self) -> str:
        """How the form lists it."""
        return (
            f"{self.started} · {self.label} · {self.interface} · {self.dataset} · "
            f"sha256:{self.sha256[:12]}"
        )


def remember(history: Sequence[PastSession], past: PastSession) -> list[PastSession]:
    """``past`` first, then the others, at most ``HISTORY_LIMIT``."""
    return [past, *(p for p in history if p.name != past.name)][:HISTORY_LIMIT]


def relaunch_choice(user_options: Mapping[str, Any]) -> str | None:
    """The past session a spawn request names, checked for shape; None when it names none."""
    value = user_options.get(RELAUNCH_KEY)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidInput("The session to relaunch must be one of your past sessions' names.")
    return value


def relaunch_refusal(past: PastSession, plan: SessionPlan) -> str | None:
    """Why ``plan`` would not relaunch ``past`` exactly, in one sentence; None if it would."""
    if plan.release.id == past.release:
        return None
    return (
        f"That session ran {past.label}, and this hub would now run {plan.release.label} for "
        "its dataset, so it cannot be relaunched exactly; start a new session instead."
    )


def environment_refusal(plan: SessionPlan, digest: str) -> str | None:
    """Why a relaunch cannot run an environment whose packages now hash to ``digest``."""
    if plan.options.pin is None or plan.options.pin == digest:
        return None
    return (
        f"The {plan.release.label} environment on this machine has changed since that session "
        "(its packages differ), so it cannot be relaunched exactly; start a new session instead."
    )

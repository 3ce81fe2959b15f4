"""Pure logic of the casa-sessions service: running sessions grouped by release and dataset, and notices.

Input is what the hub's REST API returns (``GET /hub/api/users?state=active``: user models whose
``servers`` hold ``user_options``, ``started`` and ``last_activity``); nothing here does I/O, so the page,
the JSON API and the tests share one implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from casaspawner.catalog.model import Catalog, Release
from casaspawner.services.state import ReleaseState

UNKNOWN_RELEASE = "unknown"


@dataclass(frozen=True)
class Session:
    """One running (or starting) server as the operators see it."""

    user: str
    server: str
    release_id: str
    release_label: str
    dataset: str
    interface: str
    profile: str
    started: datetime | None
    last_activity: datetime | None
    ready: bool

    def age(self, now: datetime) -> timedelta | None:
        return now - self.started if self.started else None

    def idle(self, now: datetime) -> timedelta | None:
        return now - self.last_activity if self.last_activity else None


@dataclass
class DatasetGroup:
    dataset: str
    sessions: list[Session] = field(default_factory=list)


@dataclass
class ReleaseGroup:
    release_id: str
    label: str
    state: ReleaseState
    datasets: list[DatasetGroup] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(group.sessions) for group in self.datasets)


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 timestamp from the hub API (``...Z`` or with an offset) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def release_of(options: Mapping[str, Any], catalog: Catalog) -> Release | None:
    """The release a server runs, from its ``user_options``.

    Uses ``casa_release`` when the spawner records it, else the release whose label starts the ``profile``
    summary (the plan's summary begins with ``Release.label``, which includes the pipeline version), else the
    only release with that ``casa_version``.
    """
    release_id = options.get("casa_release")
    if isinstance(release_id, str) and release_id in catalog:
        return catalog.get(release_id)
    profile = options.get("profile")
    if isinstance(profile, str):
        matches = [r for r in catalog.releases if profile.startswith(r.label + " ·")]
        if matches:
            return max(matches, key=lambda r: len(r.label))
    casa = options.get("casa_version")
    if isinstance(casa, str):
        same = [r for r in catalog.releases if r.casa == casa]
        if len(same) == 1:
            return same[0]
    return None


def sessions_from_users(users: Iterable[Mapping[str, Any]], catalog: Catalog) -> list[Session]:
    """Every server with ``started`` or ``pending`` set, from hub user models."""
    sessions: list[Session] = []
    for user in users:
        for server_name, server in (user.get("servers") or {}).items():
            if not isinstance(server, Mapping) or not (server.get("started") or server.get("pending")):
                continue
            options = server.get("user_options") or {}
            release = release_of(options, catalog)
            casa = options.get("casa_version")
            sessions.append(
                Session(
                    user=str(user.get("name")),
                    server=str(server_name or ""),
                    release_id=release.id if release else UNKNOWN_RELEASE,
                    release_label=(
                        release.label if release else (f"CASA {casa}" if casa else "Not a CASA session")
                    ),
                    dataset=str(options.get("dataset") or "—"),
                    interface=str(options.get("interface") or "—"),
                    profile=str(options.get("profile") or ""),
                    started=parse_time(server.get("started")),
                    last_activity=parse_time(server.get("last_activity") or user.get("last_activity")),
                    ready=bool(server.get("ready")),
                )
            )
    return sessions


def group_sessions(sessions: Iterable[Session], states: Mapping[str, ReleaseState]) -> list[ReleaseGroup]:
    """Sessions grouped by release (largest group first), then by dataset; oldest session first."""
    by_release: dict[str, ReleaseGroup] = {}
    for session in sessions:
        group = by_release.setdefault(
            session.release_id,
            ReleaseGroup(
                session.release_id, session.release_label, states.get(session.release_id, ReleaseState())
            ),
        )
        dataset = next((d for d in group.datasets if d.dataset == session.dataset), None)
        if dataset is None:
            dataset = DatasetGroup(session.dataset)
            group.datasets.append(dataset)
        dataset.sessions.append(session)
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    for group in by_release.values():
        group.datasets.sort(key=lambda d: d.dataset)
        for dataset in group.datasets:
            dataset.sessions.sort(key=lambda s: (s.started or epoch, s.user))
    return sorted(by_release.values(), key=lambda g: (-g.count, g.label))


def format_duration(delta: timedelta | None) -> str:
    """``3 d 4 h``, ``2 h 05 min``, ``7 min``, ``40 s``; ``—`` when unknown."""
    if delta is None:
        return "—"
    seconds = max(int(delta.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


@dataclass(frozen=True)
class CullPolicy:
    """The idle culler's timeout and how long before it users are warned (seconds; 0 timeout = no culling)."""

    timeout: int = 0
    warn_before: int = 600

    def cull_time(self, session: Session, now: datetime) -> datetime | None:
        """When the culler will stop this idle session, if that is close enough to warn about; else None."""
        idle = session.idle(now)
        if self.timeout <= 0 or idle is None or session.last_activity is None:
            return None
        if idle.total_seconds() < max(self.timeout - self.warn_before, 0):
            return None
        return session.last_activity + timedelta(seconds=self.timeout)

    def warning(self, session: Session, now: datetime) -> str | None:
        """The in-session warning for an idle session close to its cull time, else None."""
        cull_at = self.cull_time(session, now)
        if cull_at is None or session.last_activity is None:
            return None
        return (
            f"This session has been idle since {session.last_activity:%H:%M} UTC and will be stopped at about "
            f"{cull_at:%H:%M} UTC (after {format_duration(timedelta(seconds=self.timeout))} without activity) "
            "unless you use it. Save your work; files in your home and project directories are kept."
        )


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def notices_for(
    username: str,
    sessions: Iterable[Session],
    states: Mapping[str, ReleaseState],
    policy: CullPolicy,
    now: datetime,
) -> list[dict[str, str]]:
    """Notices for one user's running sessions: drained releases and upcoming idle culls.

    Each notice has the ``server`` it is for, its ``kind`` (``drain``, ``cull``), a ``title`` short enough for
    a notification (at most 140 characters) and the full ``text``.
    """
    notices: list[dict[str, str]] = []
    for session in sessions:
        if session.user != username:
            continue
        state = states.get(session.release_id)
        if state is not None and state.drained:
            text = (
                f"{session.release_label}, which this session runs, is being drained by the operators"
                + (f": {_sentence(state.message)}" if state.message else ".")
                + " This session keeps running; new sessions of this release cannot be started, so save your"
                " work and start your next session with another release."
            )
            title = f"{session.release_label} is being drained: save your work; new sessions need another release."
            notices.append({"server": session.server, "kind": "drain", "title": title, "text": text})
        warning = policy.warning(session, now)
        cull_at = policy.cull_time(session, now)
        if warning and cull_at is not None:
            title = f"This idle session will be stopped at about {cull_at:%H:%M} UTC unless you use it."
            notices.append({"server": session.server, "kind": "cull", "title": title, "text": warning})
    return notices

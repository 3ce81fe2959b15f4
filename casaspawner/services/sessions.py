"""Pure logic of the casa-sessions service: grouped running sessions, and notices.

Running sessions are grouped by release and dataset. Input is what the hub's REST API returns for
``GET /hub/api/users?state=active``: user models whose ``servers`` hold ``user_options``,
``started`` and ``last_activity``. Nothing here does I/O, so the page, the JSON API and the tests
share one implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from casaspawner.catalog.model import Catalog, Release
from casaspawner.services.state import ReleaseState
from casaspawner.session.options import OUTPUT_KEY

UNKNOWN_RELEASE = "unknown"


@dataclass(frozen=True)
class Session:
    """One running or starting server as the operators see it."""

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
    """Parse an ISO 8601 timestamp from the hub API as an aware datetime.

    The timestamp ends in ``Z`` or has an offset. Anything else gives None.
    """
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def session_output(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """What a CASA spawner recorded for a running server in its ``user_options``."""
    output = options.get(OUTPUT_KEY)
    return output if isinstance(output, Mapping) else {}


def release_of(options: Mapping[str, Any], catalog: Catalog) -> Release | None:
    """The catalog release a server runs, from what its spawner recorded."""
    release_id = session_output(options).get("release")
    if isinstance(release_id, str) and release_id in catalog:
        return catalog.get(release_id)
    return None


def sessions_from_users(users: Iterable[Mapping[str, Any]], catalog: Catalog) -> list[Session]:
    """Every server with ``started`` or ``pending`` set, from hub user models.

    A server still starting has recorded nothing yet: its release shows as unknown.
    """
    sessions: list[Session] = []
    for user in users:
        for server_name, server in (user.get("servers") or {}).items():
            if not isinstance(server, Mapping) or not (
                server.get("started") or server.get("pending")
            ):
                continue
            options = server.get("user_options") or {}
            output = session_output(options)
            release = release_of(options, catalog)
            casa = output.get("casa_version")
            if release is not None:
                label = release.label
            else:
                label = f"CASA {casa}" if casa else "Not a CASA session"
            sessions.append(
                Session(
                    user=str(user.get("name")),
                    server=str(server_name or ""),
                    release_id=release.id if release else UNKNOWN_RELEASE,
                    release_label=label,
                    dataset=str(output.get("dataset") or options.get("dataset") or "—"),
                    interface=str(output.get("interface") or options.get("interface") or "—"),
                    profile=str(output.get("summary") or ""),
                    started=parse_time(server.get("started")),
                    last_activity=parse_time(
                        server.get("last_activity") or user.get("last_activity")
                    ),
                    ready=bool(server.get("ready")),
                )
            )
    return sessions


def group_sessions(
    sessions: Iterable[Session], states: Mapping[str, ReleaseState]
) -> list[ReleaseGroup]:
    """Group sessions by release, then by dataset.

    The largest release group comes first. Within a dataset the oldest session comes first.
    """
    by_release: dict[str, ReleaseGroup] = {}
    for session in sessions:
        group = by_release.setdefault(
            session.release_id,
            ReleaseGroup(
                session.release_id,
                session.release_label,
                states.get(session.release_id, ReleaseState()),
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
    """Format a duration as ``3 d 4 h``, ``2 h 05 min``, ``7 min`` or ``40 s``.

    An unknown duration is ``—``.
    """
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
    """The idle culler's timeout and how long before it users are warned.

    Both are in seconds. A timeout of 0 means no culling.
    """

    timeout: int = 0
    warn_before: int = 600

    def cull_time(self, session: Session, now: datetime) -> datetime | None:
        """Return when the culler will stop this idle session.

        None unless that time is close enough to warn about.
        """
        idle = session.idle(now)
        if self.timeout <= 0 or idle is None or session.last_activity is None:
            return None
        if idle.total_seconds() < max(self.timeout - self.warn_before, 0):
            return None
        return session.last_activity + timedelta(seconds=self.timeout)

    def warning(self, session: Session, now: datetime) -> str | None:
        """Return the in-session warning for an idle session close to its cull.

        None when the session is not close to its cull time.
        """
        cull_at = self.cull_time(session, now)
        if cull_at is None or session.last_activity is None:
            return None
        return (
            f"This session has been idle since {session.last_activity:%H:%M} UTC "
            f"and will be stopped at about {cull_at:%H:%M} UTC "
            f"(after {format_duration(timedelta(seconds=self.timeout))} without activity) "
            "unless you use it. "
            "Save your work; files in your home and project directories are kept."
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

    Each notice has the ``server`` it is for and its ``kind``, ``drain`` or ``cull``. It also has a
    ``title`` short enough for a notification, at most 140 characters, and the full ``text``.
    """
    notices: list[dict[str, str]] = []
    for session in sessions:
        if session.user != username:
            continue
        state = states.get(session.release_id)
        if state is not None and state.drained:
            text = (
                f"{session.release_label}, which this session runs, "
                "is being drained by the operators"
                + (f": {_sentence(state.message)}" if state.message else ".")
                + " This session keeps running; "
                "new sessions of this release cannot be started, "
                "so save your work and start your next session with another release."
            )
            title = (
                f"{session.release_label} is being drained: "
                "save your work; new sessions need another release."
            )
            notices.append(
                {"server": session.server, "kind": "drain", "title": title, "text": text}
            )
        warning = policy.warning(session, now)
        cull_at = policy.cull_time(session, now)
        if warning and cull_at is not None:
            title = (
                f"This idle session will be stopped at about {cull_at:%H:%M} UTC "
                "unless you use it."
            )
            notices.append(
                {"server": session.server, "kind": "cull", "title": title, "text": warning}
            )
    return notices

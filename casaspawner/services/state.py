"""The operators' release state: which CASA releases are drained or retired.

The state is kept in one small JSON file. The casa-sessions service writes the file atomically: it
writes a temporary file, then renames it. The spawner reads it through :func:`drain_blocker`,
which is what ``CASASessionMixin.blocked_releases`` takes.

A file keeps the two processes decoupled. The spawner needs no network call to the service to
refuse a spawn, and the state survives restarts of either. In z2jh it lives on the hub's database
volume.

File format (``schema: 1``)::

    {"schema": 1,
     "releases": {"pl-2023.1.0.124": {"drained": true, "retired": false, "message": "...",
                                      "by": "alice", "at": "2026-11-23T19:40:00+00:00"}}}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from casaspawner.catalog.model import Catalog
from casaspawner.errors import InvalidInput

#: Environment variable naming the state file for both the service and the spawner's blocker.
STATE_FILE_ENV = "CASASPAWNER_RELEASE_STATE"
DEFAULT_STATE_FILE = "casa-release-state.json"
_MESSAGE_MAX = 300


@dataclass(frozen=True)
class ReleaseState:
    """What operators decided about one release."""

    drained: bool = False
    retired: bool = False
    message: str = ""
    by: str = ""
    at: str = ""


def default_state_path() -> Path:
    """Return the state file's path from the environment, or the default.

    That is ``$CASASPAWNER_RELEASE_STATE``, else ``casa-release-state.json`` in the working
    directory.
    """
    return Path(os.environ.get(STATE_FILE_ENV) or DEFAULT_STATE_FILE)


def drain_message(label: str, message: str) -> str:
    """The sentence a user sees when starting a drained release."""
    text = message.strip()
    base = f"{label} is being drained by the operators and cannot be started now"
    if not text:
        return f"{base}; choose another release or try again later."
    return f"{base}: {text}" + ("" if text.endswith((".", "!", "?")) else ".")


def release_states(catalog: Catalog, states: Mapping[str, ReleaseState]) -> list[dict[str, Any]]:
    """Every catalog release with what the operators decided about it.

    This is what ``api/releases`` answers. ``refusal`` is the sentence a drained release is refused
    with (the spawner's own, :func:`drain_message`), None while it is not drained.
    """
    entries = []
    for release in catalog.releases:
        state = states.get(release.id, ReleaseState())
        entries.append(
            {
                "id": release.id,
                "label": release.label,
                "casa": release.casa,
                "drained": state.drained,
                "retired": state.retired,
                "message": state.message,
                "refusal": drain_message(release.label, state.message) if state.drained else None,
            }
        )
    return entries


class ReleaseStateStore:
    """Reads and writes the state file.

    Nothing is cached, so every read sees the latest write.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, ReleaseState]:
        """Return all recorded releases.

        A missing file is an empty state. An unreadable one raises ``InvalidInput``.
        """
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise InvalidInput(
                f"The release state file {self.path} cannot be read ({exc})."
            ) from None
        if (
            not isinstance(raw, dict)
            or raw.get("schema") != 1
            or not isinstance(raw.get("releases"), dict)
        ):
            raise InvalidInput(
                f"The release state file {self.path} is not a casaspawner state file."
            )
        states: dict[str, ReleaseState] = {}
        for release_id, entry in raw["releases"].items():
            if isinstance(entry, dict):
                known = {k: entry[k] for k in ReleaseState.__dataclass_fields__ if k in entry}
                states[str(release_id)] = ReleaseState(**known)
        return states

    def _save(self, states: Mapping[str, ReleaseState]) -> None:
        document = {
            "schema": 1,
            "releases": {
                rid: asdict(state)
                for rid, state in sorted(states.items())
                if state != ReleaseState()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".casa-release-state-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def update(self, release_id: str, *, by: str, **changes: Any) -> ReleaseState:
        """Change one release's state and record who did it.

        ``changes`` may set ``drained``, ``retired`` and ``message``.
        """
        if "message" in changes:
            message = str(changes["message"]).strip()
            if len(message) > _MESSAGE_MAX or any(ord(c) < 32 for c in message):
                raise InvalidInput(
                    f"The drain message must be one line of at most {_MESSAGE_MAX} characters."
                )
            changes["message"] = message
        states = self.load()
        current = states.get(release_id, ReleaseState())
        merged = {
            **asdict(current),
            **changes,
            "by": by,
            "at": datetime.now(timezone.utc).isoformat(),
        }
        states[release_id] = ReleaseState(**merged)
        if not states[release_id].drained and not states[release_id].retired:
            states[release_id] = ReleaseState()
        self._save(states)
        return states[release_id]

    def drained(self) -> dict[str, ReleaseState]:
        return {rid: state for rid, state in self.load().items() if state.drained}


def drain_blocker(
    path: str | os.PathLike[str] | None = None,
) -> Callable[[Any], dict[str, str]]:
    """Return a ``blocked_releases`` callable for the CASA spawners.

    The callable is ``(spawner) -> {release id: message}``. It reads the state file at every spawn,
    so a drain takes effect for the very next spawn. An unreadable file blocks nothing, and the
    spawner's logger logs it. A broken state file must not stop every session on the hub.
    """

    def blocked(spawner: Any) -> dict[str, str]:
        store = ReleaseStateStore(path if path is not None else default_state_path())
        try:
            drained = store.drained()
        except InvalidInput as exc:
            log = getattr(spawner, "log", None)
            if log is not None:
                log.error("Ignoring release drains: %s", exc)
            return {}
        labels: dict[str, str] = {}
        catalog = getattr(spawner, "casa_catalog", None)
        for release_id in drained:
            label = f"Release {release_id}"
            if catalog is not None:
                found = catalog()
                if release_id in found:
                    label = found.get(release_id).label
            labels[release_id] = label
        return {rid: drain_message(labels[rid], state.message) for rid, state in drained.items()}

    return blocked

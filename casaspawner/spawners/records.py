"""The reproducibility record's hub side: its traits, and the variables a session gets.

``SessionRecords`` sits in front of :class:`~casaspawner.spawners.mixin.CASASessionMixin` in both
spawners. When a session starts, :meth:`SessionRecords.record_environment` builds the record
(:func:`casaspawner.session.record.session_record`) and hands it to the session in two variables;
the session writes it into the user's storage as the user and completes it when it stops
(:mod:`casaspawner.insession.record`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import jupyterhub
from jupyterhub.utils import maybe_future
from traitlets import Bool, Unicode, default

from casaspawner.errors import ConfigurationError
from casaspawner.plan import SessionPlan, StorageLayout
from casaspawner.runtime import RECORD_DIR_ENV, RECORD_ENV, record_text
from casaspawner.session.record import (
    RECORDS_DIR,
    RecordFacts,
    Runtime,
    dataset_path,
    record_directory,
    session_record,
)
from casaspawner.session.relaunch import PastSession, remember

#: The sessions' ``$JUPYTERHUB_API_TOKEN``: JupyterHub's ``server`` role and its server's model.
SERVER_TOKEN_SCOPES = ("users:activity!user", "access:servers!server", "read:servers!server")

if TYPE_CHECKING:
    from jupyterhub.spawner import Spawner as _MixinBase
else:
    from traitlets.config import LoggingConfigurable as _MixinBase


class SessionRecords(_MixinBase):  # type: ignore[misc]
    """Traits and the start of every session's reproducibility record."""

    session_records = Bool(
        True,
        help="""
        Whether each session writes a reproducibility record into the user's home: an RO-Crate
        (``ro-crate-metadata.json``, Process Run Crate profile) naming the dataset, the evidence
        file and its sha256, the CASA and pipeline build and why, the image and its digest (from
        the pod's status) or the local environment's content hash, the measures data's version,
        the options, the hub's and casaspawner's versions, and the start and stop times. The
        session writes it as the user. The spawners' default ``server_token_scopes`` let the
        session read its own server's model, where the hub notes the image's digest.
        """,
    ).tag(config=True)

    session_records_dir = Unicode(
        RECORDS_DIR,
        help="""
        Directory of the records, relative to the user's home; each session writes
        ``<dir>/<UTC start time>-<dataset>/ro-crate-metadata.json``.
        """,
    ).tag(config=True)

    #: The directory of the running session's record, in the session.
    #:
    #: ``clear_state`` keeps it: ``LocalProcessSpawner.poll`` clears the state of a session that
    #: died before the hub's post-stop step completes its record. The next start replaces it.
    session_record_dir: str | None = None
    #: Past sessions (kept by the session mixin's state); a started session joins them.
    session_history: list[PastSession]

    @default("server_token_scopes")
    def _record_server_token_scopes(self) -> list[str]:
        # The server role's scopes, and the session's own server's model: the session reads there
        # the image digest the hub notes once the pod runs (kube/spawner.py, record_image_digest).
        return list(SERVER_TOKEN_SCOPES)

    def check_config(self) -> None:
        """The other checks, then that ``session_records_dir`` stays inside the home."""
        super().check_config()
        relative = PurePosixPath(self.session_records_dir)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ConfigurationError(
                f"{type(self).__name__}.session_records_dir is {self.session_records_dir!r}, "
                "not a directory inside the home"
            )

    def record_environment(
        self,
        plan: SessionPlan,
        runtime: Runtime,
        layout: StorageLayout,
        measures_path: str | None = None,
    ) -> dict[str, str]:
        """The variables giving the session its record, or none when records are off."""
        self.session_record_dir = None
        if not self.session_records:
            return {}
        started = datetime.now(timezone.utc)
        facts = RecordFacts(
            started,
            runtime,
            hub_version=jupyterhub.__version__,
            dataset_path=dataset_path(plan, layout),
            measures_path=measures_path,
        )
        directory = record_directory(plan, started, self.session_records_dir)
        self.session_record_dir = directory
        record = record_text(session_record(plan, facts))
        return {RECORD_ENV: record, RECORD_DIR_ENV: directory}

    def remember_session(self, plan: SessionPlan, sha256: str) -> None:
        """Offer the session that now runs ``sha256`` for a relaunch, named as its record."""
        started = datetime.now(timezone.utc)
        directory = self.session_record_dir or record_directory(plan, started)
        past = PastSession.from_plan(plan, PurePosixPath(directory).name, started, sha256)
        self.session_history = remember(self.session_history, past)

    async def complete_record(self) -> None:
        """Complete the ended session's record where the hub can; here, only forget it.

        The session completes its own record when it stops. A hub that can write the user's
        storage as the user (the local spawner) also completes the record of a session that
        was killed.
        """
        self.session_record_dir = None

    async def run_post_stop_hook(self) -> Any:
        """Complete the record, however the session ended, then run the operator's hook."""
        try:
            await self.complete_record()
        except Exception:
            self.log.exception("The record of %s's session could not be completed", self.user.name)
        return await maybe_future(super().run_post_stop_hook())

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.session_record_dir:
            state["casa_record_dir"] = self.session_record_dir
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        found = state.get("casa_record_dir")
        if isinstance(found, str):
            self.session_record_dir = found

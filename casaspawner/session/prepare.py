"""The session pipeline: from a spawn request to a plan, in one pass.

:func:`prepare` runs the same steps for both spawners, in this order::

    options → identity → resolution → substitution → plan → measures version → drain check

A request naming a past session (``relaunch``) takes that session's options, and its digest
pins the image; a plan that would run another release than it did is refused. Before the drain
check, the backend picks the measures version the session reads (the past session's, for a
relaunch).

A backend (the spawner) supplies the steps that need the hub or the machine as the methods of
:class:`SessionSteps`, the way batchspawner's ``start`` calls ``submit_batch_script``. Nothing here
imports JupyterHub: the pipeline is tested on its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from casaspawner.catalog.model import Release
from casaspawner.datasets.ids import looks_like_identifier
from casaspawner.datasets.model import Evidence, Resolution
from casaspawner.errors import InvalidInput, NoSuchDataset, ReleaseBlocked, VersionUnknown
from casaspawner.plan import (
    Identity,
    SessionPlan,
    Substitution,
    chosen_release,
    make_plan,
    release_for,
    with_measures,
)
from casaspawner.session.options import parse_options
from casaspawner.session.readers import DatasetReader
from casaspawner.session.relaunch import PastSession, relaunch_choice, relaunch_refusal
from casaspawner.session.settings import SessionSettings


class SessionSteps(Protocol):
    """The steps a backend supplies to :func:`prepare`."""

    async def session_identity(self) -> Identity:
        """Who the session runs as."""

    def get_dataset_reader(self) -> DatasetReader | None:
        """What reads datasets named by path, once the identity is known."""

    async def kept_resolution(
        self, reader: DatasetReader, text: str, identity: Identity
    ) -> Resolution | None:
        """The resolution the backend kept of the dataset ``reader`` finds at ``text``.

        None when it kept none, or something the resolution read has changed since: the
        dataset is then read (``reader.open``, then :meth:`read_dataset`).
        """

    async def read_dataset(self, target: Path | str, label: str, identity: Identity) -> Resolution:
        """Resolve a dataset directory a reader gave, or an ALMA identifier, as ``label``."""

    def resolved(self, resolution: Resolution) -> None:
        """Note the dataset's resolution, even if the spawn is refused after this."""

    async def substitute(self, release: Release) -> Substitution | None:
        """Choose another release when the backend cannot run ``release``.

        None runs ``release`` itself.
        """

    async def blocked_release_messages(self) -> Mapping[str, str]:
        """Map each release that may not start now to the operators' message.

        The keys are release ids.
        """

    def past_session(self, name: str) -> PastSession | None:
        """The user's past session ``name``, for a relaunch; None when there is none."""

    async def measures_version(self, earlier: str | None) -> str | None:
        """The measures version the session reads: ``earlier``'s for a relaunch, else the newest.

        None reads the whole measures volume, where it is not kept by version.
        """


async def prepare(
    user_options: Mapping[str, Any], settings: SessionSettings, steps: SessionSteps
) -> SessionPlan:
    """Turn a spawn request into a session plan, or refuse it.

    A refusal is one sentence. Nothing is created here but what the steps create (a local
    account, say), and only after the request's options were found sound.
    """
    name = relaunch_choice(user_options)
    past = steps.past_session(name) if name else None
    if name and past is None:
        raise InvalidInput(
            f"There is no past session {name!r} of yours to relaunch; choose one from the list."
        )
    if past is not None:
        user_options = past.options(with_release=settings.allow_override)
    options = parse_options(user_options, settings)
    if past is not None:
        options = replace(options, pin=past.sha256)
    identity = await steps.session_identity()
    resolution = await resolve(options.dataset, identity, settings, steps, release=options.release)
    steps.resolved(resolution)
    release, _, _ = release_for(options, resolution, settings.catalog)
    substitution = await steps.substitute(release)
    plan = make_plan(identity, options, settings.catalog, resolution, settings.plan, substitution)
    refusal = relaunch_refusal(past, plan) if past is not None else None
    if refusal:
        raise InvalidInput(refusal)
    earlier = (past.measures or None) if past is not None else None
    measures = await steps.measures_version(earlier)
    if measures is not None:
        plan = with_measures(plan, measures)
    blocked = await steps.blocked_release_messages()
    if plan.release.id in blocked:
        message = str(blocked[plan.release.id] or "").strip()
        raise ReleaseBlocked(
            message
            or f"{plan.release.label} cannot be started right now; try again later or choose "
            "another release."
        )
    return plan


async def resolve(
    text: str,
    identity: Identity,
    settings: SessionSettings,
    steps: SessionSteps,
    *,
    release: str | None = None,
) -> Resolution:
    """Resolve an ALMA identifier or a path in the user's storage.

    Identifiers are looked up in the archive. ``release`` is the catalog id the user chose
    instead. A dataset that was found but tells no usable CASA version then runs that release,
    marked as the user's choice. An identifier or path that does not lead to one dataset is
    still refused.
    """
    try:
        return await _resolve(text, identity, settings, steps)
    except VersionUnknown as exc:
        if release is None:
            raise
        chosen = chosen_release(settings.catalog, release)
        return Resolution(
            text,
            Evidence("none", "", None, None),
            chosen,
            False,
            f"{exc.finding}; you chose {chosen.label}.",
        )


async def _resolve(
    text: str, identity: Identity, settings: SessionSettings, steps: SessionSteps
) -> Resolution:
    reader = steps.get_dataset_reader()
    if looks_like_identifier(text):
        # A directory of the user's named like an identifier (a project code, as ALMA's
        # downloads unpack) is that dataset, read without asking the archive.
        if reader is not None and "/" not in text:
            with contextlib.suppress(NoSuchDataset):
                return await _read_stored(reader, text, identity, steps)
        return await steps.read_dataset(text, text, identity)
    if reader is None:
        raise InvalidInput(
            f"{text[:80]!r} is not an ALMA identifier, and this hub cannot read datasets from "
            "your storage; give the dataset's ALMA identifier."
        )
    return await _read_stored(reader, text, identity, steps)


async def _read_stored(
    reader: DatasetReader, text: str, identity: Identity, steps: SessionSteps
) -> Resolution:
    kept = await steps.kept_resolution(reader, text, identity)
    if kept is not None:
        return kept
    async with reader.open(text, identity) as path:
        return await steps.read_dataset(path, text, identity)

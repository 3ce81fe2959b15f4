"""The operator's settings one spawn is prepared with, as one frozen value."""

from __future__ import annotations

from dataclasses import dataclass

from casaspawner.catalog.model import Catalog
from casaspawner.plan import PlanConfig


@dataclass(frozen=True)
class SessionSettings:
    """Everything :func:`~casaspawner.session.prepare.prepare` reads besides the request.

    The spawners build it from their traits; tests and the dry run build it directly.
    """

    catalog: Catalog
    plan: PlanConfig
    default_size: str
    allow_override: bool = True

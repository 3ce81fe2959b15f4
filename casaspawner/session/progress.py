"""The first lines of the spawn-progress page: which build, and why."""

from __future__ import annotations

from typing import Any

from casaspawner.plan import INTERFACES, SessionPlan


def plan_events(plan: SessionPlan) -> list[dict[str, Any]]:
    """The resolution, its reason and any warning, as progress events."""
    exactness = "the exact build" if plan.exact else "not the exact build"
    events: list[dict[str, Any]] = [
        {
            "progress": 2,
            "message": f"Dataset {plan.resolution.dataset}: {plan.release.label}, {exactness}.",
        },
        {"progress": 4, "message": plan.reason},
    ]
    chosen = f"Warning: you chose {plan.release.label}"
    if plan.resolution.evidence.kind == "none":
        warning = f"{chosen}; nothing in the dataset tells which CASA version processed it."
        events.append({"progress": 5, "message": warning})
    elif plan.options.release not in (None, plan.resolution.release.id):
        warning = f"{chosen}; the dataset was processed with {plan.resolution.release.label}."
        events.append({"progress": 5, "message": warning})
    starting = f"Starting {INTERFACES[plan.interface]} with image {plan.image}."
    events.append({"progress": 6, "message": starting})
    return events

"""The synthetic storage tree (a Cavern-like root) and the paths users type for its datasets."""

from __future__ import annotations

from pathlib import Path

from casaspawner.datasets.synth import write_dataset

#: The eras of alice's datasets in :func:`write_cavern`'s tree.
ALICE_ERAS = ("cycle10", "cycle7", "cycle3-pipeline", "cycle2-manual", "no-evidence")


def write_cavern(root: Path) -> Path:
    """Write a storage root: alice's home with datasets of several eras, a project, bob's home.

    alice's home also has a link into bob's data (``escape``) and a link back into her own
    (``loop``).
    """
    for era in ALICE_ERAS:
        write_dataset(root / "home" / "alice" / "data" / era, era)
    write_dataset(root / "projects" / "proja" / "shared", "cycle9")
    write_dataset(root / "home" / "bob" / "data", "cycle8")
    (root / "home" / "alice" / "escape").symlink_to(root / "home" / "bob" / "data")
    (root / "home" / "alice" / "loop").symlink_to(root / "home" / "alice" / "data")
    return root


def dataset_in(storage: Path, user: str, era: str) -> str:
    """The path of a synthetic dataset as the user types it (relative to their home)."""
    base = storage / "home" / user / "data" / era
    member = next(base.glob("*/science_goal.*/group.*/member.*"))
    return str(member.relative_to(storage / "home" / user))

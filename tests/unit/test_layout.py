"""The package's import rules: each wing imports only the wings below it.

Every import counts, at module level or inside a function. ``__main__`` modules are entry
points and sit above everything, so they are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "casaspawner"

#: The wings, lowest first: a wing may import itself and the wings before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "net"),
    ("catalog",),
    ("runtime", "tarballs"),
    ("datasets",),
    ("plan",),
    ("session",),
    ("spawners", "insession"),
    ("kube", "local"),
    ("services",),
    ("hubconfig",),
    ("images",),
    ("cli",),
)
#: What the hub is: nothing of it may run inside a session.
HUB = (
    "jupyterhub",
    "casaspawner.spawners",
    "casaspawner.kube",
    "casaspawner.local",
    "casaspawner.session",
    "casaspawner.services",
    "casaspawner.hubconfig",
)


def wing(module: str) -> str:
    """``casaspawner.kube.objects`` → ``kube``; the package itself is ``casaspawner``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "casaspawner"


def imports() -> dict[str, set[str]]:
    """Module → every module it imports (absolute names), from the source."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        if module.endswith("__main__") or "desktop" in relative.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[module] = names
    return found


IMPORTS = imports()
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("casaspawner.") and wing(n) in RANK}


def test_every_wing_has_a_place_in_the_layers() -> None:
    wings = {wing(module) for module in IMPORTS} - {"casaspawner"}
    assert wings <= set(RANK), f"wings without a layer: {sorted(wings - set(RANK))}"


def upward_imports(module: str, names: set[str]) -> list[str]:
    """The names ``module`` imports from its own layer's other wings or from higher layers."""
    rank = RANK[wing(module)]
    return sorted(
        name
        for name in ours(names)
        if RANK[wing(name)] > rank or (RANK[wing(name)] == rank and wing(name) != wing(module))
    )


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if wing(m) in RANK))
def test_a_module_imports_only_its_own_wing_and_those_below(module: str) -> None:
    assert not upward_imports(module, IMPORTS[module])


def test_an_upward_import_or_a_sibling_wing_is_reported() -> None:
    assert upward_imports("casaspawner.plan", {"casaspawner.kube.objects"}) == [
        "casaspawner.kube.objects"
    ]
    assert upward_imports("casaspawner.kube.spawner", {"casaspawner.local.accounts"})
    assert not upward_imports("casaspawner.kube.spawner", {"casaspawner.plan"})


def imported_by(prefix: str) -> set[str]:
    return set().union(*(IMPORTS[m] for m in IMPORTS if m == prefix or m.startswith(prefix + ".")))


def closure(prefix: str) -> set[str]:
    """Every module ``prefix``'s wing reaches through casaspawner modules, and what they import."""
    seen: set[str] = set()
    todo = [m for m in IMPORTS if m == prefix or m.startswith(prefix + ".")]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [n for n in IMPORTS.get(module, ()) if n in IMPORTS]
    return set().union(*(IMPORTS[m] for m in seen))


def test_the_session_pipeline_needs_no_jupyterhub_traitlets_or_tornado() -> None:
    reached = closure("casaspawner.session")
    hub = sorted(n for n in reached if n.split(".")[0] in ("jupyterhub", "traitlets", "tornado"))
    assert not hub


@pytest.mark.parametrize(
    ("wing_name", "forbidden"),
    [
        ("casaspawner.kube", "casaspawner.local"),
        ("casaspawner.local", "casaspawner.kube"),
        ("casaspawner.spawners", "casaspawner.kube"),
        ("casaspawner.spawners", "casaspawner.local"),
        ("casaspawner.images", "casaspawner.local"),
    ],
)
def test_wings_that_must_not_meet(wing_name: str, forbidden: str) -> None:
    reached = sorted(n for n in imported_by(wing_name) if n.startswith(forbidden))
    assert not reached


def test_what_runs_in_a_session_imports_nothing_of_the_hub() -> None:
    reached = closure("casaspawner.insession")
    assert not sorted(n for n in reached if n.startswith(HUB))

"""The generated parts of the docs are complete: every option, every release.

The configuration reference (docs/configuration.md) must document every option of both spawners
and their mixin, and the catalog page must list every release of releases.yaml. Both are checked
from the sources, without a Sphinx run. When ``make docs`` has built the pages since they last
changed, the built HTML is checked as well.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from traitlets import HasTraits
from traitlets.traitlets import DefaultHandler

from casaspawner.catalog import Catalog
from casaspawner.kube.spawner import CASASpawner
from casaspawner.local.spawner import LocalCASASpawner
from casaspawner.spawners.mixin import CASASessionMixin
from casaspawner.spawners.records import SessionRecords

DOCS = Path(__file__).resolve().parents[2] / "docs"
HTML = DOCS / "_build" / "html"
CLASSES: tuple[type[HasTraits], ...] = (
    CASASessionMixin,
    SessionRecords,
    CASASpawner,
    LocalCASASpawner,
)
DIRECTIVE = re.compile(r"^\.\. (autoconfigurable|autotrait):: (\S+)$", re.MULTILINE)

sys.path.insert(0, str(DOCS / "_ext"))
from casaspawner_docs import catalog_table  # noqa: E402


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def required_options() -> dict[str, str]:
    """Every option the four classes define, as ``module.Class.name``, with its help."""
    return {
        f"{qualified(cls)}.{name}": trait.help
        for cls in CLASSES
        for name, trait in cls.class_own_traits(config=True).items()
    }


def documented_options(text: str) -> set[str]:
    """The options a page's autodoc-traits directives document, as ``module.Class.name``."""
    documented = set()
    for kind, target in DIRECTIVE.findall(text):
        if kind == "autotrait":
            documented.add(target)
            continue
        cls = next(c for c in CLASSES if qualified(c) == target)
        documented.update(f"{target}.{name}" for name in cls.class_traits(config=True))
    return documented


def test_the_configuration_reference_documents_every_option() -> None:
    text = (DOCS / "configuration.md").read_text()
    required = required_options()
    # The classes define options: an empty set would make this test pass on nothing.
    assert len(required) > 40
    documented = documented_options(text)
    missing = sorted(set(required) - documented)
    assert not missing, f"docs/configuration.md lacks these options: {missing}"
    # Every directive names an option that exists (a renamed one would document nothing).
    stale = sorted(name for name in documented if name.rsplit(".", 1)[1] not in _all_options(name))
    assert not stale, stale
    # Their help text is the reference: every option has some.
    assert not [name for name, help_text in required.items() if len(help_text.split()) < 4]


def _all_options(name: str) -> set[str]:
    owner = name.rsplit(".", 1)[0]
    cls = next(c for c in CLASSES if qualified(c) == owner)
    return set(cls.class_traits(config=True))


def test_options_given_new_defaults_are_named_on_the_page() -> None:
    """An inherited option whose default a spawner changes is named in the reference's text."""
    text = (DOCS / "configuration.md").read_text()
    changed = {
        value.trait_name
        for cls in CLASSES
        for value in vars(cls).values()
        if isinstance(value, DefaultHandler) and value.trait_name in cls.class_traits(config=True)
    }
    assert {"options_form", "cmd", "start_timeout"} <= changed
    assert not sorted(name for name in changed if f"`{name}`" not in text)


def test_the_catalog_page_lists_every_release(catalog: Catalog) -> None:
    table = catalog_table(catalog)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(catalog.releases)
    for row, release in zip(rows, catalog.releases, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[:3] == [f"`{release.id}`", release.casa, release.pipeline or ""], row
    # The catalog page shows the generated table.
    assert "```{include} _generated/catalog-table.md" in (DOCS / "catalog.md").read_text()


def built(page: str, *sources: Path) -> str | None:
    """The built HTML of ``page``, if ``make docs`` built it after ``sources`` last changed."""
    html = HTML / page
    if not html.is_file() or any(s.stat().st_mtime > html.stat().st_mtime for s in sources):
        return None
    return html.read_text()


def test_the_built_pages_are_complete(catalog: Catalog) -> None:
    import casaspawner.catalog

    releases = Path(casaspawner.catalog.__file__).parent / "releases.yaml"
    configuration = built("configuration.html", DOCS / "configuration.md")
    catalog_page = built("catalog.html", DOCS / "catalog.md", releases)
    if configuration is None or catalog_page is None:
        pytest.skip("the docs were not built since they changed: run `make docs` first")
    # Each option documented has an anchor of its own.
    missing = [name for name in required_options() if f'id="{name}"' not in configuration]
    assert not missing, missing
    absent = [release.id for release in catalog.releases if f">{release.id}<" not in catalog_page]
    assert not absent, absent

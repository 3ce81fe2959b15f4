"""Pages generated from the package: the release catalog table.

``catalog_table`` renders ``casaspawner/catalog/releases.yaml`` as a Markdown table, and the
Sphinx hook writes it to ``_generated/catalog-table.md``, which ``catalog.md`` includes.
tests/unit/test_docs.py checks the table lists every release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from casaspawner.catalog import Catalog, load_catalog

#: Where the generated pages go, beside the documentation's sources.
GENERATED = Path(__file__).resolve().parents[1] / "_generated"


def catalog_table(catalog: Catalog) -> str:
    """The release table: one row per release, in the catalog's order."""
    lines = [
        "| id | CASA | pipeline | use (cycles) | ALMA operations | packaging | confidence |",
        "|---|---|---|---|---|---|---|",
    ]
    for release in catalog.releases:
        packaging = release.packaging
        if release.restore_with:
            packaging += f" → `{release.restore_with}`"
        source = release.confidence
        if release.source_url:
            source = f"[{release.confidence}]({release.source_url})"
        lines.append(
            f"| `{release.id}` | {release.casa} | {release.pipeline or ''} | {release.uses} "
            f"| {release.ops_period} | {packaging} | {source} |"
        )
    return "\n".join(lines) + "\n"


def write_pages(_app: Any = None) -> None:
    """Write the generated pages, before Sphinx reads the sources."""
    GENERATED.mkdir(exist_ok=True)
    (GENERATED / "catalog-table.md").write_text(catalog_table(load_catalog()))


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", write_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

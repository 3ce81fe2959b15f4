"""Sphinx configuration for casaspawner's documentation."""

from __future__ import annotations

from pathlib import Path

from casaspawner import __version__
from casaspawner.catalog import load_catalog

project = "casaspawner"
author = "casaspawner developers"
copyright = "2026, casaspawner developers"  # noqa: A001
release = version = __version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "autodoc_traits"]
myst_enable_extensions = ["colon_fence", "deflist"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated/README.md"]
html_theme = "alabaster"
html_static_path = ["_static"]
autodoc_member_order = "bysource"
suppress_warnings = ["myst.header"]


def _write_catalog_page() -> None:
    """docs/_generated/catalog-table.md: the release table, straight from releases.yaml."""
    out = Path(__file__).parent / "_generated"
    out.mkdir(exist_ok=True)
    lines = [
        "| id | CASA | pipeline | use (cycles) | ALMA operations | packaging | confidence |",
        "|---|---|---|---|---|---|---|",
    ]
    for release in load_catalog().releases:
        packaging = release.packaging + (f" → `{release.restore_with}`" if release.restore_with else "")
        source = f"[{release.confidence}]({release.source_url})" if release.source_url else release.confidence
        lines.append(
            f"| `{release.id}` | {release.casa} | {release.pipeline or ''} | {release.uses} | {release.ops_period} "
            f"| {packaging} | {source} |"
        )
    (out / "catalog-table.md").write_text("\n".join(lines) + "\n")


_write_catalog_page()

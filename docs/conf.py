"""Sphinx configuration for casaspawner's documentation."""

from __future__ import annotations

import sys
from pathlib import Path

from casaspawner import __version__

# Pages generated from the package (the release catalog table): docs/_ext/casaspawner_docs.py.
sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "casaspawner"
author = "casaspawner developers"
copyright = "2026, casaspawner developers"
release = version = __version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "autodoc_traits", "casaspawner_docs"]
myst_enable_extensions = ["colon_fence", "deflist"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated/README.md", "_ext"]
html_theme = "alabaster"
html_static_path = ["_static"]
autodoc_member_order = "bysource"
suppress_warnings = ["myst.header"]

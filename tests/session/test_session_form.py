"""The spawn form's HTML: accessible, self-contained, and escaping what users typed.

tests/spawners/test_spawners_mixin.py checks what the spawners put into it.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from casaspawner.plan import DEFAULT_SIZES
from casaspawner.session.form import render_form

DATASET = (
    "data/cycle10/2023.1.00026.S/science_goal.uid___A001_X3621_X3d67"
    "/group.uid___A001_X3621_X3d67/member.uid___A001_X3621_X3d68"
)


class FormParser(HTMLParser):
    """The form's fields, labels, ids and links to anything outside it."""

    def __init__(self):
        super().__init__()
        self.fields, self.labels, self.ids, self.external = [], set(), set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag in ("input", "select") and attrs.get("type") != "hidden":
            self.fields.append(attrs)
        if tag == "label" and "for" in attrs:
            self.labels.add(attrs["for"])
        for key in ("src", "href"):
            if attrs.get(key):
                self.external.append(attrs[key])


def test_form_is_accessible_and_self_contained(catalog):
    """The form as a spawner renders it after a desktop session on a Cycle 10 dataset.

    A dataset typed with markup since is among the recent ones.
    """
    html = render_form(
        releases=catalog.available(),
        sizes=DEFAULT_SIZES,
        default_size="medium",
        previous={"dataset": DATASET, "interface": "desktop"},
        recent=["<script>alert(1)</script>", DATASET],
        last={"dataset": DATASET, "release": "pl-2023.1.0.124", "exact": True, "reason": "…"},
        can_read_paths=True,
        home="/arc/home/alice",
    )
    parser = FormParser()
    parser.feed(html)
    # No external assets.
    assert not parser.external
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    names = {f.get("name") for f in parser.fields}
    assert names == {"dataset", "interface", "size", "release"}
    # Every visible control has a label.
    for field in parser.fields:
        if field.get("type") != "radio":
            assert field["id"] in parser.labels
    desktop = r'<input type="radio" name="interface" value="desktop"[^>]*>'
    assert "checked" in re.search(desktop, html).group(0)
    # The previous dataset is prefilled, and offered among the recent ones.
    assert f'value="{DATASET}"' in html
    assert html.count('data-dataset="') == 2
    resolved = re.search(r'<option value="" selected>([^<]*)</option>', html).group(1)
    assert resolved.startswith("CASA 6.5.4-9 (pipeline 2023.1.0.124) — resolved for ")
    offered = re.findall(r'<option value="([^"]+)">', html)
    assert "pl-2023.1.0.124" not in offered
    assert len(offered) >= len(catalog.available()) - 1 - len(DEFAULT_SIZES)
    assert 'id="casa-release-warning"' in html and "hidden" in html

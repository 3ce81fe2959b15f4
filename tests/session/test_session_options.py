"""What users ask for: the spawn form's fields as ``user_options``."""

from __future__ import annotations

from casaspawner.session.options import options_from_form


def test_the_forms_fields_become_user_options_without_the_hubs_own():
    form = {
        "dataset": [" 2019.1.00001.S "],
        "interface": ["desktop"],
        "size": ["small"],
        "release": [""],
        "_xsrf": ["token"],
        "extra": ["x"],
    }
    assert options_from_form(form) == {
        "dataset": "2019.1.00001.S",
        "interface": "desktop",
        "size": "small",
        "extra": "x",
    }

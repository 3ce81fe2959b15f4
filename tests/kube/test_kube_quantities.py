"""Kubernetes quantities of bytes (kube/quantities.py), read and written."""

from __future__ import annotations

import pytest

from casaspawner.kube.quantities import format_bytes, quantity_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20Gi", 20 * 1024**3),
        ("1.5Gi", 1536 * 1024**2),
        ("500M", 500_000_000),
        ("1e9", 10**9),
        # Milli-bytes round up.
        ("1500m", 2),
        ("  64Mi ", 64 * 1024**2),
    ],
)
def test_quantities_are_read_as_bytes(text, expected):
    assert quantity_bytes(text) == expected


@pytest.mark.parametrize("bad", ["20 gigs", "20GB", "-1Gi", "", "Gi", "1.2.3Gi", "0x10"])
def test_what_is_not_a_quantity_of_bytes_is_none(bad):
    assert quantity_bytes(bad) is None, bad


@pytest.mark.parametrize(
    ("count", "expected"),
    [(21 * 1024**3, "21Gi"), (1536 * 1024**2, "1536Mi"), (1_000_000_001, "1000000001")],
)
def test_bytes_are_written_in_the_largest_whole_binary_unit(count, expected):
    assert format_bytes(count) == expected

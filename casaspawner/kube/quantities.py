"""Kubernetes quantities of bytes: parse ``20Gi`` and write a byte count back."""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

_QUANTITY = re.compile(
    r"\+?(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[mkMGTPE]|[eE][+-]?[0-9]+)?"
)
_BINARY = {f"{p}i": 1024 ** (n + 1) for n, p in enumerate("KMGTPE")}
_DECIMAL = {
    "m": Decimal("0.001"),
    "": Decimal(1),
    **{p: Decimal(1000) ** (n + 1) for n, p in enumerate("kMGTPE")},
}


def quantity_bytes(text: str) -> int | None:
    """The number of bytes a Kubernetes quantity stands for, rounded up.

    Quantities are ``20Gi``, ``500M`` or ``1e9``; None when ``text`` is not one (``"20 gigs"``).
    """
    match = _QUANTITY.fullmatch(str(text).strip()) if isinstance(text, str | int) else None
    if match is None:
        return None
    suffix = match["suffix"] or ""
    try:
        number = Decimal(match["number"])
        if suffix[:1] in ("e", "E"):
            value = number * Decimal(10) ** int(suffix[1:])
        else:
            value = number * (_BINARY.get(suffix) or _DECIMAL[suffix])
    except (InvalidOperation, OverflowError):
        return None
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def format_bytes(count: int) -> str:
    """A byte count as the shortest exact quantity: ``21Gi``, ``1536Mi`` or plain bytes."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if count and count % unit == 0:
            return f"{count // unit}{suffix}"
    return str(count)

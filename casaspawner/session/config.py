"""Checks of the operator's settings: sizes, CPU, memory and templates.

Each check raises ``ConfigurationError`` with one sentence naming the option, ``where``. So a bad
setting is reported as the hub's fault before anything is created.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from typing import Any

from casaspawner.errors import ConfigurationError
from casaspawner.plan import Resources

#: Keys a session size may have.
SIZE_KEYS = frozenset({"cpu_guarantee", "cpu_limit", "mem_guarantee", "mem_limit", "description"})
#: JupyterHub's memory units (``mem_limit = "8G"``): powers of 1024.
MEMORY_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def cores(value: Any, where: str) -> float:
    """Read a CPU amount in cores.

    The value is a number or text holding one. Unset gives 0.
    """
    if value is None or value == "":
        return 0.0
    try:
        count = float("nan") if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        count = float("nan")
    if not 0 <= count < math.inf:
        raise ConfigurationError(
            f"{where} is {value!r}, not a number of CPU cores (such as 0.5 or 4)"
        )
    return count


def memory(value: Any, where: str) -> tuple[str, int]:
    """Read a memory amount as text and bytes, as KubeSpawner's ``mem_limit`` does.

    The value is text with K, M, G or T, such as ``8G``. It may also be a whole number of bytes
    that is a multiple of 1024, written back as text: ``8589934592`` gives ``8G``. Unset gives
    ``("", 0)``.
    """
    if value is None or value == "":
        return "", 0
    if isinstance(value, int) and not isinstance(value, bool):
        suffix = next(
            (s for s in reversed(MEMORY_UNITS) if value > 0 and value % MEMORY_UNITS[s] == 0),
            None,
        )
        if suffix is None:
            raise ConfigurationError(
                f"{where} is {value!r}, not a positive number of bytes that is a multiple of 1024 "
                "(or text such as '8G')"
            )
        return f"{value // MEMORY_UNITS[suffix]}{suffix}", value
    text = value.strip() if isinstance(value, str) else ""
    count = _memory_bytes(text)
    if count is None:
        if text[-2:] in ("Ki", "Mi", "Gi", "Ti"):
            raise ConfigurationError(
                f"{where} is {value!r}, the Kubernetes spelling; session memory is written as "
                f"JupyterHub writes it, {text[:-1]!r} (its units are of 1024)"
            )
        raise ConfigurationError(
            f"{where} is {value!r}, not an amount of memory "
            "(a number with K, M, G or T, such as '8G')"
        )
    return text, count


def _memory_bytes(text: str) -> int | None:
    """Count the bytes of ``8G`` or ``1.5T`` as JupyterHub does.

    Anything else gives None.
    """
    unit = MEMORY_UNITS.get(text[-1:])
    try:
        number = float(text[:-1])
    except ValueError:
        return None
    if unit is None or not 0 <= number < math.inf:
        return None
    return int(number * unit)


def sizes(raw: Mapping[Any, Any], where: str) -> dict[str, Resources]:
    """Check and type the operator's session sizes.

    ``raw`` maps each size's name to its resources.
    """
    if not raw:
        raise ConfigurationError(f"{where} is empty; give at least one session size")
    checked: dict[str, Resources] = {}
    for name, spec in raw.items():
        entry = f"{where}[{name!r}]"
        if not isinstance(spec, Mapping) or set(spec) - SIZE_KEYS:
            raise ConfigurationError(
                f"{entry} must be a mapping of {', '.join(sorted(SIZE_KEYS))}"
            )
        cpu = {
            key: cores(spec.get(key), f"{entry}[{key!r}]")
            for key in ("cpu_guarantee", "cpu_limit")
        }
        mem = {
            key: memory(spec.get(key), f"{entry}[{key!r}]")
            for key in ("mem_guarantee", "mem_limit")
        }
        if cpu["cpu_limit"] and cpu["cpu_guarantee"] > cpu["cpu_limit"]:
            raise ConfigurationError(f"{entry} guarantees more CPU than its cpu_limit")
        if mem["mem_limit"][1] and mem["mem_guarantee"][1] > mem["mem_limit"][1]:
            raise ConfigurationError(f"{entry} guarantees more memory than its mem_limit")
        checked[str(name)] = Resources(
            cpu["cpu_guarantee"],
            cpu["cpu_limit"],
            mem["mem_guarantee"][0],
            mem["mem_limit"][0],
            str(spec.get("description") or ""),
        )
    return checked


def check_template(where: str, template: str, fields: tuple[str, ...]) -> None:
    """Refuse a template that does not format with exactly ``fields``."""
    allowed = ", ".join("{" + field + "}" for field in fields)
    try:
        used = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
        unknown = next((field for field in used if field not in fields), None)
        if unknown is None:
            template.format(**{field: "x" for field in fields})
    except (ValueError, KeyError, IndexError, AttributeError):
        raise ConfigurationError(
            f"{where} is {template!r}, not a template (write {{{{ and }}}} for braces); "
            f"its fields are {allowed}"
        ) from None
    if unknown is not None:
        raise ConfigurationError(
            f"{where} is {template!r}, which uses {{{unknown}}}; its fields are {allowed}"
        )

"""What users ask for in ``user_options``, and what the spawner writes beside it.

Input is five keys: ``dataset``, ``interface``, ``size``, ``release`` and ``relaunch`` (a past
session to run again exactly, which the pipeline turns into the other four). The spawner's own
output for a running session lives under one key, ``casaspawner``, plus ``profile``: the one key
JupyterHub's admin panel shows in its Profile column. Saved options come back as input when a
server is started again, so parsing drops exactly these output keys and refuses anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from casaspawner.errors import InvalidInput
from casaspawner.plan import (
    INTERFACES,
    OVERRIDE_REFUSED,
    SessionOptions,
    SessionPlan,
    chosen_release,
)

if TYPE_CHECKING:
    from casaspawner.session.settings import SessionSettings

#: Keys a spawn request may carry; the pipeline reads ``relaunch`` first (session.relaunch).
INPUT_KEYS = ("dataset", "interface", "size", "release", "relaunch")
#: The key holding the spawner's output for a running session.
OUTPUT_KEY = "casaspawner"
#: JupyterHub's admin panel shows ``user_options["profile"]`` in its Profile column.
PROFILE_KEY = "profile"
#: Longest dataset text accepted.
DATASET_MAX = 1024


def input_options(user_options: Mapping[str, Any]) -> dict[str, Any]:
    """``user_options`` without the spawner's own output keys."""
    return {k: v for k, v in user_options.items() if k not in (OUTPUT_KEY, PROFILE_KEY)}


def options_from_form(formdata: Mapping[str, list[str]]) -> dict[str, Any]:
    """Turn form fields, lists of strings, into ``user_options``.

    Unknown fields are kept, so that parsing names them; the hub's own fields (``_xsrf``) and
    empty choices are dropped.
    """
    options: dict[str, Any] = {}
    for key, values in formdata.items():
        if key.startswith("_"):
            continue
        value = values[0] if isinstance(values, list) and len(values) == 1 else values
        if isinstance(value, str):
            value = value.strip()
            if key in INPUT_KEYS and value == "":
                continue
        options[key] = value
    return options


def parse_options(user_options: Any, settings: SessionSettings) -> SessionOptions:
    """Check the shape of a spawn request.

    Anything wrong is refused with one sentence. A hub offering a single size ignores the size
    a request names: there is nothing to choose, and saved options may name a size of an earlier
    configuration.
    """
    if not isinstance(user_options, Mapping):
        raise InvalidInput("The spawn options must be a mapping of option names to values.")
    raw = input_options(user_options)
    unknown = sorted(set(raw) - set(INPUT_KEYS))
    if unknown:
        raise InvalidInput(
            f"{unknown[0][:40]!r} is not a session option; "
            "use dataset, interface, size, release and relaunch."
        )
    for key in INPUT_KEYS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise InvalidInput(f"The session option {key!r} must be text.")
    dataset = (raw.get("dataset") or "").strip()
    if not dataset:
        raise InvalidInput(
            "Give a dataset: an ALMA identifier or the path of a dataset in your storage."
        )
    if len(dataset) > DATASET_MAX or any(ord(c) < 32 for c in dataset):
        raise InvalidInput(f"The dataset must be one line of at most {DATASET_MAX} characters.")
    interface = (raw.get("interface") or "lab").strip()
    if interface not in INTERFACES:
        raise InvalidInput(f"{interface[:40]!r} is not an interface; choose lab or desktop.")
    sizes = settings.plan.sizes
    size = (raw.get("size") or "").strip() or settings.default_size
    if len(sizes) == 1:
        size = next(iter(sizes))
    if size not in sizes:
        raise InvalidInput(
            f"{size[:40]!r} is not a session size; choose one of {', '.join(sizes)}."
        )
    release = (raw.get("release") or "").strip() or None
    if release is not None:
        if not settings.allow_override:
            raise InvalidInput(OVERRIDE_REFUSED)
        chosen_release(settings.catalog, release)
    return SessionOptions(
        dataset=dataset,
        interface="desktop" if interface == "desktop" else "lab",
        size=size,
        release=release,
    )


def session_output(plan: SessionPlan) -> dict[str, Any]:
    """What the spawner writes into ``user_options`` for a running session."""
    return {
        PROFILE_KEY: plan.summary,
        OUTPUT_KEY: {
            "summary": plan.summary,
            "release": plan.release.id,
            "casa_version": plan.release.casa,
            "dataset": plan.options.dataset,
            "interface": plan.interface,
            "size": plan.options.size,
            "exact": plan.exact,
            "approximate": plan.approximate,
            **({"measures": plan.measures_version} if plan.measures_version else {}),
        },
    }

"""Who a session runs as, read from the login data.

The module is pure and free of JupyterHub:

- :func:`identity_from_login` turns the values an identity provider gave into an
  :class:`~casaspawner.plan.Identity`. The values are ``auth_state`` claims or what an
  operator's ``identity_hook`` returned.
- :func:`project_groups` decides which of a user's groups get a project directory. Both
  spawners use it.

Every refusal is one sentence naming the user.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from casaspawner.errors import InvalidInput, shown
from casaspawner.plan import MAX_ID, Identity, root_refusal, usable_group_name

#: An id written as text: ASCII digits, optionally signed, optionally with a fraction.
#:
#: The fraction must be zero.
_ID_TEXT = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]*))?", re.ASCII)


def login_value(mapping: Mapping[str, Any] | None, key: str) -> Any:
    """Look up a dotted key: ``key="a.b"`` gives ``mapping["a"]["b"]``.

    None when any step is missing.
    """
    value: Any = mapping
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def parse_id(value: Any, what: str, username: str) -> int | None:
    """Read a numeric id from the login data, from 0 to ``MAX_ID``.

    The value is an int, or a float or ASCII text holding a whole number: ``1001``, ``"1001"``
    or ``1001.0``. It is read exactly, never through a float and never truncated. A missing
    value gives None.
    """
    if value is None or value == "":
        return None
    printed = shown(str(value))
    number: int | None = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            number = None
        elif not value.is_integer():
            raise InvalidInput(
                f"The {what} of {username} in the login data is {printed}, not a whole number."
            )
        else:
            number = int(value)
    elif isinstance(value, str):
        match = _ID_TEXT.fullmatch(value.strip())
        if match is not None:
            sign, digits, fraction = match.groups()
            if (fraction or "").strip("0"):
                raise InvalidInput(
                    f"The {what} of {username} in the login data is {printed}, not a whole number."
                )
            number = -int(digits) if sign == "-" else int(digits)
    if number is None:
        raise InvalidInput(f"The {what} of {username} in the login data is not a number.")
    if number < 0:
        raise InvalidInput(
            f"The {what} of {username} in the login data is {printed}, which is not a valid id."
        )
    if number > MAX_ID:
        raise InvalidInput(
            f"The {what} of {username} in the login data is {printed}, "
            f"larger than the largest id ({MAX_ID})."
        )
    return number


def project_groups(
    names: Iterable[object], pattern: str | re.Pattern[str]
) -> tuple[list[str], list[str]]:
    """Sort a user's group names into project groups and skipped groups.

    Returns ``(project groups, skipped groups)``, each name once, in order. A leading ``/`` is
    dropped, as in Keycloak-style paths. Names that do not match ``pattern`` in full are left out
    silently: they are authorization-only groups. Names that match but cannot be directory names
    are *skipped*, for the caller to log. One odd group never blocks a user.
    """
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    usable: list[str] = []
    skipped: list[str] = []
    for group in names:
        name = str(group).lstrip("/")
        if not compiled.fullmatch(name) or name in usable or name in skipped:
            continue
        (usable if usable_group_name(name) else skipped).append(name)
    return usable, skipped


def identity_from_login(
    username: str,
    *,
    uid: Any,
    gid: Any,
    groups: Any,
    supplemental_gids: Any,
    group_pattern: str | re.Pattern[str] = ".*",
    fallback_uid: int | None = None,
    fallback_gid: int | None = None,
    allow_root_group: bool = False,
) -> tuple[Identity, list[str]]:
    """Build the session's identity from the login data.

    Returns ``(identity, skipped)``: ``skipped`` holds the groups whose names cannot be
    directories. ``uid``, ``gid``, ``groups`` and ``supplemental_gids`` are as the login gave
    them, None when missing. Without a uid, the operator's ``fallback_uid`` and ``fallback_gid``
    are used, if set. A missing gid is the uid. uid 0 is always refused. gid 0, primary or
    supplemental, is refused unless ``allow_root_group``.
    """
    uid_n = parse_id(uid, "uid", username)
    gid_n = parse_id(gid, "gid", username)
    if uid_n is None:
        if fallback_uid is None:
            raise InvalidInput(
                f"The login of {username} carries no numeric user id, "
                f"so no session can run as {username}; ask the hub's administrators."
            )
        uid_n = fallback_uid
        if gid_n is None:
            gid_n = fallback_gid
    if uid_n == 0:
        raise root_refusal(username, 0)
    gid_n = uid_n if gid_n is None else gid_n
    if not isinstance(groups, list | tuple):
        raise InvalidInput(f"The groups of {username} in the login data are not a list.")
    names, skipped = project_groups(groups, group_pattern)
    if not isinstance(supplemental_gids or [], list | tuple):
        raise InvalidInput(f"The group ids of {username} in the login data are not a list.")
    supplemental = [
        g
        for g in (parse_id(g, "group id", username) for g in (supplemental_gids or []))
        if g is not None
    ]
    if not allow_root_group and 0 in (gid_n, *supplemental):
        raise InvalidInput(
            f"User {username} would run with gid 0 (the root group), "
            "which this hub does not allow; ask the hub's administrators."
        )
    identity = Identity(
        username=username,
        uid=uid_n,
        gid=gid_n,
        groups=tuple(names),
        supplemental_gids=tuple(supplemental),
    )
    return identity, skipped

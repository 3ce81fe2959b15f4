"""A stand-in for JupyterHub's ``User``, and the login data (``auth_state``) it carries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class FakeGroup:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeUser:
    """What a spawner needs of ``jupyterhub.user.User``: name, id, url, groups and auth_state."""

    def __init__(
        self,
        name: str = "alice",
        auth_state: Mapping[str, Any] | None = None,
        groups: tuple[str, ...] = (),
    ):
        self.name = name
        self.id = 7
        self.url = f"/user/{name}/"
        self.groups = [FakeGroup(g) for g in groups]
        self.auth_state = dict(auth_state) if auth_state is not None else None

    async def get_auth_state(self) -> dict[str, Any] | None:
        return self.auth_state


def auth_state(
    uid: int | None = 1001,
    gid: int | None = 1001,
    groups: tuple[str, ...] = (),
    token: str | None = "tok-SECRET-42",
    **extra: Any,
) -> dict[str, Any]:
    """What OAuthenticator keeps for a user: the claims under ``oauth_user``, and the token."""
    user: dict[str, Any] = {"groups": list(groups), **extra}
    if uid is not None:
        user["uid"] = uid
    if gid is not None:
        user["gid"] = gid
    state: dict[str, Any] = {"oauth_user": user}
    if token is not None:
        state["access_token"] = token
    return state

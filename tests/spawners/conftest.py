"""Fixtures of the mixin's tests: its spawner with no backend, built the way the hub builds one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.spawners import MixinSpawner
from support.users import FakeUser, auth_state


@pytest.fixture
def make_spawner(storage: Path) -> Callable[..., MixinSpawner]:
    """Build a :class:`MixinSpawner` from config traits and a user (alice, in project proja)."""

    def build(user: FakeUser | None = None, **config: Any) -> MixinSpawner:
        config.setdefault("storage_hub_path", str(storage))
        user = user or FakeUser(auth_state=auth_state(groups=("proja",)))
        return MixinSpawner(user=user, **config)

    return build

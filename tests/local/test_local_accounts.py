"""Local accounts and groups of a root hub: injective over hub names, never a system one.

Two hub names never share a local account or group (case, characters, length), a collision is
refused with one sentence, and an account or group the hub did not make for that very name (a
system account such as daemon, a system group such as sudo, an account someone else made) is
never used.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from casaspawner.local.accounts import SYSTEM_NAME, local_name
from casaspawner.local.spawner import LocalCASASpawner

ROOT = os.geteuid() == 0
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ROOT, reason="only a hub running as root makes local accounts"),
]


@dataclass
class Group:
    name: str


@dataclass
class User:
    """What a spawner reads of a JupyterHub user before it starts."""

    name: str
    groups: list[Group] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"/user/{self.name}/"

    async def get_auth_state(self) -> None:
        return None


@pytest.fixture
def made() -> Iterator[list[tuple[str, str]]]:
    """(kind, name) of every account and group a test made, removed afterwards."""
    names: list[tuple[str, str]] = []
    yield names
    for kind, name in reversed(names):
        subprocess.run(["userdel" if kind == "user" else "groupdel", name], capture_output=True)


@pytest.fixture(autouse=True)
def base(tmp_path: Path) -> Iterator[Path]:
    """A directory every local account can search: sessions' processes enter it."""
    directory = Path(tempfile.mkdtemp(prefix="casaspawner-accounts-", dir="/tmp"))
    directory.chmod(0o755)
    BASES.append(directory)
    yield directory
    BASES.remove(directory)
    shutil.rmtree(directory, ignore_errors=True)


BASES: list[Path] = []


def identity(name: str, groups: list[str], made: list[tuple[str, str]], **traits: Any) -> Any:
    base = BASES[-1]
    local = LocalCASASpawner(
        user=User(name, [Group(g) for g in groups]),
        storage_root=str(base / "arc"),
        local_groups_file=str(base / "groups.json"),
        **traits,
    )
    # Only what did not exist before is this test's to remove: never a system account or group.
    names = [("user", local.system_username())]
    names += [("group", local_name(local.system_group_template, "group", g)) for g in groups]
    made += [(kind, name) for kind, name in names if not exists(kind, name)]
    return asyncio.run(local.session_identity())


def exists(kind: str, name: str) -> bool:
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
    except KeyError:
        return False
    return True


def sentence(caught: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(caught.value)
    assert "\n" not in text and len(text) < 300
    return text


@pytest.mark.parametrize(
    ("names", "field"),
    [
        (["Proj", "proj", "PROJ"], "group"),
        (["a" * 40, "a" * 40 + "b", "a" * 27], "group"),
        (["ivo_x", "ivo.x", "ivo-x"], "group"),
        (["Alice", "alice"], "username"),
    ],
)
def test_local_names_are_distinct_valid_system_names(names: list[str], field: str) -> None:
    template = "casa-{group}" if field == "group" else "jupyter-{username}"
    local = [local_name(template, field, name) for name in names]
    assert len(set(local)) == len(names), local
    assert all(SYSTEM_NAME.fullmatch(name) for name in local), local


def test_case_variant_projects_get_two_groups(made: list[tuple[str, str]]) -> None:
    tag = os.urandom(2).hex()
    found = identity(f"cv-{tag}", [f"Proj{tag}", f"proj{tag}"], made)
    assert len(set(found.supplemental_gids)) == 2
    for gid in found.supplemental_gids:
        assert grp.getgrgid(gid).gr_mem == [f"jupyter-cv-{tag}"]


def test_a_long_project_name_gets_a_shortened_group(made: list[tuple[str, str]]) -> None:
    tag = os.urandom(2).hex()
    long = f"a-very-long-project-name-{tag}-of-many-characters"
    found = identity(f"long-{tag}", [long], made)
    (gid,) = found.supplemental_gids
    name = grp.getgrgid(gid).gr_name
    assert len(name) <= 32 and name.startswith("casa-a-very-long-proj")


def test_case_variant_users_never_share_an_account(made: list[tuple[str, str]]) -> None:
    tag = os.urandom(2).hex()
    lower = identity(f"bob{tag}", [], made)
    upper = identity(f"Bob{tag}", [], made)
    assert lower.uid != upper.uid
    assert pwd.getpwuid(upper.uid).pw_gecos.startswith(f"casaspawner session user Bob{tag}")


def test_an_account_made_for_another_hub_name_is_refused(made: list[tuple[str, str]]) -> None:
    tag = os.urandom(2).hex()
    name = f"jupyter-mallory-{tag}"
    subprocess.run(["useradd", "--no-create-home", name], check=True)
    made.append(("user", name))
    with pytest.raises(Exception) as caught:
        identity(f"mallory-{tag}", [], made)
    assert sentence(caught) == (
        f"The local account {name} exists but this hub did not make it for mallory-{tag}; "
        "ask the hub's administrators."
    )


@pytest.mark.parametrize("system", ["daemon", "www-data", "root"])
def test_a_system_account_is_never_a_sessions(system: str, made: list[tuple[str, str]]) -> None:
    with pytest.raises(Exception) as caught:
        identity(system, [], [], system_username_template="{username}")
    assert sentence(caught).startswith(f"The local account {system} ")


@pytest.mark.parametrize("system", ["root", "sudo", "shadow", "disk"])
def test_a_system_group_is_never_a_projects(system: str, made: list[tuple[str, str]]) -> None:
    tag = os.urandom(2).hex()
    with pytest.raises(Exception) as caught:
        identity(f"sys-{tag}", [system], made, system_group_template="{group}")
    assert sentence(caught) == (
        f"The local group {system} exists but this hub did not make it for the project "
        f"{system}; ask the hub's administrators."
    )
    assert f"jupyter-sys-{tag}" not in grp.getgrnam(system).gr_mem

"""The spawners' pure parts: ids and project groups from the login data, and the storage mount reader."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from casaspawner.catalog.model import load_catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import write_dataset
from casaspawner.errors import InvalidInput
from casaspawner.plan import MAX_ID, Identity, StorageLayout
from casaspawner.session.identity import identity_from_login, parse_id, project_groups
from casaspawner.session.readers import StorageMountReader


# ------------------------------------------------------------------------------------------ ids
@pytest.mark.parametrize(
    ("value", "expected"),
    [(1001, 1001), ("1001", 1001), (" +1001 ", 1001), (1001.0, 1001), ("1001.000", 1001), (MAX_ID, MAX_ID),
     (str(MAX_ID), MAX_ID), (0, 0), (None, None), ("", None)],
)  # fmt: skip
def test_ids_are_read_exactly(value, expected):
    assert parse_id(value, "uid", "alice") == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("99999999999999999999", "is 99999999999999999999, larger than the largest id (4294967294)."),
        (2**40, "is 1099511627776, larger than the largest id (4294967294)."),
        (MAX_ID + 1, "is 4294967295, larger than the largest id (4294967294)."),
        (1e20, "larger than the largest id (4294967294)."),
        ("１２３", "is not a number."),  # Unicode digits: not an id in any login data
        ("٣", "is not a number."),
        ("1e3", "is not a number."),
        (True, "is not a number."),
        (float("nan"), "is not a number."),
        ("1001.5", "is 1001.5, not a whole number."),
        ("-5", "is -5, which is not a valid id."),
    ],
)
def test_ids_that_are_not_ids_are_one_sentence(value, expected):
    with pytest.raises(InvalidInput) as info:
        parse_id(value, "uid", "alice")
    assert str(info.value).startswith("The uid of alice in the login data ") and str(info.value).endswith(
        expected
    )


def test_supplemental_gids_are_checked_like_the_others():
    login = {"uid": 1001, "gid": 1001, "groups": []}
    with pytest.raises(InvalidInput, match=r"group id of alice in the login data is 4294967296, larger"):
        identity_from_login("alice", supplemental_gids=[100, 2**32], **login)
    with pytest.raises(InvalidInput, match=r"group id of alice in the login data is not a number"):
        identity_from_login("alice", supplemental_gids=["１"], **login)
    identity, _ = identity_from_login("alice", supplemental_gids=["100", 200.0], **login)
    assert identity.supplemental_gids == (100, 200)
    for bad in (-1, MAX_ID + 1):  # the plan's own check, for identities made elsewhere
        with pytest.raises(InvalidInput, match=r"which is not an id \(0 to 4294967294\)"):
            Identity("alice", 1001, 1001, supplemental_gids=(bad,))


def test_project_groups_are_one_rule_for_both_spawners():
    usable, skipped = project_groups(
        ["/proja", "proja", "Proj", "proj", "my group", "admins", "/org/sub", 7],
        "proj.*|Proj|my group|org/sub|7",
    )
    assert usable == ["proja", "Proj", "proj", "7"]  # "/" dropped, each once, case kept
    assert skipped == ["my group", "org/sub"]


# ------------------------------------------------------------------------------------------ the mount reader
@pytest.fixture
def cavern(tmp_path: Path) -> Path:
    root = tmp_path / "cavern"
    write_dataset(root / "home" / "alice" / "data" / "ds", "cycle10")
    write_dataset(root / "home" / "bob" / "data" / "ds", "cycle7")
    return root


def test_the_resolver_reads_the_directory_that_was_checked(cavern: Path):
    """A link swapped in after the walk checked the path cannot send the resolver into another user's data."""
    reader = StorageMountReader(cavern, StorageLayout())
    alice = Identity("alice", 1001, 1001)
    home = cavern / "home" / "alice"
    text = "data/ds"
    catalog = load_catalog()

    async def swap_then_resolve() -> str:
        async with reader.open(text, alice) as path:
            (home / "data").rename(home / "moved")
            (home / "data").symlink_to(cavern / "home" / "bob" / "data")  # the same names, bob's dataset
            return resolve_path(path, catalog, label=text).release.id

    try:
        assert (
            asyncio.run(swap_then_resolve()) == "pl-2023.1.0.124"
        )  # alice's Cycle 10 data, not bob's Cycle 7
        assert resolve_path(home / text, catalog).release.pipeline == "2020.1.0.40"  # by name: bob's
    finally:
        (home / "data").unlink()
        (home / "moved").rename(home / "data")


def test_paths_the_hub_cannot_open_are_one_sentence(cavern: Path):
    reader = StorageMountReader(cavern, StorageLayout())
    alice = Identity("alice", 1001, 1001)

    async def located(text: str) -> None:
        async with reader.open(text, alice):
            pass

    with pytest.raises(InvalidInput) as info:
        asyncio.run(located("a" * 300))
    message = str(info.value)
    assert message.startswith("The dataset path 'aaaa") and "(300 characters)" in message
    assert message.endswith(
        "cannot be opened (File name too long); give an ALMA dataset directory or an ALMA identifier."
    )
    assert str(cavern) not in message and len(message) < 400
    (cavern / "home" / "alice" / "file").write_text("not a directory")
    for text in ("file", "file/below", "missing/x"):
        with pytest.raises(InvalidInput, match=f"There is no dataset directory at '{text}' in your storage"):
            asyncio.run(located(text))


def test_the_walk_leaves_no_descriptor_open(cavern: Path):
    reader = StorageMountReader(cavern, StorageLayout())
    alice = Identity("alice", 1001, 1001)
    (cavern / "home" / "alice" / "to-bob").symlink_to(cavern / "home" / "bob")
    before = len(os.listdir("/proc/self/fd"))

    async def use(text: str) -> None:
        async with reader.open(text, alice) as path:
            assert path.is_dir()

    for _ in range(20):
        asyncio.run(use("data/ds"))
        with pytest.raises(InvalidInput, match="leads outside your storage"):
            asyncio.run(use("to-bob/data"))
        with pytest.raises(InvalidInput, match="no dataset directory"):
            asyncio.run(use("data/ds/nothing"))
    assert len(os.listdir("/proc/self/fd")) == before


def test_directories_the_hub_may_only_search_are_walked_through():
    """As by name: a directory on the way that the hub may search but not list (``-wx--x--x``) is no obstacle.
    Run as a user root's permissions do not cover (uid 65534 when the tests run as root)."""
    base = Path(tempfile.mkdtemp(prefix="casaspawner-search-only-", dir="/tmp"))
    try:
        base.chmod(0o755)
        write_dataset(base / "home" / "alice" / "data" / "ds", "cycle10")
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        if os.geteuid() == 0:
            for path in [base, *base.rglob("*")]:
                os.chown(path, uid, uid)
        (base / "home" / "alice" / "data").chmod(0o311)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no root, find the dataset's release, report it
            try:
                os.close(read)
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)

                async def resolve() -> str:
                    reader = StorageMountReader(base, StorageLayout())
                    async with reader.open("data/ds", Identity("alice", 1001, 1001)) as path:
                        return resolve_path(path, load_catalog(), label="data/ds").release.id

                os.write(write, asyncio.run(resolve()).encode())
            except BaseException as exc:  # everything goes back to the parent
                os.write(write, f"{type(exc).__name__}: {exc}".encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read().decode()
        os.waitpid(pid, 0)
        assert answer == "pl-2023.1.0.124"
    finally:
        (base / "home" / "alice" / "data").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)

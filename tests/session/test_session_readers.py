"""Opening the dataset a user names: where it is in their storage, and the storage mount reader."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from support.forks import answer_in_child

from casaspawner.catalog.model import load_catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import write_dataset
from casaspawner.errors import InvalidInput
from casaspawner.plan import Identity, StorageLayout
from casaspawner.session.readers import (
    StorageMountReader,
    StorageRoot,
    _LinkDirectories,
    locate_in_storage,
)


def test_locate_in_storage_is_pure_and_strict():
    layout = StorageLayout()
    alice = Identity("alice", 1001, 1001, groups=("proja",))
    home = StorageRoot("/arc/home/alice", "home/alice")
    project = StorageRoot("/arc/projects/proja", "projects/proja")
    assert locate_in_storage("data/x", alice, layout) == (
        home,
        locate_in_storage("~/data/x", alice, layout)[1],
    )
    assert locate_in_storage("/arc/home/alice/data/x", alice, layout)[0] == home
    assert str(locate_in_storage("/arc/projects/proja/shared", alice, layout)[1]) == "shared"
    assert locate_in_storage("/arc/projects/proja", alice, layout)[0] == project
    outside = ("/arc/home/alice/../bob", "/arc/home/alicex/data", "/arc/projects/projb/x", "/")
    for bad in (*outside, "a/../../b"):
        with pytest.raises(Exception, match=r"outside your storage|may not contain"):
            locate_in_storage(bad, alice, layout)


@pytest.fixture
def cavern(tmp_path: Path) -> Path:
    root = tmp_path / "cavern"
    write_dataset(root / "home" / "alice" / "data" / "ds", "cycle10")
    write_dataset(root / "home" / "bob" / "data" / "ds", "cycle7")
    return root


def test_each_read_has_a_private_directory_and_leaves_nothing(cavern: Path):
    """Two reads of the same dataset at once get their own links, in directories only the hub
    may enter, each removed when its read ends."""
    reader = StorageMountReader(cavern, StorageLayout())
    alice = Identity("alice", 1001, 1001)

    async def read_twice() -> list[Path]:
        async with reader.open("data/ds", alice) as one, reader.open("data/ds", alice) as two:
            assert one != two and one.name == two.name == "ds"
            for path in (one, two):
                assert path.is_dir() and path.is_symlink()
                assert any(path.iterdir())
                info = path.parent.stat()
                assert (info.st_mode & 0o777, info.st_uid) == (0o700, os.geteuid())
            return [one.parent, two.parent]

    for directory in asyncio.run(read_twice()):
        assert not directory.exists()
        if os.access("/dev/shm", os.W_OK | os.X_OK):
            assert Path("/dev/shm") in directory.parents


def test_link_directories_fall_back_to_the_temporary_directory(tmp_path: Path):
    """Without a memory-backed directory the hub may write, the links go where tempfile says."""
    links = _LinkDirectories(memory=str(tmp_path / "no-shm"))
    made = Path(links.make())
    try:
        assert made.parent.parent == Path(tempfile.gettempdir())
        assert made.parent.name.startswith("casaspawner-datasets-")
    finally:
        links.remove(str(made))
        made.parent.rmdir()
    assert not made.parent.exists()


def test_the_resolver_reads_the_directory_that_was_checked(cavern: Path):
    """A link swapped in after the walk checked the path cannot send the resolver into another
    user's data."""
    reader = StorageMountReader(cavern, StorageLayout())
    alice = Identity("alice", 1001, 1001)
    home = cavern / "home" / "alice"
    text = "data/ds"
    catalog = load_catalog()

    async def swap_then_resolve() -> str:
        async with reader.open(text, alice) as path:
            (home / "data").rename(home / "moved")
            # The same names, bob's dataset.
            (home / "data").symlink_to(cavern / "home" / "bob" / "data")
            return resolve_path(path, catalog, label=text).release.id

    try:
        # alice's Cycle 10 data, not bob's Cycle 7.
        assert asyncio.run(swap_then_resolve()) == "pl-2023.1.0.124"
        # By name: bob's.
        assert resolve_path(home / text, catalog).release.pipeline == "2020.1.0.40"
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
        "cannot be opened (File name too long); give an ALMA dataset directory or an ALMA "
        "identifier."
    )
    assert str(cavern) not in message and len(message) < 400
    (cavern / "home" / "alice" / "file").write_text("not a directory")
    for text in ("file", "file/below", "missing/x"):
        with pytest.raises(
            InvalidInput, match=f"There is no dataset directory at '{text}' in your storage"
        ):
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


def test_look_walks_as_open_does_and_closes_the_directory(cavern: Path):
    """``look`` gives its callable the directory ``open`` would give the resolver, under the same
    name, refuses the same paths, and leaves nothing open."""
    reader = StorageMountReader(cavern, StorageLayout())
    alice = Identity("alice", 1001, 1001)
    (cavern / "home" / "alice" / "to-bob").symlink_to(cavern / "home" / "bob")
    dataset = cavern / "home" / "alice" / "data" / "ds"
    before = len(os.listdir("/proc/self/fd"))

    def inspect(fd: int, name: str) -> tuple[bool, str]:
        return os.path.samestat(os.fstat(fd), dataset.stat()), name

    assert asyncio.run(reader.look("~/data/ds", alice, inspect)) == (True, "ds")
    for text, refusal in (("to-bob/data", "leads outside your storage"), ("x/y", "no dataset")):
        with pytest.raises(InvalidInput, match=refusal):
            asyncio.run(reader.look(text, alice, inspect))
    assert len(os.listdir("/proc/self/fd")) == before


def test_directories_the_hub_may_only_search_are_walked_through():
    """As by name: a directory on the way that the hub may search but not list (``-wx--x--x``) is
    no obstacle. Run as a user root's permissions do not cover (uid 65534 when the tests run as
    root)."""
    base = Path(tempfile.mkdtemp(prefix="casaspawner-search-only-", dir="/tmp"))
    try:
        base.chmod(0o755)
        write_dataset(base / "home" / "alice" / "data" / "ds", "cycle10")
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        if os.geteuid() == 0:
            for path in [base, *base.rglob("*")]:
                os.chown(path, uid, uid)
        (base / "home" / "alice" / "data").chmod(0o311)
        # Loaded here: the child may not read Python's own files where root installed them.
        catalog = load_catalog()

        def resolve_as_nobody() -> str:
            # The child: no root, find the dataset's release, report it.
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

            async def resolve() -> str:
                reader = StorageMountReader(base, StorageLayout())
                async with reader.open("data/ds", Identity("alice", 1001, 1001)) as path:
                    return resolve_path(path, catalog, label="data/ds").release.id

            return asyncio.run(resolve())

        answer = answer_in_child(resolve_as_nobody)
        assert answer == "pl-2023.1.0.124"
    finally:
        (base / "home" / "alice" / "data").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)

"""A user swapping files and directories of their dataset for links while the hub resolves it
learns nothing about what those links point to.

The hub may read every user's storage (a read-only mount of all of it, or as root), and the dataset
is the user's to change at any moment. A thread keeps replacing one file or directory of the
dataset with a link to the same name in another dataset (the "secret", which the user may not read)
and putting it back, while the resolver runs many times: every resolution finds the dataset's own
evidence or passes the link over, and never reports the secret's versions.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from casaspawner.catalog import Catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import DatasetSpec, Evidence, write_dataset
from casaspawner.errors import ResolutionError

MOUS = "uid___A001_X3621_X3d68"
#: Both datasets use the same names, so a swapped-in link finds a file wherever the resolver looks;
#: only the versions differ, and the secret's must never come out.
OWN = DatasetSpec("2023.1.00026.S", MOUS, "6.5.4.9", "2023.1.0.124")
SECRET = replace(OWN, casa="6.4.1.12", pipeline="2022.2.0.64")
SECRET_WORDS = ("6.4.1", "2022.2.0.64")
WEBLOG = f"qa/member.{MOUS}.hifa_calimage.weblog/pipeline-20231015T120000/html"

# case -> (evidence in both datasets, what is swapped: a path relative to the member directory; "."
# is the member directory itself, and the dataset is then given as its project directory)
CASES: dict[str, tuple[tuple[Evidence, ...], str]] = {
    "manifest file": (("manifest",), f"script/member.{MOUS}.hifa_calimage.pipeline_manifest.xml"),
    "script directory": (("manifest",), "script"),
    "weblog page": (("weblog",), f"{WEBLOG}/t1-1.html"),
    "weblog html directory": (("weblog",), WEBLOG),
    "packed weblog": (("weblog-tgz",), f"qa/member.{MOUS}.hifa_calimage.weblog.tgz"),
    "member directory": (("manifest",), "."),
}
#: Resolutions to run: at least these, and until both the dataset's own evidence and the swapped
#: state were seen.
RESOLUTIONS = 300
#: Seconds, on a slow, shared machine.
DEADLINE = 30.0


def swap(target: Path, secret: Path) -> Callable[[bool], None]:
    """A step that replaces ``target`` with a link to ``secret`` (True) or puts the original back
    (False).

    Files are replaced atomically (the name always exists); directories are moved aside and back.
    """
    spare, aside = target.with_name(".spare"), target.with_name(".aside")
    if target.is_dir():

        def step_dir(to_link: bool) -> None:
            if to_link:
                target.rename(aside)
                target.symlink_to(secret)
            else:
                target.unlink()
                aside.rename(target)

        return step_dir
    # The original, to put back.
    os.link(target, aside)

    def step_file(to_link: bool) -> None:
        if to_link:
            spare.symlink_to(secret)
        else:
            os.link(aside, spare)
        spare.replace(target)

    return step_file


@contextlib.contextmanager
def swapping(step: Callable[[bool], None]) -> Iterator[None]:
    """Run ``step`` back and forth in a thread, as fast as it goes, with the interpreter switching
    threads as often as it can (so the swaps land between the resolver's system calls)."""
    stop = threading.Event()

    def run() -> None:
        linked = False
        while not stop.is_set():
            linked = not linked
            step(linked)
            # Let the resolver run in either state.
            time.sleep(0)
        if linked:
            step(False)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("case", sorted(CASES))
def test_links_swapped_in_while_resolving_never_reveal_what_they_point_to(
    tmp_path: Path, catalog: Catalog, case: str
) -> None:
    evidence, swapped = CASES[case]
    own = write_dataset(tmp_path / "ds", spec=replace(OWN, evidence=(*evidence, "casalog")))
    secret = write_dataset(tmp_path / "secret", spec=replace(SECRET, evidence=evidence))
    root = tmp_path / "ds" if swapped == "." else own
    expected = {"manifest": "manifest", "weblog": "weblog", "weblog-tgz": "weblog"}[evidence[0]]
    seen: Counter[str] = Counter()
    with swapping(swap((own / swapped).resolve(), (secret / swapped).resolve())):
        start = time.monotonic()
        while time.monotonic() - start < DEADLINE:
            try:
                resolution = resolve_path(root, catalog)
            except ResolutionError as exc:
                # For example, the member directory was a link: not a MOUS.
                said = str(exc)
                seen["error"] += 1
            else:
                said = (
                    f"{resolution.processed_with} {resolution.evidence.path} {resolution.reason}"
                )
                seen[resolution.evidence.kind] += 1
            assert not any(word in said for word in SECRET_WORDS), f"the secret leaked: {said}"
            if sum(seen.values()) >= RESOLUTIONS and seen[expected] and len(seen) > 1:
                break
    # the race was run: the dataset's own evidence was read, and so was the dataset with the link
    # in place
    assert seen[expected] and len(seen) > 1, seen
    assert sum(seen.values()) >= RESOLUTIONS, seen
    # and afterwards the dataset resolves as before
    assert resolve_path(root, catalog).evidence.kind == expected

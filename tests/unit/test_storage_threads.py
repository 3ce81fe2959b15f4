"""The hub's storage threads: outcomes, deadlines, late results and how many threads run."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading

import pytest
from support.forks import answer_in_child

from casaspawner.datasets.storage import StorageThreads
from casaspawner.errors import StorageUnavailable

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


async def test_a_look_runs_in_a_storage_thread_with_the_callers_context():
    """The result comes back, an error is raised as it was, and the caller's context goes along."""
    threads = StorageThreads(2)
    WHO.set("alice")
    seen = await threads.call(
        lambda: (threading.current_thread().name, threading.current_thread().daemon, WHO.get()),
        deadline=5,
        what="x",
    )
    assert seen == ("casaspawner-storage-0", True, "alice")

    def fails() -> None:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(FileNotFoundError):
        await threads.call(fails, deadline=5, what="x")


async def test_a_look_past_its_deadline_is_one_sentence_and_its_late_result_is_handed_on():
    threads = StorageThreads(2)
    release = threading.Event()
    late: list[str] = []
    with pytest.raises(StorageUnavailable) as raised:
        await threads.call(
            lambda: release.wait(10) and "walked", deadline=0.1, what="'data/x'", late=late.append
        )
    assert str(raised.value) == (
        "The storage did not answer within 0.1 seconds while the hub looked at 'data/x'; "
        "try again in a few minutes."
    )
    # Another look takes the second thread meanwhile.
    assert await threads.call(lambda: "answered", deadline=5, what="x") == "answered"
    release.set()
    for _ in range(100):
        if late:
            break
        await asyncio.sleep(0.02)
    assert late == ["walked"]


async def test_a_cancelled_callers_result_is_handed_on():
    threads = StorageThreads(1)
    release = threading.Event()
    late: list[str] = []
    waiting = asyncio.ensure_future(
        threads.call(lambda: release.wait(10) and "opened", deadline=5, what="x", late=late.append)
    )
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    assert await threads.call(lambda: "next", deadline=5, what="x") == "next"
    assert late == ["opened"]


async def test_threads_start_only_for_looks_that_wait_and_at_most_count():
    """Looks one after another take one thread; looks that block take up to ``count``."""
    threads = StorageThreads(3)
    for _ in range(20):
        await threads.call(lambda: None, deadline=5, what="x")
    assert len(threads._threads) == 1
    release = threading.Event()
    blocked = [
        asyncio.ensure_future(threads.call(lambda: release.wait(10), deadline=5, what="x"))
        for _ in range(6)
    ]
    await asyncio.sleep(0.1)
    assert len(threads._threads) == 3
    release.set()
    assert await asyncio.gather(*blocked) == [True] * 6
    assert len(threads._threads) == 3


def test_a_child_process_starts_its_own_threads():
    """``fork`` copies no thread: a child's looks start threads of its own."""
    threads = StorageThreads(1)
    assert asyncio.run(threads.call(lambda: os.getpid(), deadline=5, what="x")) == os.getpid()
    answer = answer_in_child(
        lambda: str(asyncio.run(threads.call(lambda: os.getpid(), deadline=5, what="x")))
    )
    # The child's own pid: its look ran, in its own thread.
    assert answer.isdigit() and answer != str(os.getpid()), answer

"""The hub's own threads for looking at users' storage, each look with a deadline.

Storage such as Cavern is a network file system, which can be slow, or hang. The hub never looks
at it from its event loop; it looks from the few threads here, which nothing else uses:

* a hung storage server ties up these threads, never the ones the rest of the hub shares
  (``asyncio.to_thread``'s), and never keeps the hub from stopping (they are daemon threads);
* a look that outlasts its deadline ends the caller's wait with one sentence
  (:class:`~casaspawner.errors.StorageUnavailable`). Its thread goes on, and what it returns
  late goes to the caller's ``late`` (to close a descriptor, say).

A thread starts only when a look waits and no thread is idle, up to :data:`THREADS`.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from casaspawner.errors import StorageUnavailable

T = TypeVar("T")

#: How many looks at the storage run at once; more wait for a thread.
THREADS = 4


@dataclass
class _Look(Generic[T]):
    """One look: what to call, and where its caller waits."""

    call: Callable[[], T]
    loop: asyncio.AbstractEventLoop
    waiting: asyncio.Future[T]
    late: Callable[[T], object] | None
    context: contextvars.Context = field(default_factory=contextvars.copy_context)

    def run(self) -> tuple[Any, BaseException | None]:
        """Call, in a storage thread: the result, or what the call raised."""
        # Whatever the call raises is the caller's to raise.
        try:
            return self.context.run(self.call), None
        except BaseException as exc:
            return None, exc

    def deliver(self, result: T, error: BaseException | None) -> None:
        """Hand the outcome to the caller's event loop."""
        try:
            self.loop.call_soon_threadsafe(self._settle, result, error)
        except RuntimeError:
            # The event loop is closed: nobody waits any more.
            self._abandoned(result, error)

    def _settle(self, result: T, error: BaseException | None) -> None:
        if self.waiting.done():
            # The caller stopped waiting (its deadline, or its task was cancelled).
            self._abandoned(result, error)
        elif error is not None:
            self.waiting.set_exception(error)
        else:
            self.waiting.set_result(result)

    def _abandoned(self, result: T, error: BaseException | None) -> None:
        if error is None and self.late is not None:
            self.late(result)


class StorageThreads:
    """A few daemon threads that run blocking looks at the storage.

    A thread starts when a look waits and none is idle, up to ``count``.
    """

    def __init__(self, count: int = THREADS) -> None:
        self.count = count
        self._reset()
        _EVERY.add(self)

    def _reset(self) -> None:
        """No threads and no looks: as made, and in a child process after ``fork``."""
        self._queue: queue.SimpleQueue[_Look[Any]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Threads waiting for a look, guarded by the lock.
        self._idle = 0
        self._lock = threading.Lock()

    async def call(
        self,
        call: Callable[[], T],
        *,
        deadline: float,
        what: str,
        late: Callable[[T], object] | None = None,
    ) -> T:
        """Return ``call()`` run in a storage thread, waiting at most ``deadline`` seconds.

        ``what`` names what was looked at, in the sentence of a look past its deadline; ``late``
        gets the result of a look its caller no longer waits for.
        """
        loop = asyncio.get_running_loop()
        look = _Look(call, loop, loop.create_future(), late)
        self._queue.put(look)
        self._start_thread()
        try:
            return await asyncio.wait_for(look.waiting, deadline)
        except TimeoutError:
            raise StorageUnavailable(
                f"The storage did not answer within {deadline:g} seconds while the hub looked "
                f"at {what}; try again in a few minutes."
            ) from None

    def _start_thread(self) -> None:
        """Start one more thread if looks wait for one and not all are there."""
        with self._lock:
            if self._idle < self._queue.qsize() and len(self._threads) < self.count:
                thread = threading.Thread(
                    target=self._work,
                    name=f"casaspawner-storage-{len(self._threads)}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        with self._lock:
            self._idle += 1
        while True:
            look = self._queue.get()
            with self._lock:
                self._idle -= 1
            outcome = look.run()
            # Idle before the caller wakes, so that its next look needs no new thread.
            with self._lock:
                self._idle += 1
            look.deliver(*outcome)


#: Every pool of storage threads, for a child process to start afresh: ``fork`` copies no thread.
_EVERY: weakref.WeakSet[StorageThreads] = weakref.WeakSet()


def _forked() -> None:
    for threads in _EVERY:
        threads._reset()


os.register_at_fork(after_in_child=_forked)

#: The hub's storage threads, shared by every spawner in the process.
STORAGE = StorageThreads()

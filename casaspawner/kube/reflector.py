"""A pod reflector that wakes a starting spawn when its pod changes.

KubeSpawner waits for a new pod by looking at its reflector's copy of the pod with jittered
exponential back-off (up to 0.2 s apart, then up to 0.4 s, … up to 5 s), so a start ends up to
that long after the pod watch showed the pod running. :class:`WatchedPodReflector` is the same
reflector, whose pods, when one changes or all are listed again, wake whoever waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from kubespawner.spawner import PodReflector
from traitlets import validate


class _PodTable(dict[str, Any]):
    """The reflector's pods by ``namespace/name``; a change calls ``changed(key)``."""

    def __init__(self, pods: dict[str, Any], changed: Callable[[str], None]) -> None:
        super().__init__(pods)
        self._changed = changed

    def __setitem__(self, key: str, pod: Any) -> None:
        super().__setitem__(key, pod)
        self._changed(key)

    def pop(self, key: str, *default: Any) -> Any:
        pod = super().pop(key, *default)
        self._changed(key)
        return pod


class WatchedPodReflector(PodReflector):  # type: ignore[misc]
    """KubeSpawner's pod reflector, telling waiters when a pod changes.

    The watch sets and pops pods one at a time; a full list (the first, and each one after the
    watch restarts) replaces them all, which wakes every waiter.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The futures of those waiting on a pod, by the pod's key.
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        super().__init__(*args, **kwargs)

    @validate("resources")
    def _watched_table(self, proposal: Any) -> _PodTable:
        self._wake_all()
        return _PodTable(proposal.value, self._wake)

    def _wake(self, key: str) -> None:
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(None)

    def _wake_all(self) -> None:
        for key in list(self._waiters):
            self._wake(key)

    async def changed(self, key: str, timeout: float) -> None:
        """Return when the pod ``key`` changes, or after ``timeout`` seconds."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(future)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout)
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._waiters[key]

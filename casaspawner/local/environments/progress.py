"""How far a long step of a build is: downloads with size, rate and time left, heartbeats.

A build says what it does in sentences (``str``). A long step also yields :class:`Progress`
sentences, which are ``str`` too, so every reader can show them as text, and say how far the
step is: the spawn page draws a bar from them, ``make demo`` redraws one line in the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

#: Seconds without a word from a step after which it is said to be still running.
HEARTBEAT = 5.0


class Progress(str):
    """A sentence about a long step, with how far it is.

    ``step`` names the step; updates of one step share it. ``done`` and ``total`` are bytes (a
    ``total`` of 0 is unknown), ``rate`` bytes per second, ``left`` seconds (None: unknown).
    A heartbeat (a step that has been quiet for a while) has ``done`` and ``total`` 0 and
    ``elapsed`` set.
    """

    step: str
    done: int
    total: int
    rate: float
    left: float | None
    elapsed: float

    def __new__(
        cls,
        text: str,
        *,
        step: str,
        done: int = 0,
        total: int = 0,
        rate: float = 0.0,
        left: float | None = None,
        elapsed: float = 0.0,
    ) -> Progress:
        made = super().__new__(cls, text)
        made.step, made.done, made.total = step, done, total
        made.rate, made.left, made.elapsed = rate, left, elapsed
        return made

    @property
    def fraction(self) -> float | None:
        """How much of the step is done, from 0 to 1; None when that is unknown."""
        return min(self.done / self.total, 1.0) if self.total > 0 else None


def megabytes(size: float) -> str:
    """``size`` bytes in MB (10**6 bytes, as pip counts): ``270 MB``, ``3.2 MB``."""
    return f"{size / 1e6:.1f} MB" if size < 10e6 else f"{size / 1e6:.0f} MB"


def duration(seconds: float) -> str:
    """A short duration: ``45 s``, ``3 min 05 s``."""
    whole = max(round(seconds), 0)
    if whole < 60:
        return f"{whole} s"
    return f"{whole // 60} min {whole % 60:02d} s"


class TransferMeter:
    """Measures one transfer: how much, how fast, how long still.

    The rate is taken over the last few seconds, so a stall shows soon.
    """

    #: Seconds of history the rate is measured over.
    WINDOW = 5.0

    def __init__(self, what: str, total: int, clock: Any = time.monotonic) -> None:
        self.what = what
        self.total = max(total, 0)
        self.clock = clock
        self.started = clock()
        self.samples: list[tuple[float, int]] = [(self.started, 0)]

    def update(self, done: int) -> Progress:
        """A :class:`Progress` for ``done`` bytes so far."""
        now = self.clock()
        self.samples = [s for s in self.samples if now - s[0] <= self.WINDOW] or self.samples[-1:]
        self.samples.append((now, done))
        first_time, first_done = self.samples[0]
        span = now - first_time
        rate = (done - first_done) / span if span > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 and self.total else None
        if self.total:
            text = f"{self.what}: {megabytes(done)} of {megabytes(self.total)}"
        else:
            text = f"{self.what}: {megabytes(done)}"
        if rate > 0:
            text += f", {megabytes(rate)}/s"
        if left is not None:
            text += f", about {duration(left)} left"
        return Progress(
            text + ".", step=self.what, done=done, total=self.total, rate=rate, left=left
        )


async def with_heartbeat(
    steps: AsyncIterator[str], every: float = HEARTBEAT
) -> AsyncIterator[str]:
    """Pass on ``steps``; when they are quiet for ``every`` seconds, say what is still running.

    The heartbeat repeats the last plain sentence with the time since it was said, as a
    :class:`Progress` whose ``step`` is that sentence.
    """
    iterator = steps.__aiter__()

    async def following() -> str:
        return await iterator.__anext__()

    last: str | None = None
    since = time.monotonic()
    pending: asyncio.Task[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(following())
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                if last is not None:
                    elapsed = time.monotonic() - since
                    text = f"{last.rstrip('.')}: {duration(elapsed)} so far."
                    yield Progress(text, step=last, elapsed=elapsed)
                continue
            finished, pending = pending, None
            try:
                message = finished.result()
            except StopAsyncIteration:
                return
            if not isinstance(message, Progress):
                last, since = message, time.monotonic()
            yield message
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        closer = getattr(iterator, "aclose", None)
        if closer is not None:
            await closer()

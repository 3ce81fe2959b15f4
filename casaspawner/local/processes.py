"""The processes of a local session: found through /proc, signalled safely."""

from __future__ import annotations

import os
import signal
import time


def _process_table() -> dict[int, tuple[int, int]]:
    """Read every process now from /proc.

    Maps each pid to its parent pid and its start time, in clock ticks after boot.
    """
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _stat(int(entry))) is not None:
            table[int(entry)] = found
    return table


def _stat(pid: int) -> tuple[int, int] | None:
    """Read the parent pid and start time of process ``pid``.

    These are fields 4 and 22 of ``/proc/<pid>/stat``. None if the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _below(pid: int, table: dict[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (ppid, _start) in table.items():
        children.setdefault(ppid, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found[::-1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now, children first.

    Read from /proc.
    """
    return _below(pid, _process_table())


class ProcessHandle:
    """One process, held so that a later signal never reaches another process.

    Another process may have got its pid since. The handle holds a pidfd, from ``os.pidfd_open``
    on Linux 5.3 or later. Otherwise it holds the process's start time, compared before each
    signal.
    """

    def __init__(self, pid: int, start: int, fd: int | None) -> None:
        self.pid, self.start, self.fd = pid, start, fd

    @classmethod
    def open(
        cls, pid: int, start: int | None = None, *, pidfd: bool = True
    ) -> ProcessHandle | None:
        """Open a handle on process ``pid``.

        With ``start``, only if it is still the process that started then. None if it is gone.
        ``pidfd=False`` uses the start-time comparison only.
        """
        fd = None
        if pidfd and hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return None
            except OSError:
                # ENOSYS before Linux 5.3, or refused by a seccomp filter: start times only.
                fd = None
        # After pidfd_open, so the pidfd is of the process whose start time this is.
        found = _stat(pid)
        if found is None or (start is not None and found[1] != start):
            if fd is not None:
                os.close(fd)
            return None
        return cls(pid, found[1], fd)

    def signal(self, sig: int) -> bool:
        """Send ``sig``, or with 0 only check that the process lives.

        False when the process is gone, or not ours to signal.
        """
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                found = _stat(self.pid)
                if found is None or found[1] != self.start:
                    return False
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def session_processes(pid: int) -> list[ProcessHandle]:
    """Handles on every process below ``pid`` now, children first."""
    table = _process_table()
    handles = (ProcessHandle.open(child, table[child][1]) for child in _below(pid, table))
    return [handle for handle in handles if handle is not None]


def terminate(processes: list[ProcessHandle], grace: float = 5.0) -> None:
    """Stop ``processes`` with SIGTERM, then SIGKILL those alive after ``grace`` seconds."""
    alive = [p for p in processes if p.signal(signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if p.signal(0)]
    for process in alive:
        process.signal(signal.SIGKILL)

"""Run a function in a forked child process and get back what it answered."""

from __future__ import annotations

import os
from collections.abc import Callable


def answer_in_child(work: Callable[[], str]) -> str:
    """What ``work()`` returns in a child process made by ``fork``.

    An exception in the child comes back as ``"<type>: <message>"``.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            answer = work()
        except BaseException as exc:
            # Everything goes back to the parent.
            answer = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write, answer.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer

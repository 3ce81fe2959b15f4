"""How the spawners show an error to the user.

An error is one sentence on the form or the progress page.
"""

from __future__ import annotations

import logging

from tornado import web

from casaspawner.errors import CasaspawnerError, ConfigurationError, ReleaseBlocked

try:
    from jupyterhub.spawner import SpawnException
# JupyterHub 5.x has no SpawnException.
except ImportError:  # pragma: no cover

    class SpawnException(web.HTTPError):  # type: ignore[no-redef,unused-ignore]
        """Stand-in for JupyterHub 6's ``SpawnException`` on JupyterHub 5.

        An ``HTTPError`` carrying the same fields reads the same to users.
        """

        def __init__(
            self, message: str, *, reason: str, status_code: int = 400, **_: object
        ) -> None:
            super().__init__(status_code, "%s", message)
            self.message = message
            # Not ``reason``: JupyterHub 5 would show it instead of the message.
            self.spawn_reason = reason


__all__ = ["SpawnException", "hook_failure", "spawn_error", "spawn_refusal"]


def spawn_error(
    message: str, reason: str = "invalid-options", status_code: int = 400
) -> web.HTTPError:
    """Make a ``SpawnException`` that shows ``message`` to the user.

    The message appears on the form, the progress page and in the logs. ``status_code`` 400
    means the user's choices. 500 means the hub: its configuration or a hook.
    """
    exc: web.HTTPError = SpawnException(message, reason=reason, status_code=status_code)
    # The progress page shows this text.
    exc.jupyterhub_message = message  # type: ignore[attr-defined]
    return exc


def hook_failure(hook: str, exc: BaseException) -> web.HTTPError:
    """Report in one sentence that an operator's hook raised.

    The traceback goes to the log.
    """
    detail = " ".join(str(exc).split())[:160]
    return spawn_error(
        f"The hub's configured {hook} failed "
        f"({type(exc).__name__}{': ' + detail if detail else ''}).",
        reason="hook",
        status_code=500,
    )


def spawn_refusal(
    exc: Exception, log: logging.Logger | logging.LoggerAdapter[logging.Logger]
) -> web.HTTPError:
    """Turn what a spawn raised into one sentence, never a traceback.

    The status is 400 for the user's choices. It is 500 for the hub's configuration or a fault,
    whose traceback is logged.
    """
    if isinstance(exc, web.HTTPError):
        return exc
    if isinstance(exc, ConfigurationError):
        return spawn_error(str(exc), reason="config", status_code=500)
    if isinstance(exc, ReleaseBlocked):
        return spawn_error(str(exc), reason="release-blocked")
    if isinstance(exc, CasaspawnerError):
        return spawn_error(str(exc), reason=type(exc).__name__)
    log.error("Preparing a CASA session failed", exc_info=exc)
    # An OSError's strerror names no hub path.
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    detail = " ".join(text.split())[:160]
    return spawn_error(
        "The session could not be prepared because of a fault in the hub "
        f"({type(exc).__name__}: {detail}).",
        reason="error",
        status_code=500,
    )

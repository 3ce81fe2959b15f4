"""Kubernetes API calls whose answer the hub does not read.

kubernetes_asyncio turns every answer into model objects, a millisecond or more of the hub's CPU
for a pod; a spawn reads none of the answers to creating its pod and its token Secret, or to
deleting the Secret. :func:`send` skips that step and still raises ``ApiException`` as the
client does, so callers handle refusals exactly as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException


async def send(call: Callable[..., Awaitable[Any]], *args: Any, timeout: float) -> None:
    """Make the API call ``call(*args)`` within ``timeout`` seconds, not parsing its answer.

    Raises ``ApiException`` for an answer outside 2xx, and ``asyncio.TimeoutError``.
    """

    async def request() -> ApiException | None:
        response = await call(*args, _preload_content=False)
        try:
            body = await response.read()
        finally:
            response.release()
        if 200 <= response.status <= 299:
            return None
        # What the client's own ApiException carries: status, reason, body and headers.
        error = ApiException(status=response.status, reason=response.reason)
        error.body, error.headers = body, response.headers
        return error

    error = await asyncio.wait_for(request(), timeout)
    if error is not None:
        raise error

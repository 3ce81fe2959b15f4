"""Kubernetes API calls of a spawn, made for little of the hub's CPU.

kubernetes_asyncio turns every answer into model objects, a millisecond or more of the hub's CPU
for a pod; a spawn reads none of the answers to creating its pod. :func:`send` skips that step
and still raises ``ApiException`` as the client does, so callers handle refusals exactly as before.

Its HTTP session also trusts the environment: before each request aiohttp reads ``~/.netrc``
in one thread and looks for a proxy in another, about 0.6 ms of the hub's CPU per request on a
2-core machine. :func:`lean_core_api` gives a client of the same configuration that looks once,
and that sends a :class:`Manifest` as it is, where the client would walk it again to turn model
objects into JSON data.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from yarl import URL

#: The lean clients of each event loop, by the configuration they were made from, each with
#: the task that closes it (kept here: a loop holds only a weak reference to its tasks).
_LEAN: dict[tuple[asyncio.AbstractEventLoop, int], tuple[Any, asyncio.Task[None]]] = {}


class Manifest(dict[str, Any]):
    """An object already plain JSON data, which a lean client sends without walking it."""


class _LeanApiClient(client.ApiClient):
    """kubernetes_asyncio's ``ApiClient``, taking a :class:`Manifest` body as it is."""

    def sanitize_for_serialization(self, obj: Any) -> Any:
        if type(obj) is Manifest:
            return obj
        return super().sanitize_for_serialization(obj)


def lean_core_api(like: Any) -> Any:
    """A ``CoreV1Api`` configured as ``like``, with no per-request environment lookups.

    The proxy the environment names for the API server, if ``like``'s configuration names
    none, is looked up once here. ``.netrc`` is not read: the Kubernetes API takes tokens and
    certificates. One client per event loop and configuration, closed with the loop's tasks.
    """
    loop = asyncio.get_running_loop()
    configuration = like.api_client.configuration
    key = (loop, id(configuration))
    found = _LEAN.get(key)
    if found is not None:
        return found[0]
    api_client = _LeanApiClient(configuration=configuration)
    rest = api_client.rest_client
    trusting = rest.pool_manager
    connector = trusting.connector
    trusting.detach()
    rest.pool_manager = aiohttp.ClientSession(
        connector=connector, trust_env=False, read_bufsize=2**21
    )
    if not rest.proxy:
        with contextlib.suppress(LookupError):
            proxy, auth = get_env_proxy_for_url(URL(configuration.host))
            rest.proxy = str(proxy)
            if auth is not None:
                rest.proxy_headers = {"Proxy-Authorization": auth.encode()}
    lean = client.CoreV1Api(api_client)
    _LEAN[key] = (lean, loop.create_task(_close_with_loop(key, api_client)))
    return lean


async def _close_with_loop(key: tuple[asyncio.AbstractEventLoop, int], api_client: Any) -> None:
    """Keep a lean client until this task is cancelled (the hub stopping), then close it."""
    try:
        await asyncio.Event().wait()
    finally:
        _LEAN.pop(key, None)
        await api_client.close()


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

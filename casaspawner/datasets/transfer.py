"""HTTP exchanges with a total deadline, a byte limit and one-origin credentials.

The ALMA archive client hands a :class:`BoundedSession` to pyvo, and the VOSpace reader uses one
directly. The session is a ``requests.Session`` that:

* ends every exchange at its ``deadline``, however the server trickles: every read from and write
  to a socket waits at most until then, headers and redirects included;
* reads every reply whole before handing it on, refusing one larger than ``limit`` bytes (after
  decoding); a download may go to a file instead, or stop at the limit;
* sends its credentials only to one origin (scheme, host and port) and drops them on a redirect
  anywhere else; no ``.netrc`` is consulted;
* never retries.

Failures raise :class:`TransferError`; each caller words them in its own sentence. requests is
imported here, so callers import this module only when they need it.
"""

from __future__ import annotations

import io
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, BinaryIO, cast

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import resolve_proxies
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from casaspawner import __version__
from casaspawner.net import origin

_CHUNK = 1 << 16
_MAX_REDIRECTS = 5


class TransferError(Exception):
    """An exchange failed; ``str()`` is a short reason, not yet a sentence."""


class Late(TransferError):
    """The deadline passed before the exchange was over."""


class TooLarge(TransferError):
    """A reply was larger than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


class Unreachable(TransferError):
    """No reply: the connection failed, or the URL cannot be fetched."""


class Malformed(TransferError):
    """The session's ``screen`` refused a reply as the wrong kind of document.

    ``status`` is the reply's HTTP status, which may say more than its body.
    """

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


class _Clock:
    """The deadline a session's sockets keep to; the session moves it."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def left(self) -> float:
        """Seconds until the deadline; raises ``TimeoutError`` once it has passed."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        return remaining


class _DeadlineSocket:
    """A connected socket whose reads and writes all end by the clock's deadline.

    http.client reads through ``makefile``, which here reads through this object, so status line,
    headers and body alike wait at most until the deadline, one ``recv`` at a time.
    """

    def __init__(self, real: socket.socket, clock: _Clock) -> None:
        self._real = real
        self._clock = clock
        self._timeout: float | None = real.gettimeout()

    def settimeout(self, value: float | None) -> None:
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def _arm(self) -> None:
        left = self._clock.left()
        self._real.settimeout(left if self._timeout is None else min(left, self._timeout))

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return self._real.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return self._real.recv(bufsize, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()
        self._real.sendall(data, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        self._arm()
        return self._real.send(data, flags)

    def makefile(self, mode: str = "r", buffering: int | None = None, **_: Any) -> BinaryIO:
        # http.client only ever reads binary: as socket.makefile does, count the reference.
        if hasattr(self._real, "_io_refs"):
            self._real._io_refs += 1
        raw = socket.SocketIO(cast(socket.socket, self), "rb")
        return cast(BinaryIO, io.BufferedReader(raw, buffering or io.DEFAULT_BUFFER_SIZE))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _pools(clock: _Clock) -> dict[str, type[HTTPConnectionPool]]:
    """Connection pools whose connections keep to ``clock``."""

    class Http(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            self.sock = cast(socket.socket, _DeadlineSocket(self.sock, clock))

    class Https(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            self.sock = cast(socket.socket, _DeadlineSocket(self.sock, clock))

    class HttpPool(HTTPConnectionPool):
        ConnectionCls = Http

    class HttpsPool(HTTPSConnectionPool):
        ConnectionCls = Https

    return {"http": HttpPool, "https": HttpsPool}


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter, with connections (direct or through an HTTP proxy) on the clock."""

    def __init__(self, clock: _Clock) -> None:
        self._pools = _pools(clock)
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        # A SOCKS proxy has pools of its own; its reads keep per-read timeouts only.
        if isinstance(manager, urllib3.ProxyManager):
            manager.pool_classes_by_scheme = self._pools
        return manager


class _OriginToken(requests.auth.AuthBase):
    """A bearer token for one origin only; it also keeps ``.netrc`` unread."""

    def __init__(self, url: str | None, token: str | None) -> None:
        self.origin = origin(url) if url else None
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.token and request.url and origin(request.url) == self.origin:
            request.headers["Authorization"] = f"Bearer {self.token}"
        return request


class _Replay:
    """A read reply's body, readable again as ``response.raw`` (for pyvo)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.closed = False

    def read(self, amt: int | None = None, decode_content: bool | None = None, **_: Any) -> bytes:
        return self._data.read(-1 if amt is None else amt)

    def stream(self, amt: int = _CHUNK, decode_content: bool | None = None) -> Any:
        while chunk := self._data.read(amt):
            yield chunk

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        return None


def _system_trust() -> str | bool:
    """This system's CA certificates, as urllib uses them (not certifi's)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.capath):
        if candidate and os.path.exists(candidate):
            return candidate
    return True


def _reason(exc: BaseException) -> str:
    """The innermost system error behind ``exc`` (``Connection refused``), or its kind."""
    seen: set[int] = set()
    current: BaseException | None = exc
    found = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            found = current.strerror
        nested = getattr(current, "reason", None)
        if isinstance(nested, BaseException):
            current = nested
        else:
            current = current.__cause__ or current.__context__
    return found or type(exc).__name__


class BoundedSession(requests.Session):
    """A ``requests.Session`` whose exchanges end by ``deadline`` and stay within ``limit``.

    ``deadline`` is a ``time.monotonic()`` value and may be moved between requests. ``limit`` is
    the most bytes a reply may have. ``token`` goes to ``token_origin`` (a URL of it) only.
    ``screen``, when set, sees every reply body read into memory before it is handed on; a
    ``ValueError`` it raises becomes ``Malformed``.
    """

    def __init__(
        self,
        deadline: float,
        limit: int,
        *,
        token: str | None = None,
        token_origin: str | None = None,
    ) -> None:
        super().__init__()
        self._clock = _Clock(deadline)
        self.limit = limit
        self.screen: Callable[[bytes], None] | None = None
        #: The last failure, kept: libraries such as pyvo wrap what a session raises.
        self.failure: TransferError | None = None
        self._sink: tuple[BinaryIO, int, bool] | None = None
        self.max_redirects = _MAX_REDIRECTS
        self.auth = _OriginToken(token_origin, token)
        self.verify = _system_trust()
        self.headers.update(
            {"User-Agent": f"casaspawner/{__version__}", "Accept-Encoding": "gzip, deflate"}
        )
        adapter = _DeadlineAdapter(self._clock)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    @property
    def deadline(self) -> float:
        return self._clock.deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._clock.deadline = value

    def download(
        self, url: str, into: BinaryIO, limit: int, *, truncate: bool = False
    ) -> requests.Response:
        """GET ``url``, writing a successful reply's body to ``into``.

        At most ``limit`` bytes are written: with ``truncate`` a longer body is cut there,
        otherwise it raises ``TooLarge``. Any other reply is read into memory as usual.
        """
        self._sink = (into, limit, truncate)
        try:
            return self.get(url)
        finally:
            self._sink = None

    # requests' hooks

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        follow = kwargs.pop("allow_redirects", True)
        for name in ("stream", "timeout"):
            kwargs.pop(name, None)
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("cert", self.cert)
        if "proxies" not in kwargs:
            kwargs["proxies"] = resolve_proxies(request, self.proxies, self.trust_env)
        try:
            response = self._exchange(request, **kwargs)
            if follow and response.is_redirect:
                history = [response, *self.resolve_redirects(response, request, **kwargs)]
                response = history.pop()
                response.history = history
        except TransferError as exc:
            self.failure = exc
            raise
        except requests.TooManyRedirects:
            self.failure = Unreachable("too many redirects")
            raise self.failure from None
        return response

    def rebuild_auth(
        self, prepared_request: requests.PreparedRequest, response: requests.Response
    ) -> None:
        """Drop the credentials when a redirect leaves the origin; never consult ``.netrc``."""
        previous = response.request.url if response.request is not None else None
        if not previous or not prepared_request.url:
            return
        if origin(prepared_request.url) != origin(previous):
            prepared_request.headers.pop("Authorization", None)

    # Internals

    def _exchange(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        """One request and its whole reply, before the deadline and within the limit."""
        try:
            remaining = self._clock.left()
        except TimeoutError:
            raise Late() from None
        try:
            adapter = self.get_adapter(request.url or "")
            response = adapter.send(request, stream=True, timeout=(remaining, remaining), **kwargs)
            body = self._body(response)
        except TransferError:
            raise
        except requests.exceptions.InvalidSchema:
            raise Unreachable("not an HTTP URL") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if time.monotonic() >= self._clock.deadline:
                raise Late() from None
            raise Unreachable(_reason(exc)) from None
        downloaded = self._sink is not None and response.status_code in (200, 206)
        if self.screen is not None and not downloaded and not response.is_redirect:
            try:
                self.screen(body)
            except ValueError as exc:
                raise Malformed(str(exc), response.status_code) from None
        response._content = body
        response._content_consumed = True
        response.raw = _Replay(body)
        return response

    def _body(self, response: requests.Response) -> bytes:
        """Read the reply's body: into the sink for a download, else into memory."""
        raw = response.raw
        sink = self._sink if response.status_code in (200, 206) else None
        limit, truncate = (sink[1], sink[2]) if sink else (self.limit, False)
        chunks: list[bytes] = []
        size = 0
        try:
            while size <= limit:
                chunk = raw.read(_CHUNK, decode_content=True)
                if not chunk:
                    break
                if size + len(chunk) > limit and truncate:
                    chunk = chunk[: limit - size]
                    size = limit + 1
                else:
                    size += len(chunk)
                if sink:
                    sink[0].write(chunk)
                else:
                    chunks.append(chunk)
        except BaseException:
            raw.close()
            raise
        if size > limit:
            raw.close()
            if not truncate:
                raise TooLarge(limit)
        else:
            raw.release_conn()
        return b"".join(chunks)

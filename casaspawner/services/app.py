"""casa-sessions, a JupyterHub service for CASA operators.

It is served at ``/services/casa-sessions/``.

* ``GET /``: running sessions grouped by CASA release and dataset, with age and last activity,
  and the catalog with each release's drain/retire state. Operators only.
* ``POST /releases/<id>``: drain, undrain, retire or unretire a release. Operators only.
* ``GET /api/sessions``: the same grouping as JSON, with HTTP's ``Age`` header. Operators only.
* ``GET /api/notices``: notices for the caller's own sessions, for any valid token of that user,
  e.g. a session's ``$JUPYTERHUB_API_TOKEN``. The notices are drained releases and idle-cull
  warnings. The answer also says how many seconds the session should wait before asking again.
* ``GET /api/releases``: every catalog release with its drain and retire state and, for a drained
  one, the sentence that refuses it; for any valid token of a user. A desktop session asks before
  it starts an app of another release (the desktop's ``casa-app --release``).

The page and ``api/sessions`` read the sessions through :class:`SessionsSnapshot`: at most
``--sessions-max-age`` seconds old (10 by default) while somebody looks, and read again every
``--sessions-refresh`` seconds (60 by default) while nobody does, so a first look after a quiet
spell does not wait for the hub's read of 1,000 sessions. Both say when the sessions were read.

Operators are whoever holds ``access:services!service=casa-sessions``: admins, and the
``casa-operators`` role in the shipped hub configuration. The service's own token needs only
``list:users``, ``read:users:activity`` and ``read:servers``. Drains are written to the release
state file, which the CASA spawners read through
:func:`casaspawner.services.state.drain_blocker`.

Run it as a hub-managed service, whose entry :func:`casaspawner.hubconfig.casa_sessions_service`
writes: ``python -m casaspawner.services --state-file ... --cull-timeout 3600``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, urlencode, urlparse

from jinja2 import Environment, PackageLoader, select_autoescape
from jupyterhub.services.auth import (
    HubOAuth,
    HubOAuthCallbackHandler,
    HubOAuthenticated,
    UserNotAllowed,
)
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer

from casaspawner.catalog.model import Catalog, load_catalog
from casaspawner.errors import CasaspawnerError
from casaspawner.services.sessions import (
    CullPolicy,
    Session,
    format_duration,
    group_sessions,
    notices_for,
    sessions_from_users,
)
from casaspawner.services.state import (
    ReleaseState,
    ReleaseStateStore,
    default_state_path,
    release_states,
)

log = logging.getLogger("casa-sessions")
ACTIONS: dict[str, dict[str, Any]] = {
    "drain": {"drained": True},
    "undrain": {"drained": False, "message": ""},
    "retire": {"retired": True},
    "unretire": {"retired": False},
}
NOT_AN_OPERATOR = (
    "This page is for the hub's CASA operators; ask an administrator for the casa-operators role."
)
STALE_FORM = (
    "This form was out of date (after a new login, say); reload the page and submit it again."
)
_TEMPLATES = Environment(
    loader=PackageLoader("casaspawner.services", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


class SessionsSnapshot:
    """The hub's running sessions, read at most once per ``max_age`` seconds.

    Reading them costs the hub about 0.35 s at 1,000 sessions (five pages of 200 users), and
    the operators' page asks on every load. Concurrent requests share one read. Once somebody
    has looked (a hub whose operators never look pays nothing), a background task reads again
    at four fifths of ``max_age`` for ``keep_warm`` seconds after each look, and every
    ``refresh`` seconds after that. A request that finds the snapshot stale, but kept by those
    reads, starts a read and waits ``patience`` seconds for it; a slower hub leaves it the kept
    snapshot (it says when it was read) and the read to the next request. A missing snapshot,
    or one older than the background reads keep it, waits for the hub. ``max_age`` 0 reads on
    every request; ``refresh`` 0 reads only for requests, so the first look after a quiet
    minute waits.
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[list[Session]]],
        max_age: float,
        refresh: float = 60.0,
        keep_warm: float = 60.0,
        patience: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self.refresh = refresh
        self.keep_warm = keep_warm
        self.patience = patience
        self.taken: datetime | None = None
        self._read = read
        self._clock = clock
        self._sessions: list[Session] | None = None
        self._read_at = 0.0
        self._asked_at = -math.inf
        self._reading: asyncio.Task[None] | None = None
        self._keeping: asyncio.Task[None] | None = None

    @property
    def held_for(self) -> float:
        """Seconds a stale snapshot is still shown while the next one is read."""
        return self.refresh + self.max_age if self.refresh > 0 and self.max_age > 0 else 0.0

    async def get(self, fresh: bool = False) -> list[Session]:
        """The sessions, read within ``max_age`` seconds or kept by the background reads.

        ``fresh`` waits for the hub rather than show a kept snapshot.
        """
        self._asked_at = self._clock()
        age = self._asked_at - self._read_at
        held_for = 0.0 if fresh else self.held_for
        if self._sessions is None or age >= max(self.max_age, held_for):
            await self._refresh()
        elif age >= self.max_age:
            # A failed read leaves the kept snapshot, and _log_failed_read logs it.
            await asyncio.wait({self._start_read()}, timeout=self.patience)
        self.start()
        assert self._sessions is not None
        return self._sessions

    def start(self) -> None:
        """Start the background reads, unless they run; each request does."""
        if self.max_age > 0 and (self._keeping is None or self._keeping.done()):
            self._keeping = asyncio.create_task(self._keep_reading())

    def stop(self) -> None:
        """Stop the background reads."""
        if self._keeping is not None:
            self._keeping.cancel()

    def _start_read(self) -> asyncio.Task[None]:
        # Join a read under way rather than start a second one.
        if self._reading is None:
            self._reading = asyncio.create_task(self._read_once())
            self._reading.add_done_callback(_log_failed_read)
        return self._reading

    async def _refresh(self) -> None:
        await asyncio.shield(self._start_read())

    async def _read_once(self) -> None:
        started, taken = self._clock(), datetime.now(timezone.utc)
        try:
            sessions = await self._read()
        finally:
            self._reading = None
        self._sessions, self._read_at, self.taken = sessions, started, taken

    async def _keep_reading(self) -> None:
        # Wake at least every four fifths of max_age, to notice a look between slow reads.
        step = 0.8 * self.max_age
        while True:
            looked = self._clock() - self._asked_at < self.keep_warm
            period = step if looked else self.refresh
            if period <= 0:
                return
            wait = self._read_at + period - self._clock()
            if wait > 0:
                await asyncio.sleep(min(wait, step))
                continue
            try:
                await self._refresh()
            except Exception:
                # _log_failed_read has logged it; try again a period later.
                await asyncio.sleep(period)


def _log_failed_read(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("reading the hub's sessions failed: %s", task.exception())


class ServiceConfig:
    """Everything the handlers share."""

    def __init__(
        self,
        catalog: Catalog,
        store: ReleaseStateStore,
        policy: CullPolicy,
        api_url: str,
        api_token: str,
        prefix: str,
        notices_interval: int = 60,
        sessions_max_age: float = 10.0,
        sessions_refresh: float = 60.0,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.policy = policy
        self.api_url = api_url.rstrip("/")
        self.api_token = api_token
        self.prefix = prefix
        self.notices_interval = notices_interval
        self.snapshot = SessionsSnapshot(self.running_sessions, sessions_max_age, sessions_refresh)

    async def running_sessions(self) -> list[Session]:
        """Every started or pending server on the hub.

        They are read with the service's own token.
        """
        client = AsyncHTTPClient()
        users: list[dict[str, Any]] = []
        url = f"{self.api_url}/users?state=active&limit=200"
        offset = 0
        while True:
            response = await client.fetch(
                HTTPRequest(
                    f"{url}&offset={offset}",
                    headers={
                        "Authorization": f"token {self.api_token}",
                        "Accept": "application/jupyterhub-pagination+json",
                    },
                )
            )
            body = json.loads(response.body)
            items = body["items"] if isinstance(body, dict) else body
            users.extend(items)
            nxt = body.get("_pagination", {}).get("next") if isinstance(body, dict) else None
            if not nxt:
                break
            offset = int(nxt["offset"])
        return sessions_from_users(users, self.catalog)

    async def user_sessions(self, name: str) -> list[Session]:
        """One user's started or pending servers.

        This is one small API call, for the sessions' frequent polls.
        """
        response = await AsyncHTTPClient().fetch(
            HTTPRequest(
                url_path_join(self.api_url, "users", quote(name, safe="")),
                headers={"Authorization": f"token {self.api_token}"},
            )
        )
        return sessions_from_users([json.loads(response.body)], self.catalog)

    def states(self) -> dict[str, ReleaseState]:
        """Read the release state file.

        A broken file is a one-sentence 500, not a traceback.
        """
        try:
            return self.store.load()
        except CasaspawnerError as exc:
            raise web.HTTPError(500, str(exc)) from None


class OperatorHandler(HubOAuthenticated, web.RequestHandler):  # type: ignore[misc]
    """Pages and API for operators.

    They use HubOAuth, with the access scope ``access:services!service=<this service>``. A
    request carries the hub's login cookie (the pages' forms, which also need ``_xsrf``) or a
    token in the ``Authorization`` header (scripts: no cookie, no ``_xsrf``).

    The user is found once, in :meth:`prepare`, on the event loop. HubOAuthenticated's own
    ``get_current_user`` would block the loop on a one-thread pool, and a cookie request without
    a valid ``_xsrf`` then waits on itself: the xsrf check asks for the current user again, in
    that same pool. After one such request no request was ever answered again.
    """

    def initialize(self, config: ServiceConfig) -> None:
        self.config = config
        self._finding_user = False

    async def prepare(self) -> None:
        self._finding_user = True
        try:
            model = await self.hub_auth.get_user(self, sync=False)
        finally:
            self._finding_user = False
        user = None
        if model:
            try:
                user = self.check_hub_user(model)
            except UserNotAllowed:
                raise web.HTTPError(403, NOT_AN_OPERATOR) from None
        elif self.request.method not in ("GET", "HEAD") and self.get_cookie(
            self.hub_auth.cookie_name
        ):
            raise web.HTTPError(403, STALE_FORM)
        self._hub_auth_user_cache = user
        self.current_user = user

    def get_current_user(self) -> Any:
        return getattr(self, "_hub_auth_user_cache", None)

    def check_xsrf_cookie(self) -> None:
        # Tornado checks before prepare(), when it is not known yet whether a token or the
        # cookie authenticates the request. HubAuth checks a cookie's request in prepare();
        # a token's request needs no _xsrf.
        if self._finding_user:
            super().check_xsrf_cookie()

    def send_age(self, now: datetime) -> tuple[datetime, float]:
        """When the shown sessions were read, and their age, sent as HTTP's ``Age``."""
        taken = self.config.snapshot.taken or now
        age = max(0.0, (now - taken).total_seconds())
        self.set_header("Age", str(int(age)))
        return taken, age

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        # Our HTTPErrors carry one sentence.
        reason = getattr(exc, "log_message", None) or self._reason
        if status_code == 403 and reason not in (NOT_AN_OPERATOR, STALE_FORM):
            reason = NOT_AN_OPERATOR
        self.finish(
            _TEMPLATES.get_template("error.html").render(status=status_code, reason=reason)
        )


def reload_query(age: float, max_age: float, fresh: bool, flash: str) -> str | None:
    """The query the sessions page loads itself again with, or None when it is fresh.

    A page that showed a kept snapshot (older than ``max_age`` seconds) loads again a second
    later asking for ``fresh`` sessions, keeping its ``done`` message.
    """
    if fresh or max_age <= 0 or age < max_age:
        return None
    return "?" + urlencode({"fresh": "1", **({"done": flash} if flash else {})})


class SessionsPage(OperatorHandler):
    @web.authenticated
    async def get(self) -> None:
        now = datetime.now(timezone.utc)
        states = self.config.states()
        fresh = self.get_argument("fresh", "") == "1"
        sessions = await self.config.snapshot.get(fresh=fresh)
        groups = group_sessions(sessions, states)
        counts: dict[str, int] = {g.release_id: g.count for g in groups}
        releases = [
            {"release": r, "state": states.get(r.id), "running": counts.get(r.id, 0)}
            for r in self.config.catalog.releases
        ]
        taken, age = self.send_age(now)
        flash = self.get_argument("done", "")
        html = _TEMPLATES.get_template("sessions.html").render(
            reload=reload_query(age, self.config.snapshot.max_age, fresh, flash),
            user=self.current_user,
            groups=groups,
            releases=releases,
            now=now,
            taken=taken,
            duration=format_duration,
            prefix=self.config.prefix,
            xsrf_form_html=self.xsrf_form_html(),
            cull_after=(
                format_duration(timedelta(seconds=self.config.policy.timeout))
                if self.config.policy.timeout
                else ""
            ),
            flash=flash,
        )
        self.finish(html)


class ReleaseAction(OperatorHandler):
    @web.authenticated
    def post(self, release_id: str) -> None:
        if release_id not in self.config.catalog:
            raise web.HTTPError(404, f"{release_id} is not a release in the catalog.")
        action = self.get_body_argument("action", "")
        if action not in ACTIONS:
            raise web.HTTPError(
                400, f"{action!r} is not an action; use drain, undrain, retire or unretire."
            )
        changes: dict[str, Any] = dict(ACTIONS[action])
        if action == "drain":
            changes["message"] = self.get_body_argument("message", "")
        user = self.current_user["name"]
        try:
            self.config.store.update(release_id, by=user, **changes)
        except CasaspawnerError as exc:
            raise web.HTTPError(400, str(exc)) from None
        log.info("%s: %s %s", user, action, release_id)
        self.redirect(url_path_join(self.config.prefix, f"?done={action}+{release_id}"))


class SessionsAPI(OperatorHandler):
    @web.authenticated
    async def get(self) -> None:
        now = datetime.now(timezone.utc)
        states = self.config.states()
        # Scripts get sessions at most max_age seconds old, never a kept snapshot.
        groups = group_sessions(await self.config.snapshot.get(fresh=True), states)
        self.set_header("Content-Type", "application/json")
        self.send_age(now)
        self.finish(
            json.dumps(
                [
                    {
                        "release": g.release_id,
                        "label": g.label,
                        "drained": g.state.drained,
                        "retired": g.state.retired,
                        "datasets": [
                            {
                                "dataset": d.dataset,
                                "sessions": [
                                    {
                                        "user": s.user,
                                        "server": s.server,
                                        "interface": s.interface,
                                        "profile": s.profile,
                                        "age_seconds": _seconds(s.age(now)),
                                        "idle_seconds": _seconds(s.idle(now)),
                                    }
                                    for s in d.sessions
                                ],
                            }
                            for d in g.datasets
                        ],
                    }
                    for g in groups
                ]
            )
        )


class UserTokenHandler(web.RequestHandler):
    """A JSON API for any valid token of a user, such as a session's own.

    The identity comes from the hub. No scope is required.
    """

    def initialize(self, config: ServiceConfig, hub_auth: HubOAuth) -> None:
        self.config = config
        self.hub_auth = hub_auth

    def check_xsrf_cookie(self) -> None:
        # These handlers serve only token-authenticated GETs.
        return None

    async def token_user(self) -> str:
        """The name of the user whose token the request carries; 403 without one."""
        header = self.request.headers.get("Authorization", "")
        token = (
            header.split(None, 1)[1] if header.lower().startswith(("token ", "bearer ")) else ""
        )
        model = await self.hub_auth.user_for_token(token, sync=False) if token else None
        if not model or model.get("kind") != "user":
            raise web.HTTPError(403, "A user's token is required.")
        return str(model["name"])

    def answer(self, body: dict[str, Any]) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        # Our HTTPErrors carry one sentence.
        reason = getattr(exc, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": reason}))


class NoticesAPI(UserTokenHandler):
    """Notices for the token owner's own sessions."""

    async def get(self) -> None:
        user = await self.token_user()
        now = datetime.now(timezone.utc)
        sessions = await self.config.user_sessions(user)
        notices = notices_for(user, sessions, self.config.states(), self.config.policy, now)
        self.answer({"user": user, "notices": notices, "interval": self.config.notices_interval})


class ReleasesAPI(UserTokenHandler):
    """Every catalog release with its drain and retire state, for any user's token.

    A session asks before it starts an app of another release on its desktop: a drained
    release's app is refused with ``refusal``, the sentence the spawner refuses its sessions
    with. Nothing about other users' sessions is said.
    """

    async def get(self) -> None:
        await self.token_user()
        states = self.config.states()
        self.answer({"releases": release_states(self.config.catalog, states)})


def _seconds(delta: Any) -> int | None:
    return int(delta.total_seconds()) if delta is not None else None


def make_app(config: ServiceConfig, hub_auth: HubOAuth | None = None) -> web.Application:
    """The tornado application under ``config.prefix``.

    The prefix is ``$JUPYTERHUB_SERVICE_PREFIX``.
    """
    hub_auth = hub_auth or HubOAuth(
        api_token=config.api_token, api_url=config.api_url, cache_max_age=30
    )
    prefix = config.prefix
    handler_args = {"config": config}
    return web.Application(
        [
            (prefix, SessionsPage, handler_args),
            (
                url_path_join(prefix, "releases/([a-z0-9][a-z0-9.\\-]*)"),
                ReleaseAction,
                handler_args,
            ),
            (url_path_join(prefix, "api/sessions"), SessionsAPI, handler_args),
            (
                url_path_join(prefix, "api/notices"),
                NoticesAPI,
                {**handler_args, "hub_auth": hub_auth},
            ),
            (
                url_path_join(prefix, "api/releases"),
                ReleasesAPI,
                {**handler_args, "hub_auth": hub_auth},
            ),
            (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
        ],
        cookie_secret=os.urandom(32),
        xsrf_cookies=True,
        hub_auth=hub_auth,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m casaspawner.services",
        description="The casa-sessions JupyterHub service (run by the hub as a managed service).",
    )
    parser.add_argument(
        "--state-file",
        default=None,
        help=(
            "release drain/retire state (JSON); "
            f"default ${'CASASPAWNER_RELEASE_STATE'} or ./{default_state_path()}"
        ),
    )
    parser.add_argument(
        "--catalog", default=None, help="release catalog YAML (default: the bundled one)"
    )
    parser.add_argument(
        "--cull-timeout",
        type=int,
        default=0,
        help="the idle culler's --timeout in seconds (0: off)",
    )
    parser.add_argument(
        "--warn-before",
        type=int,
        default=600,
        help="warn users this many seconds before their session is culled",
    )
    parser.add_argument(
        "--notices-interval",
        type=int,
        default=60,
        help="seconds sessions wait between two requests for their notices",
    )
    parser.add_argument(
        "--sessions-max-age",
        type=float,
        default=10.0,
        help=(
            "seconds the operators' page may show sessions read earlier from the hub "
            "(0: read on every request)"
        ),
    )
    parser.add_argument(
        "--sessions-refresh",
        type=float,
        default=60.0,
        help=(
            "seconds between two reads of the hub's sessions while nobody looks, so that a "
            "first look does not wait for the hub (0: read only when asked)"
        ),
    )
    parser.add_argument(
        "--ip", default=None, help="address to listen on (default: from $JUPYTERHUB_SERVICE_URL)"
    )
    parser.add_argument(
        "--hub-api-url",
        default=None,
        help=(
            "the hub's API, e.g. http://localhost:8081/hub/api inside the z2jh hub pod "
            "(default: $JUPYTERHUB_API_URL)"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(levelname)1.1s %(asctime)s casa-sessions] %(message)s"
    )
    service_url = os.environ.get("JUPYTERHUB_SERVICE_URL")
    token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if not service_url or not token:
        print(
            "casa-sessions must be started by JupyterHub as a managed service with a url.",
            file=sys.stderr,
        )
        return 2
    if args.cull_timeout < 0 or args.warn_before < 0:
        print("--cull-timeout and --warn-before must not be negative.", file=sys.stderr)
        return 2
    if args.sessions_max_age < 0 or args.sessions_refresh < 0:
        print("--sessions-max-age and --sessions-refresh must not be negative.", file=sys.stderr)
        return 2
    if args.notices_interval < 1:
        print("--notices-interval must be at least 1 second.", file=sys.stderr)
        return 2
    try:
        catalog = load_catalog(args.catalog)
    except CasaspawnerError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    config = ServiceConfig(
        catalog=catalog,
        store=ReleaseStateStore(args.state_file or default_state_path()),
        policy=CullPolicy(args.cull_timeout, args.warn_before),
        api_url=args.hub_api_url or os.environ["JUPYTERHUB_API_URL"],
        api_token=token,
        prefix=os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/casa-sessions/"),
        notices_interval=args.notices_interval,
        sessions_max_age=args.sessions_max_age,
        sessions_refresh=args.sessions_refresh,
    )
    url = urlparse(service_url)
    ip = args.ip if args.ip is not None else (url.hostname or "127.0.0.1")
    asyncio.run(_serve(config, ip, url.port or 80))
    log.info("casa-sessions stopped")
    return 0


async def _serve(config: ServiceConfig, ip: str, port: int) -> None:
    # The hub stops its services with SIGINT, then SIGTERM. Handle both here, before listening
    # (a stop that comes as soon as the port answers must not kill the service). A SIGINT that
    # was ignored when the hub started, as for a hub launched in the background by a shell,
    # would otherwise never stop the service.
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    server = HTTPServer(make_app(config), xheaders=True)
    server.listen(port, ip)
    log.info("casa-sessions on %s:%s (release state %s)", ip, port, config.store.path)
    await stopped.wait()
    config.snapshot.stop()
    server.stop()


if __name__ == "__main__":
    raise SystemExit(main())

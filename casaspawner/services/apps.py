"""The desktop's apps of other CASA releases: the hub's ``/hub/api/casa-apps/<user>/<server>``.

A Kubernetes CASA desktop (``CASASpawner.desktop_apps``) has no Kubernetes rights of its own.
Its menu asks the hub, with the session's own ``$JUPYTERHUB_API_TOKEN``:

- ``GET`` lists the releases whose apps it may add, newest first, with the operators' drains:
  ``{"own": ID, "releases": [{"id", "label", "apps", "drained", "refusal", ...}]}``;
- ``POST {"release": ID, "app": APP, "display": N}`` starts that app on the desktop's X display
  ``N`` and answers ``201 {"pod": NAME}``.

A token reaches a server's apps when it may access that server (``access:servers``), as the
server's own token may. Refusals are JSON ``{"status", "message"}`` with one sentence. The
work is :class:`casaspawner.kube.desktopapps.KubeApps`'s.
"""

from __future__ import annotations

from typing import Any

from jupyterhub.apihandlers import APIHandler
from jupyterhub.scopes import needs_scope
from tornado import web

from casaspawner.errors import CasaspawnerError, InvalidInput, ReleaseBlocked, ResolutionError

#: The API's path under the hub's prefix.
APPS_PATH = "api/casa-apps"
NOT_HERE = "This hub does not add apps of other CASA releases to desktops."
UNEXPECTED = "The app could not be {what} because of a problem on the hub; its log says why."


class DesktopAppsHandler(APIHandler):  # type: ignore[misc]
    """List and start apps of other releases on one server's CASA desktop."""

    def desktop(self, user_name: str, server_name: str) -> Any:
        """The server's :class:`~casaspawner.kube.desktopapps.KubeApps`; 4xx otherwise."""
        from casaspawner.kube.desktopapps import KubeApps
        from casaspawner.kube.spawner import CASASpawner

        user = self.find_user(user_name)
        if user is None or server_name not in user.orm_spawners:
            raise web.HTTPError(404, "There is no such server.")
        spawner = user.spawners[server_name]
        if not isinstance(spawner, CASASpawner) or not spawner.desktop_apps:
            raise web.HTTPError(404, NOT_HERE)
        if not spawner.ready:
            raise web.HTTPError(409, "The CASA session is not running.")
        return KubeApps(spawner)

    def failed(self, exc: Exception, what: str) -> web.HTTPError:
        """The refusal for ``exc``: its sentence, or the hub's when it is not one of ours."""
        if isinstance(exc, web.HTTPError):
            return exc
        if isinstance(exc, InvalidInput | ResolutionError):
            return web.HTTPError(400, str(exc))
        if isinstance(exc, ReleaseBlocked):
            return web.HTTPError(409, str(exc))
        if isinstance(exc, CasaspawnerError):
            return web.HTTPError(503, str(exc))
        self.log.error("Desktop app not %s", what, exc_info=exc)
        return web.HTTPError(500, UNEXPECTED.format(what=what))

    @needs_scope("access:servers")  # type: ignore[untyped-decorator]
    async def get(self, user_name: str, server_name: str) -> None:
        try:
            found = await self.desktop(user_name, server_name).releases()
        except Exception as exc:
            raise self.failed(exc, "listed") from None
        self.write(found)

    @needs_scope("access:servers")  # type: ignore[untyped-decorator]
    async def post(self, user_name: str, server_name: str) -> None:
        body = self.get_json_body()
        fields = body if isinstance(body, dict) else {}
        release, app, display = fields.get("release"), fields.get("app"), fields.get("display")
        if not (
            isinstance(release, str)
            and isinstance(app, str)
            and isinstance(display, int)
            and not isinstance(display, bool)
        ):
            raise web.HTTPError(
                400, 'The request must be JSON {"release": ID, "app": APP, "display": N}.'
            )
        try:
            name = await self.desktop(user_name, server_name).launch(release, app, display)
        except Exception as exc:
            raise self.failed(exc, "started") from None
        self.set_status(201)
        self.write({"pod": name})


def app_handlers() -> list[tuple[str, type[APIHandler]]]:
    """The API, for ``JupyterHub.extra_handlers`` (under the hub's prefix)."""
    return [(f"/{APPS_PATH}/(?P<user_name>[^/]+)/(?P<server_name>[^/]*)", DesktopAppsHandler)]

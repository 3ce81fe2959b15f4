"""The user's access token, once, to its session: the hub's ``/hub/api/casa-token/``.

The token a user's login gave the hub (``CASASpawner.access_token_claim``) never goes to
Kubernetes: no Secret, no pod spec. When the session's Jupyter server starts, its extension
(:mod:`casaspawner.insession.access_token`) asks at ``/hub/api/casa-token/<user>/<server>`` with
``POST`` and the server's own ``$JUPYTERHUB_API_TOKEN``, and gets ``{"token": TOKEN}``, which it
keeps in a file in the pod's memory. The hub hands it out once per session, only to that
server's own API token, and only to a request from the session pod's address
(:meth:`casaspawner.kube.spawner.CASASpawner.hand_out_access_token`). Refusals are JSON
``{"status", "message"}`` with one sentence; 503 means "ask again shortly".
"""

from __future__ import annotations

from jupyterhub.apihandlers import APIHandler
from jupyterhub.scopes import needs_scope
from tornado import web

from casaspawner.kube.objects import TOKEN_PATH


class AccessTokenHandler(APIHandler):  # type: ignore[misc]
    """Hand one server's session the user's access token, once."""

    @needs_scope("access:servers")  # type: ignore[untyped-decorator]
    def post(self, user_name: str, server_name: str) -> None:
        from casaspawner.kube.spawner import CASASpawner

        user = self.find_user(user_name)
        if user is None or server_name not in user.orm_spawners:
            raise web.HTTPError(404, "There is no such server.")
        spawner = user.spawners[server_name]
        if not isinstance(spawner, CASASpawner):
            raise web.HTTPError(404, "This server gets no access token from the hub.")
        # The socket's peer: with JupyterHub's xheaders, remote_ip is what a header claims.
        peer = self.request.connection.context.address
        address = peer[0] if isinstance(peer, tuple) else ""
        token = spawner.hand_out_access_token(self.get_auth_token(), address)
        self.set_header("Cache-Control", "no-store")
        self.write({"token": token})


def token_handlers() -> list[tuple[str, type[APIHandler]]]:
    """The API, for ``JupyterHub.extra_handlers`` (under the hub's prefix)."""
    route = f"/api/{TOKEN_PATH}/(?P<user_name>[^/]+)/(?P<server_name>[^/]*)"
    return [(route, AccessTokenHandler)]

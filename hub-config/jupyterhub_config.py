# casaspawner hub configuration for a JupyterHub outside Zero to JupyterHub (a VM, a laptop, CI).
#
# The same setup as hub-config/z2jh/values.yaml: CASA spawner, OIDC login (GenericOAuthenticator) with
# auth_state and managed groups, the casa-sessions operators' service with release drains and in-session
# notices, and jupyterhub-idle-culler with least-privilege scopes. Settings come from the environment:
#
#   OIDC_ISSUER                  the provider's base URL; endpoints default to <issuer>/oauth2/authorize,
#                                <issuer>/oauth2/token and <issuer>/userinfo
#   OAUTH2_AUTHORIZE_URL, OAUTH2_TOKEN_URL, OAUTH2_USERDATA_URL   explicit endpoints (override the above)
#   OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, OAUTH_CALLBACK_URL      the hub's OAuth client (read by OAuthenticator)
#   JUPYTERHUB_CRYPT_KEY         required: encrypts auth_state (openssl rand -hex 32)
#   CASA_ALLOWED_GROUPS          comma-separated groups allowed to log in (default: alma-users)
#   CASA_ADMIN_GROUPS            comma-separated groups of hub admins (default: hub-admins)
#   CASA_OPERATORS_GROUP         group given the casa-operators role (default: casa-operators)
#   CASASPAWNER_SPAWNER          casa (Kubernetes, default) or casa-local (this machine)
#   CASASPAWNER_RELEASE_STATE    release drain/retire state file (default: ./casa-release-state.json)
#   CASA_SESSIONS_URL            where the casa-sessions service listens (default: http://127.0.0.1:10101)
#   CASA_NOTICES_INTERVAL        seconds between a session's notice checks (default: 60)
#   CASA_CULL_TIMEOUT, CASA_CULL_EVERY, CASA_CULL_WARN_BEFORE      idle culling, seconds (3600, 600, 600)
#
# Run: jupyterhub -f hub-config/jupyterhub_config.py
import os
import sys

from casaspawner.services.hubconfig import (
    SERVICE_NAME,
    casa_roles,
    casa_sessions_service,
    configure_sessions,
    idle_culler_service,
)

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file


def _groups(name: str, default: str) -> set[str]:
    return {g.strip() for g in os.environ.get(name, default).split(",") if g.strip()}


# ------------------------------------------------------------------------------------------------ login
issuer = os.environ.get("OIDC_ISSUER", "").rstrip("/")
c.JupyterHub.authenticator_class = "generic-oauth"
c.GenericOAuthenticator.login_service = os.environ.get("OIDC_LOGIN_SERVICE", "your observatory account")
if issuer:
    c.GenericOAuthenticator.authorize_url = os.environ.get(
        "OAUTH2_AUTHORIZE_URL", f"{issuer}/oauth2/authorize"
    )
    c.GenericOAuthenticator.token_url = os.environ.get("OAUTH2_TOKEN_URL", f"{issuer}/oauth2/token")
    c.GenericOAuthenticator.userdata_url = os.environ.get("OAUTH2_USERDATA_URL", f"{issuer}/userinfo")
c.GenericOAuthenticator.scope = ["openid", "profile", "email"]
c.GenericOAuthenticator.username_claim = "preferred_username"
# auth_state keeps the tokens and the user info (uid, gid, groups) for the spawner; it is encrypted with
# JUPYTERHUB_CRYPT_KEY, and the spawner hands the access token to the session only as a file.
c.Authenticator.enable_auth_state = True
c.GenericOAuthenticator.manage_groups = True
c.GenericOAuthenticator.auth_state_groups_key = "oauth_user.groups"
c.GenericOAuthenticator.allowed_groups = _groups("CASA_ALLOWED_GROUPS", "alma-users")
c.GenericOAuthenticator.admin_groups = _groups("CASA_ADMIN_GROUPS", "hub-admins")
c.GenericOAuthenticator.custom_403_message = (
    "Your account is not in a group allowed to use this CASA hub ("
    + ", ".join(sorted(c.GenericOAuthenticator.allowed_groups))
    + "). Ask your observatory's helpdesk to add you to one of them, then sign in again."
)
# The spawner reads uid/gid/groups/gids from these auth_state keys (the OIDC claims uid, gid, groups, gids).
c.CASASessionMixin.uid_claim = "oauth_user.uid"
c.CASASessionMixin.gid_claim = "oauth_user.gid"
c.CASASessionMixin.groups_claim = "oauth_user.groups"
c.CASASessionMixin.supplemental_gids_claim = "oauth_user.gids"
c.CASASessionMixin.access_token_claim = "access_token"  # noqa: S105 - a key name, not a secret

# ------------------------------------------------------------------------------ sessions and operators
state_file = os.environ.get("CASASPAWNER_RELEASE_STATE", os.path.abspath("casa-release-state.json"))
service_url = os.environ.get("CASA_SESSIONS_URL", "http://127.0.0.1:10101")
configure_sessions(
    c,
    state_file=state_file,
    notices_url=f"{service_url}/services/{SERVICE_NAME}/api/notices",
    notices_interval=int(os.environ.get("CASA_NOTICES_INTERVAL", "60")),
    spawner_class=os.environ.get("CASASPAWNER_SPAWNER", "casa"),
)
c.Spawner.start_timeout = 300  # CASA images are large

cull_timeout = int(os.environ.get("CASA_CULL_TIMEOUT", "3600"))  # 0 turns idle culling off
c.JupyterHub.services = [
    casa_sessions_service(
        url=service_url,
        state_file=state_file,
        cull_timeout=cull_timeout,
        warn_before=int(os.environ.get("CASA_CULL_WARN_BEFORE", "600")),
    )
]
c.JupyterHub.load_roles = casa_roles(os.environ.get("CASA_OPERATORS_GROUP", "casa-operators"))
if cull_timeout > 0:
    culler, culler_role = idle_culler_service(
        timeout=cull_timeout, every=int(os.environ.get("CASA_CULL_EVERY", "600")), python=sys.executable
    )
    c.JupyterHub.services.append(culler)
    c.JupyterHub.load_roles.append(culler_role)

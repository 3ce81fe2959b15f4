# casaspawner hub configuration for a JupyterHub outside Zero to JupyterHub (a VM, a laptop, CI).
#
# The same configuration as hub-config/z2jh/values.yaml: both hand their settings to
# casaspawner.hubconfig.configure_hub (CASA spawner, OIDC login through GenericOAuthenticator with
# auth_state and managed groups, the casa-sessions operators' service with release drains and
# in-session notices, the operators' and administrators' roles, jupyterhub-idle-culler with
# least-privilege scopes). Settings come from the environment:
#
#   OIDC_ISSUER                 the provider's base URL; endpoints default to
#                               <issuer>/oauth2/authorize, <issuer>/oauth2/token, <issuer>/userinfo
#   OAUTH2_AUTHORIZE_URL, OAUTH2_TOKEN_URL, OAUTH2_USERDATA_URL
#                               explicit endpoints (override the above)
#   OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, OAUTH_CALLBACK_URL
#                               the hub's OAuth client (read by OAuthenticator)
#   OIDC_LOGIN_SERVICE          the login button's text: "Sign in with <this>"
#                               (default: your observatory account)
#   JUPYTERHUB_CRYPT_KEY        required: encrypts auth_state (openssl rand -hex 32)
#   CASA_ALLOWED_GROUPS         comma-separated groups allowed to log in
#                               (default: alma-users,hub-admins)
#   CASA_ADMINS_GROUP           group given the casa-admins role: administrators who cannot enter
#                               users' sessions (default: hub-admins; empty: nobody)
#   CASA_OPERATORS_GROUP        group given the casa-operators role
#                               (default: casa-operators; empty: nobody)
#   CASA_PROJECT_GROUPS         regular expression of the groups whose project directories are
#                               mounted (default: proj-.*)
#   CASASPAWNER_SPAWNER         casa (Kubernetes, default) or casa-local (this machine)
#   CASA_STORAGE_HUB_PATH       the hub's read-only mount of Cavern, to resolve datasets named by
#                               path (default: /cavern; empty: datasets by ALMA identifier only)
#   CASA_MEASURES_VERSIONS_PATH the hub's read-only mount of the measures claim, when it keeps
#                               one directory per version (default: unset, one tree)
#   CASA_START_TIMEOUT          seconds a Kubernetes session may take to start (default: 600)
#   CASASPAWNER_IMAGE_REGISTRY  where `casaspawner images` pushed the session images
#                               (default: ghcr.io/casaspawner)
#   CASA_BASE_URL               JupyterHub's base URL (default: /)
#   CASASPAWNER_RELEASE_STATE   release drain/retire state file
#                               (default: ./casa-release-state.json)
#   CASA_SESSIONS_URL           where casa-sessions listens (default: http://127.0.0.1:10101)
#   CASA_NOTICES_INTERVAL       seconds between a session's notice checks (default: 60)
#   CASA_CULL_TIMEOUT, CASA_CULL_EVERY, CASA_CULL_WARN_BEFORE
#                               idle culling, seconds (3600, 600, 600); CASA_CULL_TIMEOUT=0 turns
#                               culling and its warnings off
#   CASA_HEADLESS_RUNS          true: the form's "Run headless" button and the hub's pages
#                               /hub/casa-runs/ (default: false; on Kubernetes the hub's Role
#                               needs hub-config/z2jh/casa-runs-rbac.yaml)
#   CASA_DESKTOP_APPS           true: Kubernetes desktops add apps of other releases, pods the
#                               hub creates (/hub/api/casa-apps/; default: false; the hub's
#                               Role needs hub-config/z2jh/casa-apps-rbac.yaml)
#
# A number that is not a whole number (CASA_CULL_TIMEOUT=1h) stops the hub at start with one
# sentence naming it.
#
# Run: jupyterhub -f hub-config/jupyterhub_config.py
import os

from casaspawner.hubconfig import configure_hub, settings_from_environment

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

# ------------------------------------------------------------ the site's part of the login
issuer = os.environ.get("OIDC_ISSUER", "").rstrip("/")
if issuer:
    c.GenericOAuthenticator.authorize_url = os.environ.get(
        "OAUTH2_AUTHORIZE_URL", f"{issuer}/oauth2/authorize"
    )
    c.GenericOAuthenticator.token_url = os.environ.get(
        "OAUTH2_TOKEN_URL", f"{issuer}/oauth2/token"
    )
    c.GenericOAuthenticator.userdata_url = os.environ.get(
        "OAUTH2_USERDATA_URL", f"{issuer}/userinfo"
    )
c.GenericOAuthenticator.login_service = os.environ.get(
    "OIDC_LOGIN_SERVICE", "your observatory account"
)
c.GenericOAuthenticator.allowed_groups = {
    g.strip()
    for g in os.environ.get("CASA_ALLOWED_GROUPS", "alma-users,hub-admins").split(",")
    if g.strip()
}
c.JupyterHub.base_url = os.environ.get("CASA_BASE_URL", "/")
c.CASASessionMixin.image_registry = os.environ.get(
    "CASASPAWNER_IMAGE_REGISTRY", "ghcr.io/casaspawner"
)

# ------------------------------- everything else, shared with hub-config/z2jh/values.yaml
configure_hub(c, settings_from_environment(os.environ))

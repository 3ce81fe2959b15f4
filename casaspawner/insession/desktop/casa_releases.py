"""Apps of other CASA releases on this desktop: the menu, the drain check, the launch.

Run by ``casa-app`` with any Python 3, standard library only (it runs where casaspawner is not
importable)::

    casa_releases.py menu              openbox pipe menu: the releases, each with its apps
    casa_releases.py launch ID APP     start APP (terminal, plotms, ...) of release ID here

The releases are those the hub can run here, from ``$CASASPAWNER_RELEASES_FILE`` (written by
the local spawner: each release's label, apps and the variables its environment sets); the
session's own release comes first, then the others, newest first. Before an app of another
release starts, the casa-sessions service (``$CASASPAWNER_RELEASES_URL``, asked with the
session's ``$JUPYTERHUB_API_TOKEN``) says whether that release is drained: a drained release's
app is refused with the operators' one sentence. When the service cannot be asked, the app
starts, and why it could not is printed on stderr: the hub's drains refuse new sessions, they
never stop work already running.

On Kubernetes (``$CASASPAWNER_DESKTOP_APPS`` is ``hub``) another release's app runs in a pod of
that release's image, which the hub creates: the menu lists the hub's releases
(``GET $JUPYTERHUB_API_URL/casa-apps/<user>/<server>``, with the session's token), and a launch
leaves the desktop's X cookie in the home for the app's pod (:func:`share_cookie`, mode 0600)
and asks the hub to start it (``POST``), which refuses a drained release with one sentence.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

#: The tools of ``casa-app`` and their menu labels, in menu order.
APPS = {
    "terminal": "CASA terminal",
    "plotms": "plotms",
    "viewer": "viewer (imview)",
    "browser": "casabrowser",
    "logger": "logger",
}
#: The terminal of another release: its size, and no position (openbox places it).
TERMINAL_GEOMETRY = "110x32"
#: Where, under the home, the desktop leaves its X cookie for its app pods (one file per pod).
COOKIE_DIR = ".casaspawner/desktop"
#: Seconds to wait for the casa-sessions service.
TIMEOUT = 10.0
#: Seconds to wait for the hub to start an app's pod: it waits up to 40 s for the pod to run.
LAUNCH_TIMEOUT = 90.0


class Refused(Exception):
    """An app that is not started; ``str`` is the one sentence the user reads.

    ``title`` names the release for the window that says it.
    """

    def __init__(self, sentence: str, title: str = "CASA") -> None:
        super().__init__(sentence)
        self.title = title


def load_releases(path: str) -> list[dict[str, Any]]:
    """The releases listed in the spawner's file, newest first; empty without one."""
    if not path:
        return []
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    releases = document.get("releases") if isinstance(document, dict) else None
    return [r for r in releases or [] if isinstance(r, dict) and isinstance(r.get("id"), str)]


def ordered(releases: Sequence[dict[str, Any]], own: str) -> list[dict[str, Any]]:
    """The session's own release first, then the others in the file's order (newest first)."""
    return [r for r in releases if r["id"] == own] + [r for r in releases if r["id"] != own]


def _label(text: str) -> str:
    # Openbox takes an underscore as the next letter's keyboard shortcut; two show one.
    return quoteattr(text.replace("_", "__"))


def _text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def menu_xml(releases: Sequence[dict[str, Any]], own: str, casa_app: str) -> str:
    """The openbox pipe menu: a submenu of apps per release, the session's own first.

    The session's own apps run as its tools window starts them (``casa-app APP``); another
    release's through ``casa-app --release ID APP``. Commands are quoted for openbox, which
    splits them as a shell does, and escaped for XML.
    """
    lines = ["<openbox_pipe_menu>"]
    program = shlex.quote(casa_app)
    listed = ordered(releases, own)
    for index, release in enumerate(listed):
        if index == 1 and listed[0]["id"] == own:
            lines.append("  <separator/>")
        mine = release["id"] == own
        label = release.get("label") or release["id"]
        if mine:
            label += " (this session)"
        lines.append(
            f"  <menu id={quoteattr('casa-release-' + release['id'])} label={_label(label)}>"
        )
        for app in release.get("apps") or []:
            if app not in APPS:
                continue
            words = [app] if mine else ["--release", shlex.quote(release["id"]), app]
            command = _text(" ".join([program, *words]))
            lines.append(
                f'    <item label={_label(APPS[app])}><action name="Execute">'
                f"<command>{command}</command></action></item>"
            )
        lines.append("  </menu>")
    if not listed:
        lines.append(f"  <item label={_label('No other CASA release is prepared on this hub')}/>")
    lines.append("</openbox_pipe_menu>")
    return "\n".join(lines) + "\n"


def drain_refusal(url: str, token: str, release_id: str, timeout: float = TIMEOUT) -> str | None:
    """The operators' sentence refusing ``release_id``, or None while it is not drained.

    Asked of casa-sessions' ``api/releases`` with the session's token (:func:`ask_hub`). Any
    failure is an ``OSError`` or ``ValueError`` saying what went wrong.
    """
    try:
        body = ask_hub(url, token, timeout=timeout)
    except Refused as refused:
        raise OSError(f"{url} refused: {refused}") from None
    releases = body.get("releases") if isinstance(body, dict) else None
    if not isinstance(releases, list):
        raise ValueError(f"{url} did not list releases")
    for entry in releases:
        if isinstance(entry, dict) and entry.get("id") == release_id and entry.get("drained"):
            return str(entry.get("refusal") or f"{release_id} is being drained by the operators.")
    return None


def hub_apps_url(environ: Mapping[str, str]) -> str:
    """The hub's ``casa-apps`` API of this session's server, or empty when apps are local."""
    if environ.get("CASASPAWNER_DESKTOP_APPS") != "hub":
        return ""
    base = environ.get("JUPYTERHUB_API_URL", "").rstrip("/")
    user = urllib.parse.quote(environ.get("JUPYTERHUB_USER", ""), safe="")
    server = urllib.parse.quote(environ.get("JUPYTERHUB_SERVER_NAME", ""), safe="")
    return f"{base}/casa-apps/{user}/{server}" if base and user else ""


def ask_hub(
    url: str, token: str, body: Mapping[str, Any] | None = None, timeout: float = TIMEOUT
) -> Any:
    """The hub's JSON answer to a GET (or, with ``body``, a POST) of ``url``.

    An answer with a sentence (the hub API's ``message``) raises :class:`Refused` with it; a
    hub that cannot be asked, ``OSError`` or ``ValueError``. Redirects are not followed (the
    token would go along).
    """

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url} is not an http(s) URL")
    headers = {"Authorization": f"token {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    # The URL is the hub's, from the session's environment, and http(s).
    request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310
    # The token goes to the hub directly, never through a proxy the session's environment names.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirects)
    try:
        with opener.open(request, timeout=timeout) as response:
            return json.loads(response.read(1 << 20))
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read(1 << 16)).get("message")
        except (OSError, ValueError, AttributeError):
            message = None
        if isinstance(message, str) and message:
            raise Refused(message) from None
        raise OSError(f"the hub answered HTTP {error.code}") from None


def display_number(display: str) -> int:
    """The X display number of ``$DISPLAY`` (``:21`` or ``:21.0``); ValueError otherwise."""
    host, _, rest = display.rpartition(":")
    if host or not rest:
        raise ValueError(f"DISPLAY {display!r} is not a local display")
    return int(rest.split(".", 1)[0])


def _entries(data: bytes) -> list[tuple[int, bytes, bytes, bytes, bytes]]:
    """The entries of an Xauthority file: family, address, display number, name, data."""
    found, at = [], 0
    while at + 2 <= len(data):
        (family,) = struct.unpack_from(">H", data, at)
        at += 2
        fields = []
        for _ in range(4):
            (size,) = struct.unpack_from(">H", data, at)
            fields.append(data[at + 2 : at + 2 + size])
            at += 2 + size
        found.append((family, fields[0], fields[1], fields[2], fields[3]))
    return found


def share_cookie(source: Path, target: Path, number: int) -> None:
    """Leave display ``number``'s X cookie from ``source`` at ``target``, for any address.

    The app's pod reaches the display over TCP at the session pod's address, which the
    desktop's own entries (this host's name) do not name: the copy is a wildcard entry
    (family 0xFFFF), readable by the user alone.
    """
    try:
        entries = _entries(source.read_bytes())
    except (OSError, struct.error) as exc:
        raise Refused(f"The desktop's X cookie could not be read: {exc}.") from None
    wanted = str(number).encode()
    cookie = next((e for e in entries if e[2] == wanted and e[4]), None)
    if cookie is None:
        raise Refused(f"The desktop's X cookie for display :{number} is not in {source}.")
    _, _, display, name, data = cookie
    record = struct.pack(">H", 0xFFFF)
    for field in (b"", display, name, data):
        record += struct.pack(">H", len(field)) + field
    temporary = None
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".xauthority.")
        with os.fdopen(handle, "wb") as out:
            out.write(record)
        os.replace(temporary, target)
    except OSError as exc:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        why = exc.strerror or exc
        raise Refused(f"The desktop's X cookie could not be left at {target}: {why}.") from None


def hub_menu(environ: Mapping[str, str], casa_app: str) -> str:
    """The pipe menu from the hub's list of releases; one item saying why when it cannot."""
    url = hub_apps_url(environ)
    try:
        answer = ask_hub(url, environ.get("JUPYTERHUB_API_TOKEN", ""), timeout=5.0)
        releases = answer.get("releases") if isinstance(answer, dict) else None
        if not isinstance(releases, list):
            raise ValueError(f"{url} did not list releases")
    except (Refused, OSError, ValueError) as exc:
        item = _label(f"The hub could not list the other releases: {exc}")
        return f"<openbox_pipe_menu>\n  <item label={item}/>\n</openbox_pipe_menu>\n"
    listed = [r for r in releases if isinstance(r, dict) and isinstance(r.get("id"), str)]
    own = environ.get("CASASPAWNER_RELEASE", "")
    return menu_xml(listed, own, casa_app)


def hub_launch(release_id: str, app: str, environ: Mapping[str, str]) -> str:
    """Ask the hub to start ``app`` of ``release_id`` in a pod; the pod's name.

    The X cookie goes first to ``~/.casaspawner/desktop/<this pod>.xauthority``, where the
    hub's app pod looks for it. Raises :class:`Refused` with the sentence to show.
    """
    if app not in APPS:
        raise Refused(f"casa-app: unknown tool '{app}' ({', '.join(APPS)}).")
    home = Path(environ.get("HOME") or Path.home())
    try:
        number = display_number(environ.get("DISPLAY", ""))
    except ValueError as exc:
        raise Refused(f"{exc}; open the app from the desktop's menu.") from None
    source = Path(environ.get("XAUTHORITY") or home / ".Xauthority")
    host = environ.get("HOSTNAME") or os.uname().nodename
    share_cookie(source, home / COOKIE_DIR / f"{host}.xauthority", number)
    body = {"release": release_id, "app": app, "display": number}
    url = hub_apps_url(environ)
    try:
        answer = ask_hub(url, environ.get("JUPYTERHUB_API_TOKEN", ""), body, LAUNCH_TIMEOUT)
    except (OSError, ValueError) as exc:
        raise Refused(f"The hub could not be asked to start {APPS[app]}: {exc}.") from None
    return str(answer.get("pod") if isinstance(answer, dict) else "")


def release_environment(
    environ: Mapping[str, str], release: Mapping[str, Any], own_name: str
) -> dict[str, str]:
    """The session's variables with ``release``'s CASA in place of the session's own.

    Variables the release does not set (``null`` in the file) are removed. The log file, the
    dataset, the home and the display stay the session's.
    """
    env = dict(environ)
    for name, value in (release.get("environment") or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    label = str(release.get("label") or release["id"])
    env.update(
        {
            "CASASPAWNER_RELEASE": str(release["id"]),
            "CASASPAWNER_CASA": str(release.get("casa") or ""),
            "CASASPAWNER_KERNEL_NAME": str(release.get("kernel_name") or label),
            "CASASPAWNER_APPROXIMATE": "false",
            "CASASPAWNER_REASON": (
                f"{label}, added from the desktop menu beside this session's {own_name}."
            ),
            "CASASPAWNER_TERMINAL_GEOMETRY": TERMINAL_GEOMETRY,
        }
    )
    env.pop("CASASPAWNER_PIPELINE", None)
    env.pop("CASASPAWNER_EXACT", None)
    return env


def prepare_launch(
    release_id: str, app: str, environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The release and the variables to start ``app`` of ``release_id`` with.

    Raises :class:`Refused` with the sentence to show: an unknown tool, a release not prepared
    here, an app the release does not have, a drained release.
    """
    if app not in APPS:
        raise Refused(f"casa-app: unknown tool '{app}' ({', '.join(APPS)}).")
    releases = load_releases(environ.get("CASASPAWNER_RELEASES_FILE", ""))
    release = next((r for r in releases if r["id"] == release_id), None)
    if release is None:
        raise Refused(
            f"CASA release {release_id} is not prepared on this hub; "
            "the desktop menu lists those that are."
        )
    label = str(release.get("label") or release_id)
    if app not in (release.get("apps") or []):
        raise Refused(f"{APPS[app]} is not part of {label}.", label)
    url = environ.get("CASASPAWNER_RELEASES_URL", "")
    token = environ.get("JUPYTERHUB_API_TOKEN", "")
    if url and token:
        try:
            refusal = drain_refusal(url, token, release_id)
        except (OSError, ValueError) as error:
            print(
                f"casa-app: could not ask whether {label} is drained ({error}); starting it.",
                file=sys.stderr,
            )
            refusal = None
        if refusal is not None:
            raise Refused(refusal, label)
    own_name = environ.get("CASASPAWNER_KERNEL_NAME") or "CASA"
    return release, release_environment(environ, release, own_name)


def show(title: str, sentence: str) -> None:
    """Say ``sentence`` on stderr and, on the desktop, in a window titled ``title``.

    The window stays until it is dismissed; this returns at once.
    """
    print(sentence, file=sys.stderr)
    if os.environ.get("DISPLAY"):
        try:
            subprocess.Popen(
                ["xmessage", "-center", "-title", title, sentence],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            # No xmessage: stderr has said it.
            return


def main(argv: Sequence[str]) -> int:
    here = Path(__file__).resolve().parent
    casa_app = str(here / "casa-app")
    if list(argv[:1]) == ["menu"] and hub_apps_url(os.environ):
        sys.stdout.write(hub_menu(os.environ, casa_app))
        return 0
    if list(argv[:1]) == ["menu"]:
        releases = load_releases(os.environ.get("CASASPAWNER_RELEASES_FILE", ""))
        own = os.environ.get("CASASPAWNER_RELEASE", "")
        sys.stdout.write(menu_xml(releases, own, casa_app))
        return 0
    if len(argv) == 3 and argv[0] == "launch":
        release_id, app = argv[1], argv[2]
        if hub_apps_url(os.environ):
            try:
                pod = hub_launch(release_id, app, os.environ)
            except Refused as refused:
                show(f"{refused.title}: not started", str(refused))
                return 1
            print(f"casa-app: {app} of {release_id} starts in pod {pod}.", file=sys.stderr)
            return 0
        try:
            _release, env = prepare_launch(release_id, app, os.environ)
        except Refused as refused:
            show(f"{refused.title}: not started", str(refused))
            return 1
        # casa-app, beside this file, without a shell.
        os.execve(casa_app, [casa_app, app], env)  # noqa: S606
    print("usage: casa_releases.py menu | launch RELEASE APP", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

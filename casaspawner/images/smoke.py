"""Smoke tests for built images, run the way a Kubernetes pod runs them.

That means an arbitrary uid with no passwd entry, and a read-only root filesystem with only /tmp
writable. HOME is on a mounted directory, and the measures data is mounted read-only.

Each check returns what it observed. The callers, the CLI and pytest, decide pass or fail.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from casaspawner.datasets.synth import SIMULATE_MS
from casaspawner.images.engine import Tools
from casaspawner.images.matrix import MEASURES_MOUNT, ImageBuildError
from casaspawner.net import free_port
from casaspawner.plan import PlanConfig

HOME = "/arc/home/smoke"
NOTICES_EXTENSION = "casaspawner.insession.notices"
# The notices' JupyterLab side.
NOTICES_LABEXTENSION = "casaspawner-notices"
DESKTOP_XSTARTUP = PlanConfig().desktop_xstartup
CASA_CODE = """
import casatools, casatasks, numpy, scipy.linalg
print("casatools", casatools.version_string())
me = casatools.measures()
alma = me.observatory("ALMA")
print("ALMA", alma["refer"], round(me.getvalue(alma)["m2"]["value"]))
"""
KERNEL_RUNNER = """
import json, sys
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name=sys.argv[1], startup_timeout=180)
out = []
def hook(msg):
    content = msg["content"]
    if msg["msg_type"] == "stream":
        out.append(content["text"])
    elif msg["msg_type"] == "error":
        out.append("%s: %s" % (content["ename"], content["evalue"]))
try:
    reply = kc.execute_interactive(sys.argv[2], output_hook=hook, timeout=300)
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
print(json.dumps({"status": reply["content"]["status"], "output": "".join(out)}))
"""
#: A script plotting the MS argv[1] with plotms, into the PNG argv[2].
#:
#: The CASA Python runs it. plotms, the casaplotms task, plots amplitude against uv distance
#: without opening its window. The script then says what the PNG holds, using the Pillow that comes
#: with matplotlib. plotms draws its points pure blue.
PLOTMS_CODE = """
import json, os, sys
from casaplotms import plotms
plotms(vis=sys.argv[1], xaxis="uvdist", yaxis="amp", plotfile=sys.argv[2], showgui=False,
       overwrite=True)
if os.path.isfile(sys.argv[2]):
    from PIL import Image
    image = Image.open(sys.argv[2]).convert("RGB")
    colours = image.getcolors(image.width * image.height)
    print("PNG", json.dumps({"width": image.width, "height": image.height, "colours": len(colours),
                             "blue": sum(n for n, rgb in colours if rgb == (0, 0, 255))}))
"""
VIEWER_CODE = "from casaviewer import imview, msview"
#: An X server of the container's own, as the desktop has.
#:
#: It is TigerVNC's Xvnc on display :7, with a Unix socket only.
XVNC = (
    "Xvnc :7 -SecurityTypes None -rfbport -1 -rfbunixpath /tmp/vnc.sock -ac >/tmp/xvnc.log 2>&1 & "
    "for i in $(seq 50); do [ -S /tmp/.X11-unix/X7 ] && break; sleep 0.2; done; "
)
WORLD_WRITABLE = (
    "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /tmp \\) -prune "
    "-o ! -type l -perm -o+w -print"
)


@dataclass
class Session:
    """How a smoke-test container runs.

    It has a uid and gid, a host HOME directory and the measures directory. The measures are
    mounted read-only at ``measures_mount``, the spawner's ``measures_mount_path``.
    """

    home: Path
    measures: Path | None = None
    uid: int = 54321
    gid: int = 54321
    env: dict[str, str] = field(default_factory=dict)
    measures_mount: str = MEASURES_MOUNT


def run_argv(
    tools: Tools,
    image: str,
    session: Session,
    *,
    detach: bool = False,
    name: str | None = None,
    network: str = "none",
    publish: int | None = None,
) -> list[str]:
    """Return the ``podman run`` argv that runs ``image`` as a pod runs.

    That is a uid without passwd entry, a read-only root, a tmpfs /tmp and a mounted HOME.
    """
    # Own network namespace unless asked (X11 abstract sockets are per namespace, like in a pod).
    argv = tools.container("run", "--network", network)
    argv += ["-d"] if detach else ["--rm"]
    if name:
        argv += ["--name", name]
    if tools.runner == "podman":
        argv += ["--passwd=false"]
    # The container's /tmp.
    tmpfs = "/tmp:rw,mode=1777,exec"  # noqa: S108
    argv += ["--user", f"{session.uid}:{session.gid}", "--read-only", "--tmpfs", tmpfs]
    argv += ["-v", f"{session.home}:{HOME}", "-e", f"HOME={HOME}", "-e", "JUPYTERHUB_USER=smoke"]
    if session.measures:
        argv += ["-v", f"{session.measures}:{session.measures_mount}:ro"]
    for key, value in session.env.items():
        argv += ["-e", f"{key}={value}"]
    if publish is not None:
        argv += ["-p", f"127.0.0.1:{publish}:8888"]
    return [*argv, image]


def run_in(
    tools: Tools, image: str, session: Session, command: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return tools.run(
        [*run_argv(tools, image, session), "sh", "-c", command], check=False, timeout=timeout
    )


def world_writable(tools: Tools, image: str) -> list[str]:
    """Return paths of the image's own filesystem that any user may write.

    /proc, /sys, /dev and /tmp are left out, and so are symlinks. The container runs without
    ``--read-only``, which would lay tmpfs mounts over /run and /var/tmp and hide what the image
    has there.
    """
    result = tools.run(
        [
            *tools.container("run", "--rm", "--network", "none", "--user", "0"),
            image,
            "sh",
            "-c",
            WORLD_WRITABLE,
        ],
        check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"could not list world-writable files in {image}: {result.stderr.strip()}."
        )
    # The runtime's files.
    runtime = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv"}
    return [line for line in result.stdout.split() if line and line not in runtime]


def identity(tools: Tools, image: str, session: Session) -> dict[str, str]:
    """Return what the entrypoint made of an unknown uid.

    That is the user name, HOME and the runtime dirs.
    """
    script = (
        'printf "%s\\n" "$(id -un)" "$HOME" "$XDG_RUNTIME_DIR" "$JUPYTER_RUNTIME_DIR" "$(pwd)"; '
        'touch "$HOME/.probe"'
    )
    result = run_in(tools, image, session, script)
    if result.returncode != 0:
        raise ImageBuildError(f"the entrypoint failed in {image}: {result.stderr.strip()}.")
    keys = ("user", "home", "xdg_runtime_dir", "jupyter_runtime_dir", "cwd")
    return dict(zip(keys, result.stdout.splitlines(), strict=False))


def desktop_tools(tools: Tools, image: str, session: Session, xstartup: str) -> dict[str, str]:
    """Return the paths of ``vncserver`` and the desktop start script.

    A path is empty when missing.
    """
    result = run_in(
        tools,
        image,
        session,
        f"command -v vncserver || true; echo; [ -x {xstartup} ] && echo {xstartup}",
    )
    lines = result.stdout.split("\n")
    return {"vncserver": lines[0].strip(), "xstartup": lines[-2].strip() if len(lines) > 2 else ""}


def vnc_greeting(tools: Tools, image: str, session: Session) -> str:
    """Start TigerVNC as jupyter-remote-desktop-proxy does, and read its RFB greeting.

    TigerVNC listens on a Unix socket, with no TCP.
    """
    script = (
        "printf '#!/bin/sh\\nexec openbox\\n' > /tmp/xs && chmod 755 /tmp/xs; "
        "vncserver -rfbunixpath /tmp/vnc.sock -rfbport -1 -xstartup /tmp/xs -fg -geometry 800x600 "
        "-SecurityTypes None >/tmp/vnc.log 2>&1 & "
        "for i in $(seq 60); do [ -S /tmp/vnc.sock ] && break; sleep 0.5; done; "
        'python3 -c \'import socket; s=socket.socket(socket.AF_UNIX); s.connect("/tmp/vnc.sock"); '
        "print(s.recv(12).decode().strip())' || cat /tmp/vnc.log"
    )
    return run_in(tools, image, session, script, timeout=120).stdout.strip()


def x11_window(
    tools: Tools, image: str, session: Session, app: str, title: str, timeout: int = 60
) -> str:
    """Start ``app`` on an X server, and return its window line.

    This runs in a session container. ``app`` is a path in the image, e.g. an extracted AppImage.
    The X server is TigerVNC's Xvnc, with a Unix socket only. Returns the X window line whose name
    contains ``title``, as ``xwininfo -tree`` prints it. If no such window appears, returns the
    app's last output lines.
    """
    script = XVNC + (
        f"DISPLAY=:7 {_quote(app)} >/tmp/app.log 2>&1 & "
        f"for i in $(seq {timeout * 2}); do "
        "  w=$(xwininfo -display :7 -root -tree 2>/dev/null "
        f"| grep -F {_quote(title)}) && break; sleep 0.5; "
        'done; if [ -n "$w" ]; then echo "WINDOW $w"; '
        "else tail -n 5 /tmp/app.log /tmp/xvnc.log; fi"
    )
    output = run_in(tools, image, session, script, timeout=timeout + 60).stdout
    windows = [
        line.removeprefix("WINDOW").strip()
        for line in output.splitlines()
        if line.startswith("WINDOW")
    ]
    return windows[0] if windows else output.strip()[-500:]


def plotms_plot(tools: Tools, image: str, session: Session) -> dict[str, Any]:
    """Simulate, plot and view a small MS with the CASA Python.

    This runs on the container's own X server. It simulates the demo's small MS with casatools
    (``casaspawner.datasets.synth.SIMULATE_MS``), plots it with plotms into ``$HOME/plotms.png``,
    and imports casaviewer's tasks. All of it runs with proxy variables pointing nowhere, as in a
    pod behind a proxy, since casatools and the GUI apps talk gRPC on this host only. Needs the
    measures mounted.

    Returns:

    * ``rows``: the rows of the simulated MS, 0 when simulating failed;
    * ``png``: width, height, colours and blue data pixels, None when plotms wrote none;
    * ``viewer``: "ok" or the import's last error line;
    * ``log``: the last lines of what failed.
    """

    python = '"$CASASPAWNER_CASA_PYTHON"'
    script = XVNC + (
        "export DISPLAY=:7 http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9; cd /tmp; "
        f"{python} -c {_quote(SIMULATE_MS)} /tmp/smoke.ms >/tmp/simulate.log 2>&1; "
        "grep '^ROWS' /tmp/simulate.log; "
        f'{python} -c {_quote(PLOTMS_CODE)} /tmp/smoke.ms "$HOME/plotms.png" '
        ">/tmp/plotms.log 2>&1; "
        "grep '^PNG' /tmp/plotms.log; "
        f"{python} -c {_quote(VIEWER_CODE)} >/tmp/viewer.log 2>&1 "
        "&& echo VIEWER ok || echo VIEWER $(tail -n 1 /tmp/viewer.log); "
        "echo LOG; tail -n 40 /tmp/simulate.log /tmp/plotms.log"
    )
    output, _, log = run_in(tools, image, session, script, timeout=600).stdout.partition("\nLOG\n")
    found = {
        line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in output.splitlines() if " " in line
    }
    return {
        "rows": int(found.get("ROWS", "0")),
        "png": json.loads(found["PNG"]) if "PNG" in found else None,
        "viewer": found.get("VIEWER", "no output"),
        "log": log.strip(),
    }


def kernelspecs(tools: Tools, image: str, session: Session) -> dict[str, Any]:
    result = run_in(tools, image, session, "jupyter kernelspec list --json")
    if result.returncode != 0:
        raise ImageBuildError(
            f"jupyter kernelspec list failed in {image}: {result.stderr.strip()}."
        )
    specs: dict[str, Any] = json.loads(result.stdout)["kernelspecs"]
    return specs


def run_kernel(
    tools: Tools, image: str, session: Session, kernel: str, code: str
) -> dict[str, str]:
    """Start a kernel by its kernelspec, run ``code``, and return status and output.

    The kernel starts as JupyterLab would start it.
    """
    result = run_in(
        tools,
        image,
        session,
        f"python - {_quote(kernel)} {_quote(code)} <<'PY'\n{KERNEL_RUNNER}\nPY",
        timeout=600,
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"kernel {kernel} did not run in {image}: {result.stderr.strip()[-500:]}."
        )
    reply: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    return reply


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def casa_environment(tools: Tools, image: str, session: Session) -> dict[str, str]:
    """Return the image's CASA environment variables, and whether the Python runs.

    The variables are CASASPAWNER_CASA_PYTHON, CASASPAWNER_CASA_HOME and CASASITECONFIG.
    """
    script = (
        'printf "%s\\n" "$CASASPAWNER_CASA_PYTHON" "$CASASPAWNER_CASA_HOME" "$CASASITECONFIG"; '
        '"$CASASPAWNER_CASA_PYTHON" -c "import sys; print(sys.version.split()[0])"'
    )
    result = run_in(tools, image, session, script)
    lines = result.stdout.splitlines() + [""] * 4
    return {"python": lines[0], "home": lines[1], "siteconfig": lines[2], "version": lines[3]}


def server_extensions(tools: Tools, image: str, session: Session) -> dict[str, str]:
    """Report the image's server extensions, and casaspawner's notices in it.

    The result maps each extension to what ``jupyter server extension list`` says of it, "enabled"
    or "disabled". It also holds what the session environment holds of casaspawner's notices:

    * ``<module> (import)``: "ok" or "failed";
    * ``<module> (config)``: the jupyter_server_config.d files that name it;
    * ``<labextension> (labextension)``: what ``jupyter labextension list`` says of it, e.g.
      "enabled OK". It is missing if the list does not show it;
    * ``<labextension> (path)``: its directory under the environment's
      share/jupyter/labextensions, if there.
    """
    labextension = f"/opt/session/share/jupyter/labextensions/{NOTICES_LABEXTENSION}"
    script = (
        "jupyter server extension list 2>&1; "
        f"python -c 'import {NOTICES_EXTENSION}' >/dev/null 2>&1 "
        "&& echo 'IMPORT ok' || echo 'IMPORT failed'; "
        f"echo CONFIG $(grep -l '{NOTICES_EXTENSION}' "
        "/opt/session/etc/jupyter/jupyter_server_config.d/*.json); "
        f"jupyter labextension list 2>&1; echo LABPATH $(ls -d {labextension} 2>/dev/null)"
    )
    result = run_in(tools, image, session, script)
    found: dict[str, str] = {}
    # The list colours "enabled".
    for line in re.sub(r"\x1b\[[0-9;]*m", "", result.stdout).splitlines():
        words = line.split()
        if line.startswith("IMPORT "):
            found[f"{NOTICES_EXTENSION} (import)"] = words[1]
        elif line.startswith("CONFIG"):
            found[f"{NOTICES_EXTENSION} (config)"] = " ".join(words[1:])
        elif line.startswith("LABPATH"):
            found[f"{NOTICES_LABEXTENSION} (path)"] = " ".join(words[1:])
        elif len(words) >= 2 and words[1] in ("enabled", "disabled"):
            found[words[0]] = words[1]
        # The words are name, version, state and validity.
        elif words[:1] == [NOTICES_LABEXTENSION] and len(words) >= 3:
            found[f"{NOTICES_LABEXTENSION} (labextension)"] = " ".join(words[2:4])
    return found


@contextmanager
def jupyter_server(
    tools: Tools,
    image: str,
    session: Session,
    command: Sequence[str] | None = None,
    timeout: float = 120,
) -> Iterator[tuple[str, str]]:
    """Run a Jupyter server from ``image``, reachable on 127.0.0.1 only.

    Yields the base URL and the token once it answers. The desktop's environment is set as the plan
    sets it.
    """
    port, token = free_port(), secrets.token_hex(16)
    name = f"casaspawner-smoke-{port}"
    # The server gets its own network namespace with the port published on 127.0.0.1, as a pod.
    # Where this host has no bridge networking, it uses the host's network, listening on 127.0.0.1
    # only.
    bridge = tools.network == "bridge"
    command = command or [
        "jupyter",
        "lab",
        "--no-browser",
        f"--ip={'0.0.0.0' if bridge else '127.0.0.1'}",  # noqa: S104
        f"--port={8888 if bridge else port}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.open_browser=False",
    ]
    session = replace(
        session, env={"JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP": DESKTOP_XSTARTUP, **session.env}
    )
    argv = run_argv(
        tools,
        image,
        session,
        detach=True,
        name=name,
        network=tools.network,
        publish=port if bridge else None,
    )
    tools.run([*argv, *command])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/api/status", token, timeout, container=(tools, name))
        yield url, token
    finally:
        tools.run([tools.runner, "rm", "-f", name], check=False)


def desktop_greeting(url: str, token: str, timeout: float = 60) -> str:
    """Open the noVNC websocket of jupyter-remote-desktop-proxy, and read the VNC greeting.

    jupyter-remote-desktop-proxy starts TigerVNC with the desktop start script. Returns the first
    bytes the VNC server sends.
    """
    import asyncio

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    async def greet() -> str:
        request = HTTPRequest(
            url.replace("http://", "ws://") + "/desktop-websockify/",
            headers={"Authorization": f"token {token}"},
            request_timeout=timeout,
        )
        connection = await websocket_connect(request)
        try:
            message = await asyncio.wait_for(connection.read_message(), timeout)
        finally:
            connection.close()
        return (
            message.decode(errors="replace").strip()
            if isinstance(message, bytes)
            else str(message)
        )

    return asyncio.run(greet())


def wait_for_http(
    url: str, token: str, timeout: float, container: tuple[Tools, str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            get_json(url, token)
            return
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(1)
    logs = ""
    if container:
        tools, name = container
        logs = tools.run([tools.runner, "logs", name], check=False).stderr[-2000:]
    raise ImageBuildError(
        f"no Jupyter server answered at {url} within {timeout:.0f} s ({last}): {logs}"
    )


def _open(url: str, token: str) -> Any:
    if not url.startswith("http://127.0.0.1:"):
        raise ImageBuildError(f"smoke tests only talk to 127.0.0.1, not {url}.")
    headers = {"Authorization": f"token {token}"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    return urllib.request.urlopen(request, timeout=10)  # noqa: S310


def get_json(url: str, token: str) -> Any:
    with _open(url, token) as response:
        return json.loads(response.read())


def get_status(url: str, token: str) -> int:
    try:
        with _open(url, token) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def chown(path: Path, uid: int = 54321, gid: int = 54321) -> None:
    """Give ``path`` to the session uid, as a storage volume would be.

    When podman is rootless, this happens inside podman's namespace.
    """
    try:
        os.chown(path, uid, gid)
    except PermissionError:
        subprocess.run(["podman", "unshare", "chown", f"{uid}:{gid}", str(path)], check=True)


def home_dir(root: Path | None = None, uid: int = 54321, gid: int = 54321) -> Path:
    """Make a fresh HOME directory on the host, owned by the session uid."""
    path = Path(tempfile.mkdtemp(prefix="casaspawner-home-", dir=root))
    chown(path, uid, gid)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@contextmanager
def kube_play(tools: Tools, manifest: Path, timeout: float = 120) -> Iterator[str]:
    """Run a pod manifest with ``podman kube play``, and yield the pod name.

    The pod gets its own network namespace.
    """
    pod = yaml.safe_load(manifest.read_text())
    name = str(pod["metadata"]["name"])
    network = ["--network", "host"] if tools.network == "host" else []
    tools.run(
        tools.container("kube", "play", "--replace", *network, str(manifest)), timeout=timeout
    )
    try:
        yield name
    finally:
        tools.run(tools.container("kube", "down", str(manifest)), check=False, timeout=timeout)


def exec_http(tools: Tools, container: str, url: str, timeout: float = 120) -> str:
    """GET ``url`` from inside ``container``, retrying until it answers, and return the body.

    Inside the container, ``url`` may name the container's own loopback.
    """
    code = (
        "import sys, urllib.request\n"
        "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    )
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        result = tools.run(
            tools.container("exec", container, "python3", "-c", code, url), check=False
        )
        if result.returncode == 0:
            return result.stdout
        last = _last_error(result.stderr)
        time.sleep(2)
    logs = tools.run(tools.container("logs", container), check=False)
    raise ImageBuildError(
        f"{url} did not answer in {container} ({last}): {(logs.stdout + logs.stderr)[-1500:]}"
    )


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"

"""A desktop's X server for app pods: TCP with the session's cookie, and nothing without it.

The desktop's own ``bin/vncserver`` (TigerVNC) in a network namespace of the test's own, as
a Kubernetes desktop whose apps run in pods starts it (``CASASPAWNER_DESKTOP_X_TCP=1``);
``casa_releases.share_cookie`` leaves the display's cookie as a wildcard entry, as it does in
the user's home for the app pods; a client over TCP gets in with that file, and is refused
without it. Without the variable, the X server does not listen on TCP at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from casaspawner.insession.desktop import casa_releases

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of its own needs root"),
]
DESKTOP = Path(casa_releases.__file__).resolve().parent
#: Run in the namespace: the X server, then what the test asks of it over TCP.
SCRIPT = r"""
set -u
ip link set lo up
"$DESKTOP/bin/vncserver" -rfbunixpath "$HOME/socket" -rfbport -1 -xstartup "$HOME/xstartup" \
    -SecurityTypes None -fg >"$HOME/vnc.log" 2>&1 &
for _ in $(seq 300); do
    [ -s "$HOME/display" ] && break
    sleep 0.1
done
if ! [ -s "$HOME/display" ]; then
    echo "the X server did not start in 30 s" >&2
    kill -KILL %1
    exit 1
fi
n=$(cat "$HOME/display")
echo "display $n"
ss -ltn | grep -q ":$((6000 + n)) " && echo "listens on tcp" || echo "no tcp"
"$PYTHON" -I -c 'import sys; sys.path.insert(0, sys.argv[1]); import casa_releases as c, pathlib; \
c.share_cookie(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4]))' \
    "$DESKTOP" "$HOME/.Xauthority" "$HOME/shared/cookie" "$n" && echo "shared"
stat -c 'mode %a' "$HOME/shared/cookie" 2>/dev/null
XAUTHORITY="$HOME/shared/cookie" xdpyinfo -display "127.0.0.1:$n" >/dev/null 2>&1 \
    && echo "with cookie: in" || echo "with cookie: refused"
XAUTHORITY=/dev/null xdpyinfo -display "127.0.0.1:$n" >/dev/null 2>&1 \
    && echo "without: in" || echo "without: refused"
"$DESKTOP/bin/vncserver" -kill ":$n" >/dev/null 2>&1
kill %1 2>/dev/null
wait
"""


def desktop_in_namespace(home: Path, tcp: bool) -> list[str]:
    for tool in ("unshare", "ip", "ss", "xdpyinfo", "tigervncserver"):
        assert shutil.which(tool), f"{tool} is not installed (make deps installs it)"
    xstartup = home / "xstartup"
    # The display number, as the desktop's own start script would see it, then idle.
    xstartup.write_text('#!/bin/sh\necho "${DISPLAY#:}" > "$HOME/display"\nexec sleep 60\n')
    xstartup.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "DESKTOP": str(DESKTOP),
        "PYTHON": sys.executable,
        **({"CASASPAWNER_DESKTOP_X_TCP": "1"} if tcp else {}),
    }
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr + (home / "vnc.log").read_text(errors="replace")
    return done.stdout.splitlines()


def test_app_pods_reach_the_display_over_tcp_with_the_cookie_alone(tmp_path: Path) -> None:
    lines = desktop_in_namespace(tmp_path, tcp=True)
    assert lines[0].startswith("display "), lines
    assert lines[1:] == [
        "listens on tcp",
        "shared",
        "mode 600",
        "with cookie: in",
        "without: refused",
    ]


def test_a_desktop_whose_apps_run_beside_it_does_not_listen_on_tcp(tmp_path: Path) -> None:
    lines = desktop_in_namespace(tmp_path, tcp=False)
    assert lines[1] == "no tcp", lines

"""Login → CASA desktop on the embedded hub, timed against a plain JupyterHub +
jupyter-remote-desktop-proxy.

Both hubs run on this machine in the same run, with the same browser (Debian's Chromium through
Playwright), the same TigerVNC and openbox. Per repetition a person's path is timed from opening
the login page:

* casaspawner (``hub-config/local``, LocalCASASpawner): log in, type the demo dataset on the form,
  choose the CASA desktop, Start → noVNC "Connected" → the CASA terminal is ready on the
  session's X server (its window takes the build's name only once casatools and casatasks are
  loaded and the CASA prompt is up);
* plain: log in (the hub spawns at once, ``default_url=/desktop/``, SimpleLocalProcessSpawner)
  → "Connected" → the first window (an xterm started by a minimal openbox start script) exists.

The CASA environment is prepared (warm) before timing: its one-off build is reported separately by
``make demo``. Results: ``benchmarks/results/local-desktop.json``. Run with ``make bench-local``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# casaspawner from this checkout, and the tests' support package (the hub launcher, the browser).
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support.browser import chromium  # noqa: E402
from support.hub import Hub  # noqa: E402

from casaspawner.local import demo  # noqa: E402
from casaspawner.net import free_port  # noqa: E402
from casaspawner.runtime import cache_dir as default_cache_dir  # noqa: E402

CASA_CONFIG = """
import os
c = get_config()
load_subconfig({example!r})
c.JupyterHub.services = [{{"name": "bench", "api_token": os.environ["BENCH_TOKEN"]}}]
c.JupyterHub.load_roles = [
    {{"name": "bench", "scopes": ["admin:users", "admin:servers"], "services": ["bench"]}}
]
"""

PLAIN_CONFIG = """
import os
c = get_config()
port = int(os.environ["BENCH_PORT"])
state = os.environ["BENCH_STATE"]
c.JupyterHub.bind_url = f"http://127.0.0.1:{{port}}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{{port + 1}}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{{port + 2}}"
c.JupyterHub.db_url = f"sqlite:///{{state}}/plain.sqlite"
c.JupyterHub.cookie_secret_file = f"{{state}}/plain_cookie_secret"
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = os.environ["BENCH_PASSWORD"]
c.Authenticator.allowed_users = {{"bench"}}
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = state + "/homes/{{username}}"
c.Spawner.default_url = "/desktop/"
c.Spawner.args = ["--allow-root"] if os.geteuid() == 0 else []
c.Spawner.environment = {{"JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP": {xstartup!r}}}
c.JupyterHub.services = [{{"name": "bench", "api_token": os.environ["BENCH_TOKEN"]}}]
c.JupyterHub.load_roles = [
    {{"name": "bench", "scopes": ["admin:users", "admin:servers"], "services": ["bench"]}}
]
"""

PLAIN_XSTARTUP = "#!/bin/sh\nxterm -title plain-desktop &\nexec openbox\n"


def x_window(auth_prefix: str, title: str, timeout: float = 60) -> bool:
    """Wait until a window titled ``title`` exists on the Xtigervnc whose -auth file is under
    ``auth_prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-a", "Xtigervnc"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "-auth" in parts and parts[parts.index("-auth") + 1].startswith(auth_prefix):
                display = next(p for p in parts if p.startswith(":"))
                env = {
                    **os.environ,
                    "DISPLAY": display,
                    "XAUTHORITY": parts[parts.index("-auth") + 1],
                }
                tree = subprocess.run(
                    ["xwininfo", "-root", "-tree"], capture_output=True, text=True, env=env
                )
                if tree.returncode == 0 and f'"{title}": (' in tree.stdout:
                    return True
        time.sleep(0.1)
    print(
        "no window:",
        subprocess.run(["pgrep", "-a", "Xtigervnc"], capture_output=True, text=True).stdout,
        file=sys.stderr,
    )
    return False


def kill_x_servers(auth_prefix: str) -> None:
    """Stop X servers this benchmark's plain sessions left behind (SimpleLocalProcessSpawner does
    not)."""
    out = subprocess.run(["pgrep", "-a", "Xtigervnc"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if "-auth" in parts and parts[parts.index("-auth") + 1].startswith(auth_prefix):
            os.kill(int(parts[0]), signal.SIGTERM)


def one_login(
    browser: Any, hub: Hub, form: bool, auth_prefix: str, title: str
) -> dict[str, float]:
    """Time ``hub.user``'s path from the login page to the window titled ``title``."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(300_000)
    t0 = time.perf_counter()
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", hub.user)
    page.fill("#password_input", hub.password)
    page.click("#login_submit")
    if form:
        page.wait_for_selector("#casa-dataset")
        t_form = time.perf_counter() - t0
        page.fill("#casa-dataset", f"~/{demo.DEMO_PROJECT}")
        page.check("input[name=interface][value=desktop]")
        page.locator("form#spawn_form [type=submit]").click()
    else:
        t_form = 0.0
    page.wait_for_url("**/desktop/**")
    page.wait_for_function("(document.querySelector('#status') || {}).textContent === 'Connected'")
    t_connected = time.perf_counter() - t0
    ok = x_window(auth_prefix, title)
    t_window = time.perf_counter() - t0
    context.close()
    if not ok:
        raise RuntimeError(f"{hub.name}: no window {title!r} appeared")
    return {
        "form_s": round(t_form, 3),
        "connected_s": round(t_connected, 3),
        "window_s": round(t_window, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "local-desktop.json"
    )
    args = parser.parse_args()
    cache = Path(os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR") or default_cache_dir())
    root = Path(tempfile.mkdtemp(prefix="casaspawner-bench-", dir="/tmp"))
    os.chmod(root, 0o755)
    hubs: list[Hub] = []
    try:
        t = time.perf_counter()
        release, _dataset = demo.prepare(root / "arc", cache)
        prepare_s = time.perf_counter() - t
        token, password = secrets.token_hex(16), secrets.token_urlsafe(12)
        # Each hub's proxy, the proxy's API and the hub.
        casa_port = free_port(count=3)
        casa_config = root / "casa_bench_config.py"
        casa_config.write_text(CASA_CONFIG.format(example=str(demo.HUB_CONFIG)))
        env = demo.hub_environment(root, casa_port, password, cache, root / "arc")
        casa_env = {**env, "BENCH_TOKEN": token}
        casa = Hub(
            casa_config,
            root / "hub",
            casa_env,
            casa_port,
            token=token,
            user=demo.DEMO_USER,
            password=password,
            name="casaspawner",
        )
        casa.start()
        hubs.append(casa)
        plain_port = free_port(count=3)
        xstartup = root / "plain-xstartup"
        xstartup.write_text(PLAIN_XSTARTUP)
        xstartup.chmod(0o755)
        plain_config = root / "plain_config.py"
        plain_config.write_text(PLAIN_CONFIG.format(xstartup=str(xstartup)))
        plain_env = {
            **env,
            "BENCH_TOKEN": token,
            "BENCH_PORT": str(plain_port),
            "BENCH_STATE": str(root / "plain"),
            "BENCH_PASSWORD": password,
        }
        plain = Hub(
            plain_config,
            root / "plain",
            plain_env,
            plain_port,
            token=token,
            user="bench",
            password=password,
            name="plain",
        )
        plain.start()
        hubs.append(plain)
        runs: dict[str, list[dict[str, float]]] = {"casaspawner": [], "plain": []}
        with chromium() as browser:
            # Interleaved, so drift affects both alike.
            for _ in range(args.repeat):
                casa.stop_server()
                casa_x = str(root / "arc")
                runs["casaspawner"].append(one_login(browser, casa, True, casa_x, release.label))
                casa.stop_server()
                plain.stop_server()
                plain_x = str(root / "plain")
                runs["plain"].append(one_login(browser, plain, False, plain_x, "plain-desktop"))
                plain.stop_server()
                kill_x_servers(plain_x)
        summary = {
            name: {
                key: statistics.median(r[key] for r in results)
                for key in ("connected_s", "window_s")
            }
            for name, results in runs.items()
        }
        result = {
            "benchmark": "login → desktop: casaspawner (LocalCASASpawner, CASA desktop) "
            "vs plain JupyterHub + jupyter-remote-desktop-proxy",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "prepare_warm_s": round(prepare_s, 3),
            "casa": release.label,
            "repeat": args.repeat,
            "runs": runs,
            "median": summary,
            "overhead_median_s": {
                key: round(summary["casaspawner"][key] - summary["plain"][key], 3)
                for key in ("connected_s", "window_s")
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["median"], indent=1))
        print(f"overhead (median): {result['overhead_median_s']}  → {args.out}")
        return 0
    finally:
        for hub in hubs:
            try:
                hub.stop_server()
            finally:
                hub.stop()
        kill_x_servers(str(root / "plain"))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Login → CASA desktop and login → first Lab cell, against a plain JupyterHub.

Both hubs run on this machine in the same run, with the same browser (Debian's Chromium through
Playwright), the same TigerVNC and openbox, the same JupyterLab. Per repetition a person's path is
timed from opening the login page, for each interface:

* desktop, casaspawner (``hub-config/local``, LocalCASASpawner): log in, the form (which holds the
  demo dataset), choose the CASA desktop, Start → noVNC "Connected" → the CASA terminal is ready
  on the session's X server (its window takes the build's name only once casatools and casatasks
  are loaded and the CASA prompt is up);
* desktop, plain (SimpleLocalProcessSpawner + jupyter-remote-desktop-proxy, from the Jupyter
  environment casaspawner's sessions run): log in (the hub spawns at once and goes on to
  ``/desktop/``) → "Connected" → the first window (an xterm started by a minimal openbox start
  script) exists;
* lab, casaspawner: the same form with JupyterLab → the launcher → a notebook in the CASA kernel →
  the first cell's output;
* lab, plain: log in (the hub spawns at once and goes on to ``/lab``) → the launcher → a notebook
  in the Python 3 kernel → the first cell's output.

The CASA environment is prepared (warm) before timing: its one-off build is reported separately by
``make demo``. Results, with the ratios of the medians: ``benchmarks/results/local-desktop.json``.
Run with ``make bench-local``.
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
from casaspawner.local.environments import EnvironmentManager  # noqa: E402
from casaspawner.local.spawner import ui_requirements  # noqa: E402
from casaspawner.net import free_port  # noqa: E402
from casaspawner.runtime import cache_dir as default_cache_dir  # noqa: E402

CASA_CONFIG = """
import os
c = get_config()
load_subconfig({example!r})
c.JupyterHub.services.append({{"name": "bench", "api_token": os.environ["BENCH_TOKEN"]}})
c.JupyterHub.load_roles.append(
    {{"name": "bench", "scopes": ["admin:users", "admin:servers"], "services": ["bench"]}}
)
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
c.Spawner.cmd = [os.environ["BENCH_SINGLEUSER"]]
c.Spawner.args = ["--allow-root"] if os.geteuid() == 0 else []
c.Spawner.environment = {{"JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP": {xstartup!r}}}
c.JupyterHub.services = [{{"name": "bench", "api_token": os.environ["BENCH_TOKEN"]}}]
c.JupyterHub.load_roles = [
    {{"name": "bench", "scopes": ["admin:users", "admin:servers"], "services": ["bench"]}}
]
"""

PLAIN_XSTARTUP = "#!/bin/sh\nxterm -title plain-desktop &\nexec openbox\n"
#: The first cell, the same in both kernels.
CELL = "print(6 * 7)"


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


def log_in(browser: Any, hub: Hub, next_path: str = "") -> tuple[Any, Any, float]:
    """Open the login page and log in; returns the context, the page and the start time."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(300_000)
    t0 = time.perf_counter()
    page.goto(f"{hub.url}/hub/login" + (f"?next={next_path}" if next_path else ""))
    page.fill("#username_input", hub.user)
    page.fill("#password_input", hub.password)
    page.click("#login_submit")
    return context, page, t0


def submit_form(page: Any, interface: str) -> None:
    """Start the demo dataset on the form with ``interface``.

    The form holds the dataset already: it suggests it on a first visit, and keeps the last one.
    """
    dataset = page.locator("#casa-dataset")
    dataset.wait_for()
    if dataset.input_value() != demo.DEMO_DATASET:
        raise RuntimeError(f"the form offers {dataset.input_value()!r}, not the demo dataset")
    page.check(f"input[name=interface][value={interface}]")
    page.locator("form#spawn_form [type=submit]").click()


def one_desktop(
    browser: Any, hub: Hub, form: bool, auth_prefix: str, title: str
) -> dict[str, float]:
    """Time ``hub.user``'s path from the login page to the window titled ``title``."""
    context, page, t0 = log_in(browser, hub, "" if form else "/hub/user-redirect/desktop/")
    if form:
        submit_form(page, "desktop")
    page.wait_for_url("**/desktop/**")
    page.wait_for_function("(document.querySelector('#status') || {}).textContent === 'Connected'")
    t_connected = time.perf_counter() - t0
    ok = x_window(auth_prefix, title)
    t_window = time.perf_counter() - t0
    context.close()
    if not ok:
        raise RuntimeError(f"{hub.name}: no window {title!r} appeared")
    return {"connected_s": round(t_connected, 3), "window_s": round(t_window, 3)}


def one_lab(browser: Any, hub: Hub, form: bool, kernel: str) -> dict[str, float]:
    """Time ``hub.user``'s path from the login page to the output of a first cell in ``kernel``."""
    context, page, t0 = log_in(browser, hub, "" if form else "/hub/user-redirect/lab")
    if form:
        submit_form(page, "lab")
    page.wait_for_url("**/lab**")
    card = page.locator(f".jp-LauncherCard[title*='{kernel}']").first
    card.wait_for()
    t_lab = time.perf_counter() - t0
    card.click()
    # The status bar says so once the kernel is connected (the notebook's own indicator says
    # idle before).
    page.get_by_text(f"{kernel} | Idle").first.wait_for()
    t_kernel = time.perf_counter() - t0
    page.locator(".jp-Cell .cm-content").first.click()
    page.keyboard.type(CELL)
    page.keyboard.press("Shift+Enter")
    page.locator(".jp-OutputArea-output", has_text="42").first.wait_for()
    t_cell = time.perf_counter() - t0
    context.close()
    return {
        "lab_s": round(t_lab, 3),
        "kernel_s": round(t_kernel, 3),
        "cell_s": round(t_cell, 3),
    }


def reset_home(home: Path) -> None:
    """Forget the last repetition's notebooks and JupyterLab workspace in ``home``.

    Otherwise JupyterLab reopens them, asking for a kernel.
    """
    for notebook in home.glob("Untitled*.ipynb"):
        notebook.unlink()
    for directory in (home / ".ipynb_checkpoints", home / ".jupyter" / "lab" / "workspaces"):
        shutil.rmtree(directory, ignore_errors=True)


def summarise(runs: dict[str, list[dict[str, float]]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Medians per hub, and casaspawner's medians over the plain hub's."""
    median = {
        name: {key: statistics.median(r[key] for r in results) for key in keys}
        for name, results in runs.items()
    }
    return {
        "runs": runs,
        "median": median,
        "ratio": {
            key: round(median["casaspawner"][key] / median["plain"][key], 3) for key in keys
        },
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
        # Each hub's proxy, the proxy's API and the hub; casaspawner's casa-sessions too.
        casa_port = free_port(count=4)
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
        # The Jupyter server casaspawner's sessions run, so that only the spawners differ.
        requirements = ui_requirements()
        jupyter = (
            EnvironmentManager(cache).ui_prefix(requirements) if requirements else Path(sys.prefix)
        )
        plain_env = {
            **env,
            "BENCH_SINGLEUSER": str(jupyter / "bin" / "jupyterhub-singleuser"),
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
        desktop: dict[str, list[dict[str, float]]] = {"casaspawner": [], "plain": []}
        lab: dict[str, list[dict[str, float]]] = {"casaspawner": [], "plain": []}
        casa_x, plain_x = str(root / "arc"), str(root / "plain")
        with chromium() as browser:
            # Interleaved, so drift affects both alike.
            for _ in range(args.repeat):
                for hub in (casa, plain):
                    hub.stop_server()
                desktop["casaspawner"].append(
                    one_desktop(browser, casa, True, casa_x, release.label)
                )
                casa.stop_server()
                desktop["plain"].append(
                    one_desktop(browser, plain, False, plain_x, "plain-desktop")
                )
                plain.stop_server()
                kill_x_servers(plain_x)
                reset_home(root / "arc" / "home" / demo.DEMO_USER)
                lab["casaspawner"].append(one_lab(browser, casa, True, release.label))
                casa.stop_server()
                reset_home(root / "plain" / "homes" / "bench")
                lab["plain"].append(one_lab(browser, plain, False, "Python 3 (ipykernel)"))
                plain.stop_server()
        result = {
            "benchmark": "login → CASA desktop and login → first Lab cell: casaspawner "
            "(LocalCASASpawner) vs plain JupyterHub + jupyter-remote-desktop-proxy",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "prepare_warm_s": round(prepare_s, 3),
            "casa": release.label,
            "repeat": args.repeat,
            "desktop": summarise(desktop, ("connected_s", "window_s")),
            "lab": summarise(lab, ("lab_s", "kernel_s", "cell_s")),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        for interface in ("desktop", "lab"):
            print(interface, json.dumps(result[interface]["median"]))
            print(f"{interface}: casaspawner / plain (medians) {result[interface]['ratio']}")
        print(f"→ {args.out}")
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

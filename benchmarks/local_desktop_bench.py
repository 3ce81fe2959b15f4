"""Login → CASA desktop on the embedded hub, timed against a plain JupyterHub + jupyter-remote-desktop-proxy.

Both hubs run on this machine in the same run, with the same browser (Debian's Chromium through Playwright),
the same TigerVNC and openbox. Per repetition a person's path is timed from opening the login page:

* casaspawner (``hub-config/local``, LocalCASASpawner): log in, type the demo dataset on the form, choose the
  CASA desktop, Start → noVNC "Connected" → the CASA terminal is ready on the session's X server (its window
  takes the build's name only once casatools and casatasks are loaded and the CASA prompt is up);
* plain: log in (the hub spawns at once, ``default_url=/desktop/``, SimpleLocalProcessSpawner) → "Connected"
  → the first window (an xterm started by a minimal openbox start script) exists.

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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from casaspawner.local import demo  # noqa: E402
from casaspawner.runtime import cache_dir as default_cache_dir  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip

CASA_CONFIG = """
import os
c = get_config()
load_subconfig({example!r})
c.JupyterHub.services = [{{"name": "bench", "api_token": os.environ["BENCH_TOKEN"]}}]
c.JupyterHub.load_roles = [{{"name": "bench", "scopes": ["admin:users", "admin:servers"], "services": ["bench"]}}]
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
c.JupyterHub.load_roles = [{{"name": "bench", "scopes": ["admin:users", "admin:servers"], "services": ["bench"]}}]
"""

PLAIN_XSTARTUP = "#!/bin/sh\nxterm -title plain-desktop &\nexec openbox\n"


def free_port_block() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 3 < 65000 and all(demo.port_problem(p) is None for p in range(base, base + 3)):
            return base


class Hub:
    def __init__(
        self, name: str, config: Path, env: dict[str, str], state: Path, port: int, token: str
    ) -> None:
        self.name, self.config, self.env, self.state, self.port, self.token = (
            name,
            config,
            env,
            state,
            port,
            token,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
        return json.loads(text) if text.strip() else None

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        log = open(self.state / f"{self.name}.log", "wb")  # noqa: SIM115 - the hub's whole life
        self.proc = subprocess.Popen(
            [str(Path(sys.prefix) / "bin" / "jupyterhub"), "-f", str(self.config)], cwd=self.state, env=self.env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.api("GET", "/hub/api/")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"{self.name} hub did not start")

    def stop_server(self, user: str) -> None:
        model = self.api("GET", f"/hub/api/users/{user}")
        if not model.get("servers"):
            return
        self.api("DELETE", f"/hub/api/users/{user}/server")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.api("GET", f"/hub/api/users/{user}").get("servers"):
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def x_window(auth_prefix: str, title: str, timeout: float = 60) -> bool:
    """Wait until a window titled ``title`` exists on the Xtigervnc whose -auth file is under ``auth_prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-a", "Xtigervnc"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "-auth" in parts and parts[parts.index("-auth") + 1].startswith(auth_prefix):
                display = next(p for p in parts if p.startswith(":"))
                env = {**os.environ, "DISPLAY": display, "XAUTHORITY": parts[parts.index("-auth") + 1]}
                tree = subprocess.run(["xwininfo", "-root", "-tree"], capture_output=True, text=True, env=env)
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
    """Stop X servers this benchmark's plain sessions left behind (SimpleLocalProcessSpawner does not)."""
    out = subprocess.run(["pgrep", "-a", "Xtigervnc"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if "-auth" in parts and parts[parts.index("-auth") + 1].startswith(auth_prefix):
            os.kill(int(parts[0]), signal.SIGTERM)


def one_login(
    browser: Any, hub: Hub, user: str, password: str, form: bool, auth_prefix: str, title: str
) -> dict[str, float]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(300_000)
    t0 = time.perf_counter()
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", password)
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
    return {"form_s": round(t_form, 3), "connected_s": round(t_connected, 3), "window_s": round(t_window, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "local-desktop.json")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    cache = Path(os.environ.get("CASASPAWNER_ENVIRONMENTS_DIR") or default_cache_dir())
    root = Path(tempfile.mkdtemp(prefix="casaspawner-bench-", dir="/tmp"))
    os.chmod(root, 0o755)
    hubs: list[Hub] = []
    try:
        t = time.perf_counter()
        release, _dataset = demo.prepare(root / "arc", cache)
        prepare_s = time.perf_counter() - t
        token, password = secrets.token_hex(16), secrets.token_urlsafe(12)
        casa_port, plain_port = free_port_block(), 0
        casa_config = root / "casa_bench_config.py"
        casa_config.write_text(CASA_CONFIG.format(example=str(demo.HUB_CONFIG)))
        env = demo.hub_environment(root, casa_port, password, cache, root / "arc")
        casa = Hub("casaspawner", casa_config, {**env, "BENCH_TOKEN": token}, root / "hub", casa_port, token)
        casa.start()
        hubs.append(casa)
        plain_port = free_port_block()
        xstartup = root / "plain-xstartup"
        xstartup.write_text(PLAIN_XSTARTUP)
        xstartup.chmod(0o755)
        plain_config = root / "plain_config.py"
        plain_config.write_text(PLAIN_CONFIG.format(xstartup=str(xstartup)))
        plain_env = {**env, "BENCH_TOKEN": token, "BENCH_PORT": str(plain_port), "BENCH_STATE": str(root / "plain"),
                     "BENCH_PASSWORD": password}  # fmt: skip
        plain = Hub("plain", plain_config, plain_env, root / "plain", plain_port, token)
        plain.start()
        hubs.append(plain)
        runs: dict[str, list[dict[str, float]]] = {"casaspawner": [], "plain": []}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            for _ in range(args.repeat):  # interleaved, so drift affects both alike
                casa.stop_server(demo.DEMO_USER)
                runs["casaspawner"].append(one_login(browser, casa, demo.DEMO_USER, password, True,
                                                     str(root / "arc"), release.label))  # fmt: skip
                casa.stop_server(demo.DEMO_USER)
                plain.stop_server("bench")
                runs["plain"].append(one_login(browser, plain, "bench", password, False,
                                               str(root / "plain"), "plain-desktop"))  # fmt: skip
                plain.stop_server("bench")
                kill_x_servers(str(root / "plain"))
            browser.close()
        summary = {
            name: {key: statistics.median(r[key] for r in results) for key in ("connected_s", "window_s")}
            for name, results in runs.items()
        }
        result = {
            "benchmark": "login → desktop: casaspawner (LocalCASASpawner, CASA desktop) vs plain JupyterHub + "
            "jupyter-remote-desktop-proxy",
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
                hub.stop_server(demo.DEMO_USER if hub.name == "casaspawner" else "bench")
            finally:
                hub.stop()
        kill_x_servers(str(root / "plain"))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

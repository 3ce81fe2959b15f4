# Local mode (LocalCASASpawner): the embedded demo hub, its browser tests and the login → desktop benchmark.
#
# Debian packages: TigerVNC + openbox + xterm for the CASA desktop, X utilities the desktop and the tests use
# (xmessage, xsetroot, xwininfo, wmctrl), Debian's Chromium for the Playwright tests (never `playwright install`).
APT_PACKAGES += tigervnc-standalone-server tigervnc-tools openbox xterm x11-utils x11-xserver-utils wmctrl \
	dbus-x11 xauth fonts-dejavu-core chromium perl xz-utils util-linux
PIP_EXTRAS += local

# `make demo`: CASA environment + simulated MeasurementSet (cached under ~/.cache/casaspawner, or
# /var/cache/casaspawner as root), then the hub on http://127.0.0.1:$(DEMO_PORT).
DEMO_PORT ?= 8000
.PHONY: demo-local bench-local
demo-local: venv chp
	$(BIN)/python -m casaspawner.local.demo run --port $(DEMO_PORT)

# Login → CASA desktop on this hub, against a plain JupyterHub + jupyter-remote-desktop-proxy, in one run.
bench-local: venv chp
	$(BIN)/python benchmarks/local_desktop_bench.py --out benchmarks/results/local-desktop.json

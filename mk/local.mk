# Local mode (LocalCASASpawner): the embedded demo hub, its browser tests and the login → desktop benchmark.
#
# Debian packages: TigerVNC + openbox + xterm for the CASA desktop, X utilities the desktop and the tests use
# (xmessage, xsetroot, xwininfo, wmctrl), Debian's Chromium for the Playwright tests (never `playwright install`).
APT_PACKAGES += tigervnc-standalone-server tigervnc-tools openbox xterm x11-utils x11-xserver-utils wmctrl \
	dbus-x11 xauth fonts-dejavu-core chromium perl xz-utils util-linux
# Node for configurable-http-proxy, unless some Node (e.g. NodeSource's, which bundles npm) is already there.
ifeq ($(shell command -v npm 2>/dev/null),)
APT_PACKAGES += nodejs npm
endif
PIP_EXTRAS += local

# configurable-http-proxy from npm, installed inside the repository (gitignored .cache/).
CHP_VERSION ?= 5.3.0
CHP := .cache/npm/node_modules/.bin/configurable-http-proxy
$(CHP):
	npm install --silent --no-audit --no-fund --prefix .cache/npm configurable-http-proxy@$(CHP_VERSION)
	@test -x $@

.PHONY: chp demo-local bench-local
chp: deps $(CHP)
TEST_PREREQS += chp

# `make demo`: CASA environment + simulated MeasurementSet (cached under ~/.cache/casaspawner, or
# /var/cache/casaspawner as root), then the hub on http://127.0.0.1:$(DEMO_PORT).
DEMO_PORT ?= 8000
DEMO_PREREQS += chp
DEMO_COMMAND := $(BIN)/python -m casaspawner.local.demo run --port $(DEMO_PORT)
demo-local: venv chp
	$(DEMO_COMMAND)

# Login → CASA desktop on this hub, against a plain JupyterHub + jupyter-remote-desktop-proxy, in one run.
bench-local: venv chp
	$(BIN)/python benchmarks/local_desktop_bench.py --out benchmarks/results/local-desktop.json

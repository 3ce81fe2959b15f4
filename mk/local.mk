# Local mode (LocalCASASpawner): the embedded demo hub, its browser tests and the login → desktop benchmark.
#
# Debian packages: TigerVNC + openbox + xterm for the CASA desktop, X utilities the desktop and the tests use
# (xmessage, xsetroot, xwininfo, wmctrl), Debian's Chromium for the Playwright tests (never `playwright install`).
APT_PACKAGES += tigervnc-standalone-server tigervnc-tools openbox xterm x11-utils x11-xserver-utils wmctrl \
	dbus-x11 xauth fonts-dejavu-core chromium perl xz-utils util-linux
PIP_EXTRAS += local

# `make demo`: a venv of its own (not the tests' $(VENV)) with casaspawner and only what the demo's hub runs:
# JupyterHub, JupyterLab and the noVNC desktop for the sessions, and the idle culler. The install is editable (the
# demo runs this checkout) with setuptools' note about editable installs silenced. Then the CASA environment and
# a simulated MeasurementSet (cached under ~/.cache/casaspawner, or /var/cache/casaspawner as root), and the hub on
# http://127.0.0.1:$(DEMO_PORT) (and the next three ports).
DEMO_PORT ?= 8000
DEMO_VENV ?= demo/venv
.PHONY: demo-local demo-venv bench-local

$(DEMO_VENV)/.installed: setup.cfg pyproject.toml mk/local.mk
	@echo "[casaspawner demo] Installing casaspawner, JupyterHub and JupyterLab into $(DEMO_VENV) (a minute or two, once)."
	@test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV)
	@$(DEMO_VENV)/bin/python -m pip install --quiet --upgrade pip
	@PYTHONWARNINGS="ignore:Editable installation" \
		$(DEMO_VENV)/bin/python -m pip install --quiet -e ".[demo]"
	@touch $@

demo-venv: deps $(DEMO_VENV)/.installed

demo-local: demo-venv chp
	@$(DEMO_VENV)/bin/python -m casaspawner.local.demo run --port $(DEMO_PORT)

# Login → CASA desktop and login → first Lab cell on this hub, against a plain JupyterHub, in one run.
bench-local: venv chp
	$(BIN)/python benchmarks/local_desktop_bench.py --out benchmarks/results/local-desktop.json

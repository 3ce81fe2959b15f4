# casaspawner: `make demo` and `make test` are the two entry points (see README.md).
# Both are idempotent: they install what is missing (Debian packages, the venv, npm tools) and nothing
# else. Each area adds its Debian packages, venv extras, test prerequisites and targets in
# mk/<area>.mk: hub (the casa-sessions service and hub configuration), images, kube, local, cluster.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages every target needs; mk/*.mk files append their own.
APT_PACKAGES := python3-venv python3-dev git
# Node for configurable-http-proxy, unless some Node (NodeSource's bundles npm) is there already.
ifeq ($(shell command -v npm 2>/dev/null),)
APT_PACKAGES += nodejs npm
endif
# Extras installed into the venv; mk/*.mk files append theirs.
PIP_EXTRAS := test docs
# What the test run needs besides the venv; mk/*.mk files append theirs.
PYTEST_PREREQS := chp
PYTEST_ARGS ?=
comma := ,
empty :=
space := $(empty) $(empty)

include $(sort $(wildcard mk/*.mk))

.PHONY: help deps venv chp lint typecheck pytest docs test demo bench-resolve clean

help:
	@echo "make demo   install what is missing and run casaspawner on this machine"
	@echo "make test   install what is missing and run every test (ruff, mypy, pytest, docs)"

deps:
	@scripts/apt-ensure $(sort $(APT_PACKAGES))

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(subst $(space),$(comma),$(sort $(PIP_EXTRAS)))]"
	@touch $@

venv: deps $(VENV)/.installed

# configurable-http-proxy from npm, inside the repository (gitignored .cache/): every hub the demo,
# the tests and the benchmarks start uses it.
CHP_VERSION ?= 5.3.0
CHP := .cache/npm/node_modules/.bin/configurable-http-proxy
$(CHP):
	npm install --silent --no-audit --no-fund --prefix .cache/npm configurable-http-proxy@$(CHP_VERSION)
	@test -x $@

chp: deps $(CHP)

lint: venv
	$(BIN)/ruff check casaspawner tests benchmarks images hub-config binder
	$(BIN)/ruff format --check casaspawner tests benchmarks images hub-config binder

typecheck: venv
	$(BIN)/mypy casaspawner

# Every pytest tier but k8s: unit, integration and images (k8s-test runs the real cluster's).
pytest: venv $(PYTEST_PREREQS)
	$(BIN)/pytest --ignore=tests/k8s $(PYTEST_ARGS)

# The documentation; a warning fails the build.
docs: venv
	$(BIN)/sphinx-build -q -W -b html docs docs/_build/html

# What CI (.ci/run) runs, in this order.
test: lint typecheck docs pytest k8s-test kube-test-hub5

# The main job on the embedded default: mk/local.mk's hub on this machine.
demo: demo-local

bench-resolve: venv
	$(BIN)/python benchmarks/resolve_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

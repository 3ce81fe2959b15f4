# casaspawner: `make demo` and `make test` are the two entry points (see README.md).
# Both are idempotent: they install what is missing (apt packages, the venv, npm tools) and nothing else.
# Area-specific targets and their system packages live in mk/*.mk (one file per area).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages every target needs; mk/*.mk files append their own.
APT_PACKAGES := python3-venv python3-dev git
# Extras installed into the venv; mk/*.mk files may append.
PIP_EXTRAS := test docs
PYTEST_ARGS ?=
comma := ,
empty :=
space := $(empty) $(empty)

include $(sort $(wildcard mk/*.mk))

.PHONY: help deps venv lint typecheck unit test demo docs clean

help:
	@echo "make demo   install what is missing and run casaspawner on this machine"
	@echo "make test   install what is missing and run every test (ruff, mypy, pytest)"

deps:
	@scripts/apt-ensure $(sort $(APT_PACKAGES))

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(subst $(space),$(comma),$(sort $(PIP_EXTRAS)))]"
	@touch $@

venv: deps $(VENV)/.installed

lint: venv
	$(BIN)/ruff check casaspawner tests benchmarks images
	$(BIN)/ruff format --check casaspawner tests benchmarks images

typecheck: venv
	$(BIN)/mypy casaspawner

unit: venv
	$(BIN)/pytest -m "not integration and not images and not k8s" $(PYTEST_ARGS)

# Everything CI runs: lint, types, every test tier except `k8s` (real cluster only), and the docs (warnings fail).
test: venv $(TEST_PREREQS)
	$(BIN)/ruff check casaspawner tests benchmarks images
	$(BIN)/ruff format --check casaspawner tests benchmarks images
	$(BIN)/mypy casaspawner
	$(BIN)/pytest -m "not k8s" $(PYTEST_ARGS)
	$(BIN)/sphinx-build -q -W -b html docs docs/_build/html

# The main job on the embedded default. mk/local.mk sets DEMO_COMMAND to the embedded hub; without it, the
# demo resolves a generated example dataset and prints what a session would run.
DEMO_COMMAND ?= $(BIN)/casaspawner demo-data demo/datasets --era cycle10 && \
	$(BIN)/casaspawner resolve demo/datasets/cycle10
demo: venv $(DEMO_PREREQS)
	$(DEMO_COMMAND)

docs: venv
	$(BIN)/sphinx-build -q -W -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

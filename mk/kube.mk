# Kubernetes spawner (CASASpawner, casaspawner pod): its tests, a JupyterHub 5.5 compatibility run
# (what z2jh 4.4 ships) and a dry-run example. kmock and kubernetes-validate come with the `test`
# extra; the real cluster is mk/cluster.mk's.

# JupyterHub 5.5 venv, cached outside the clone and keyed by the packaging files.
KUBE_HUB5_KEY := $(shell cat setup.cfg pyproject.toml | sha256sum | cut -c1-12)
KUBE_HUB5_VENV ?= $(HOME)/.cache/casaspawner/venv-hub5.5-$(KUBE_HUB5_KEY)

.PHONY: kube-test kube-test-hub5 kube-dry-run

# The spawners' tests on this venv's JupyterHub (6.x): the pipeline, the mixin, manifests, the
# kmock lifecycle and the dry run.
kube-test: venv
	$(BIN)/pytest tests/session tests/spawners tests/kube $(PYTEST_ARGS)

$(KUBE_HUB5_VENV)/.installed: setup.cfg pyproject.toml
	@for old in $(dir $(KUBE_HUB5_VENV))venv-hub5.5-*; do \
		if [ -d "$$old" ] && [ "$$old" != "$(KUBE_HUB5_VENV)" ]; then rm -rf "$$old"; fi; done
	@test -x $(KUBE_HUB5_VENV)/bin/python || $(PYTHON) -m venv $(KUBE_HUB5_VENV)
	$(KUBE_HUB5_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KUBE_HUB5_VENV)/bin/python -m pip install --quiet "jupyterhub==5.5.*" ".[test]"
	@touch $@

# The mixin, spawner, lifecycle and real-hub tests under JupyterHub 5.5, a step of `make test` (about 30 s
# once the venv exists). JupyterHub 5 has no SpawnException (see spawners/errors.py). These tests use
# no hypothesis: its plugin would import it at the end of the run, which CPython 3.11.7 failed once
# with "AST constructor recursion depth mismatch" (CPython gh-106905) after every test had passed.
kube-test-hub5: deps chp $(KUBE_HUB5_VENV)/.installed
	$(KUBE_HUB5_VENV)/bin/python -m pip install --quiet --no-deps --force-reinstall .
	$(KUBE_HUB5_VENV)/bin/python -c "import jupyterhub; assert jupyterhub.__version__.startswith('5.5'), jupyterhub.__version__"
	$(KUBE_HUB5_VENV)/bin/pytest -q -p no:cacheprovider -p no:hypothesispytest \
		tests/spawners/test_spawners_mixin.py tests/kube/test_kube_spawner.py \
		tests/kube/test_kube_lifecycle.py tests/kube/test_kube_hub.py $(PYTEST_ARGS)

# Print the pod a desktop session on a synthetic Cycle 10 dataset would get (no cluster needed).
kube-dry-run: venv
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	member=$$($(BIN)/casaspawner demo-data "$$tmp" --era cycle10) && \
	$(BIN)/casaspawner pod --user alice --uid 1001 --gid 1001 --group proja --dataset "$$member" --interface desktop

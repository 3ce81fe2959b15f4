# Hub configuration: z2jh values, the casa-sessions service, OIDC login and admin browser tests
# (tests/hub). Chromium is Debian's: Playwright never downloads a browser.
APT_PACKAGES += chromium
PIP_EXTRAS += hub hubtest

# The sessions' notices in JupyterLab: a prebuilt JupyterLab extension, built from HUB_LAB_SRC into HUB_LAB_OUT
# (committed: pip installs it as is, no Node needed) with @jupyter/builder from npm, in .cache/.
HUB_LAB_SRC := casaspawner/insession/notices-lab
HUB_LAB_OUT := casaspawner/insession/labextension
HUB_LAB_WORK := .cache/npm-lab
# What a wheel installs from setup.cfg's data_files; an editable install (`make venv`) skips them.
HUB_VENV_LAB := $(VENV)/share/jupyter/labextensions/casaspawner-notices
HUB_VENV_SERVER_CONFIG := $(VENV)/etc/jupyter/jupyter_server_config.d/casaspawner.json
HUB_VENV_LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.d/casaspawner.json

.PHONY: hub-test hub-prepuller hub-labextension hub-dev-install
# Only the hub tests (values schema, both deployments' configuration, login, admin page, drain, notices, culling).
hub-test: venv chp hub-dev-install
	$(BIN)/pytest tests/hub $(PYTEST_ARGS)

# Print prePuller.extraImages for hub-config/z2jh/values.yaml: runs the command written in the values' comment.
hub-prepuller: venv
	$(BIN)/$$(grep -o 'casaspawner images prepuller .*' hub-config/z2jh/values.yaml)

# Rebuild the JupyterLab extension after changing its source; commit $(HUB_LAB_OUT) with the source.
hub-labextension: venv
	mkdir -p $(HUB_LAB_WORK)/src
	cp $(HUB_LAB_SRC)/package.json $(HUB_LAB_SRC)/index.js $(HUB_LAB_WORK)/src/
	npm install --silent --no-audit --no-fund --no-package-lock --prefix $(HUB_LAB_WORK)/src
	rm -rf $(HUB_LAB_WORK)/labextension
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter-builder build $(HUB_LAB_WORK)/src
	rm -rf $(HUB_LAB_OUT)
	cp -r $(HUB_LAB_WORK)/labextension $(HUB_LAB_OUT)
	cd $(HUB_LAB_SRC) && sha256sum package.json index.js > $(abspath $(HUB_LAB_OUT))/built-from.sha256

# The data files of a wheel install, linked into the development venv (JupyterLab extension, server config,
# JupyterLab setting defaults).
hub-dev-install: venv
	mkdir -p $(dir $(HUB_VENV_LAB)) $(dir $(HUB_VENV_SERVER_CONFIG)) $(dir $(HUB_VENV_LAB_OVERRIDES))
	ln -sfn $(abspath $(HUB_LAB_OUT)) $(HUB_VENV_LAB)
	ln -sfn $(abspath casaspawner/insession/jupyter-config/casaspawner.json) $(HUB_VENV_SERVER_CONFIG)
	ln -sfn $(abspath casaspawner/insession/lab-overrides/casaspawner.json) $(HUB_VENV_LAB_OVERRIDES)
PYTEST_PREREQS += hub-dev-install

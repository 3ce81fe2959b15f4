# Hub configuration: z2jh values, the casa-sessions service, OIDC login and admin browser tests (tests/hub).
# configurable-http-proxy comes from mk/local.mk's `chp` target (already in TEST_PREREQS); the tests find it
# in .cache/npm/node_modules/.bin. Chromium is Debian's (Playwright never downloads a browser).
APT_PACKAGES += chromium
PIP_EXTRAS += hub hubtest

.PHONY: hub-test hub-prepuller
# Only the hub tests (values schema, extraConfig, login, admin page, drain, notices, culling).
hub-test: venv chp
	$(BIN)/pytest tests/hub $(PYTEST_ARGS)

# Print prePuller.extraImages for hub-config/z2jh/values.yaml from the catalog.
hub-prepuller: venv
	$(BIN)/casaspawner images prepuller

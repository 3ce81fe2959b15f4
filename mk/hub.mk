# Hub configuration: z2jh values, the casa-sessions service, OIDC login and admin browser tests (tests/hub).
APT_PACKAGES += chromium nodejs  # npm comes with the machine's Node 20
PIP_EXTRAS += hub hubtest
TEST_PREREQS += hub-chp

# configurable-http-proxy (npm) for the real hubs the integration tests start; installed once, globally.
.PHONY: hub-chp hub-test hub-prepuller
hub-chp: deps
	@command -v configurable-http-proxy >/dev/null || npm install --global --no-audit --no-fund configurable-http-proxy@5

# Only the hub tests (values schema, extraConfig, login, admin page, drain, notices).
hub-test: venv hub-chp
	$(BIN)/pytest tests/hub $(PYTEST_ARGS)

# Print prePuller.extraImages for hub-config/z2jh/values.yaml from the catalog.
hub-prepuller: venv
	$(BIN)/python -m casaspawner.services.hubconfig prepuller

# Binder (binder/, tests/binder): the Ubuntu packages binder/apt.txt lists are installed here too,
# so the tests build the Binder environment from the same list; their names are Debian's as well.
hash := \#
APT_PACKAGES += $(shell sed -e 's/$(hash).*//' binder/apt.txt)

.PHONY: binder-test
# The Binder tests alone: the environment from binder/ (cached, about 2 GB, once per change of its
# requirements), postBuild as a throwaway user, the notebook in the CASA kernel, the desktop.
binder-test: deps venv
	$(BIN)/pytest tests/binder $(PYTEST_ARGS)

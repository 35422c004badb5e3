# fracnode: `make run` serves on embedded defaults; `make test` installs what the tests need and runs them.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Debian packages the tests use as real peers and validators.
APT_PACKAGES := dcmtk dicom3tools orthanc postgresql prometheus openssl
APT_COMMANDS := storescu dciodvfy Orthanc promtool openssl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test venv test-deps apt-deps lint typecheck clean bench

$(VENV)/.stamp-run: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "fracnode needs Python 3.11"'
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip 'setuptools>=70' wheel
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-run pyproject.toml
	$(PIP) install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.stamp-run

run: $(VENV)/.stamp-run
	$(VENV)/bin/fracnode serve

apt-deps:
	@missing=0; for c in $(APT_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1; \
	if [ $$missing = 1 ]; then \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi

test-deps: apt-deps $(VENV)/.stamp-test

test: test-deps
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check node inference storage tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check node inference storage tests

typecheck: $(VENV)/.stamp-test
	$(VENV)/bin/mypy

bench: $(VENV)/.stamp-test
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache

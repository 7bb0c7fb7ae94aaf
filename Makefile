# flywheel: `make run` and `make test` each set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export FLYWHEEL_HOME ?= $(CURDIR)/.flywheel
# System packages: FFCV builds against OpenCV and libjpeg-turbo; the browser test drives Chromium;
# the dbt models are tested on a PostgreSQL server the test starts.
APT_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev chromium postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DBT_SOURCES := $(shell find dbt_project/models dbt_project/macros dbt_project/tests -type f 2>/dev/null) dbt_project/dbt_project.yml dbt_project/profiles.yml

.PHONY: setup run test dev system-packages clean

setup: system-packages $(VENV)/.installed dbt_project/target/manifest.json

system-packages:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
		echo "installing system packages: $(APT_PACKAGES)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; }

# pip, not uv/poetry: pip picks the local CPU wheel of torch instead of downloading a CUDA build.
$(VENV)/.installed: pyproject.toml | system-packages
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# The dbt manifest is prepared at build time, not on every import of the Dagster definitions.
dbt_project/target/manifest.json: $(DBT_SOURCES) $(VENV)/.installed
	$(BIN)/dbt parse --quiet --project-dir dbt_project --profiles-dir dbt_project
	@touch $@

run: setup
	$(BIN)/flywheel simulate --batches 4
	$(BIN)/flywheel run
	@echo; echo "== one loop iteration: a drifted, labeled batch lands (inverted polarity, digits never seen) =="
	$(BIN)/flywheel simulate --batches 1 --pool holdout --drift invert --prefix drift-invert
	$(BIN)/flywheel run
	@echo; $(BIN)/flywheel status

# Two test files at a time (pytest-xdist; a file's tests stay together, in order, on one worker):
# a loop tick keeps ~1.2 of 2 cores busy (process start-ups, Dagster's polling), so two overlap well.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

dev: setup
	PATH=$(CURDIR)/$(BIN):$$PATH DAGSTER_HOME=$$($(BIN)/python -m orchestration.instance) \
		$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

clean:
	rm -rf $(FLYWHEEL_HOME) dbt_project/target dbt_project/logs

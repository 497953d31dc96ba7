# The chat backend: every entry point a developer, tester or CI needs.
# `make run` and `make test` set up whatever is missing first.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The API reference's viewers (npm, pinned in package-lock.json), served from docs/vendor/.
VIEWERS := docs/vendor/.installed
export PYTHONPATH := $(CURDIR)/libs:$(CURDIR)

SERVICES := profile group persistence session message-router group-router push-notification gateway

.PHONY: help setup system-deps browser-deps run infra test test-unit test-integration test-e2e test-browser \
        lint format typecheck bench bench-quick fuzz faults topics docs clean $(addprefix run-,$(SERVICES))

help:
	@echo "make run          set up and start the whole system on 127.0.0.1:8080 (PUBLIC_PORT in .env)"
	@echo "make test         set up and run every test"
	@echo "make infra        Kafka, MongoDB, topics and Nginx only"
	@echo "make run-<svc>    one service in the foreground ($(SERVICES))"
	@echo "make bench        the full benchmark (~15-25 min): writes docs/benchmarks.md and docs/bench/"
	@echo "make bench-quick  idle, one at a time, 200 msgs/s (< 3 min); figures to var/bench/"
	@echo "                  (python -m bench.run --help: choose phases, rates and sizes)"
	@echo "make fuzz         a long fuzz run against docs/openapi.yaml; figures in docs/fuzzing.md"
	@echo "make faults       the long fault campaign (every fault once at 100 msgs/s); its line in docs/faults.md"
	@echo "make lint | format | typecheck"

# --- setup ---------------------------------------------------------------

system-deps:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  echo "installing Debian's nginx..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }
	@python3 -c 'import venv, ensurepip' 2>/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing Debian's nodejs and npm (the API reference's viewers come from npm)..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }

browser-deps:
	@[ -x /usr/bin/chromium ] || { \
	  echo "installing Debian's chromium for the browser tests..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

$(STAMP): requirements.txt requirements-dev.txt
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(VIEWERS): package.json package-lock.json helper/docs_viewers.sh
	sh helper/docs_viewers.sh

.env:
	cp .env.tmpl .env

setup: system-deps $(STAMP) $(VIEWERS) .env

# --- run -----------------------------------------------------------------

run: setup
	$(PY) -m helper.run all

infra: setup
	$(PY) -m helper.run infra

topics: setup
	$(PY) -m helper.run topics

$(addprefix run-,$(SERVICES)): run-%: setup
	$(PY) -m helper.run service $*

# --- quality -------------------------------------------------------------

test: setup browser-deps
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration

test-e2e: setup
	$(PY) -m pytest tests/e2e

test-browser: setup browser-deps
	$(PY) -m pytest tests/browser

lint: setup
	$(VENV)/bin/ruff check libs services helper tests bench
	$(VENV)/bin/ruff format --check libs services helper tests bench

format: setup
	$(VENV)/bin/ruff format libs services helper tests bench
	$(VENV)/bin/ruff check --fix libs services helper tests bench

typecheck: setup
	$(VENV)/bin/mypy libs/chatlib

bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

# Idle, one at a time and 200 msgs/s only (with the echo floor they are given against), with
# budgets that keep it under 3 minutes even on a slow system; docs/ left alone.
bench-quick: setup
	$(PY) -m bench.run --phases floor,idle,one,ladder --rates 200 --floor-count 200 --no-profile --no-docs \
	  --one-budget 30 --drain 20 --quiet-budget 15 $(BENCH_ARGS)

# Tens of thousands of Schemathesis cases against a system of its own (make test runs a short one).
FUZZ_EXAMPLES ?= 500
fuzz: setup
	$(PY) -m tests.fuzzing --max-examples $(FUZZ_EXAMPLES)

# Every fault of issue 13 once under careful clients, on a supervised system of its own (~5-10 min);
# its summary line goes to docs/faults.md.
FAULTS_RATE ?= 100
faults: setup
	$(PY) -m tests.faults --rate $(FAULTS_RATE)

# Regenerate docs/asyncapi.yaml from chatlib.schemas and chatlib.topics (docs/openapi.yaml is written by
# hand), and the routes block of the nginx template from docs/openapi.yaml.
docs: setup
	$(PY) -m helper.gen_asyncapi
	$(PY) -m helper.nginx_routes

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

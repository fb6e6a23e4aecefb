# The two commands a newcomer needs: `make run` and `make test`. CI calls `make test`.
# The interpreter of the virtualenv: PYTHON when given; otherwise the system's CPython
# (/usr/bin/python3) when it is 3.11 or newer and can make a virtualenv, else python3 on PATH.
# Linux distributions and the official Docker images (the one deploy/Dockerfile starts from)
# build CPython with profile-guided and link-time optimisation; version managers such as pyenv
# do not unless told to, and on such a build the worker spent 7 to 13% more CPU per request
# (README, Performance). `make clean` first to change the interpreter of a .venv.
SYSTEM_PYTHON := /usr/bin/python3
PYTHON ?= $(shell $(SYSTEM_PYTHON) -c 'import sys, venv, ensurepip; ensurepip.version(); sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo $(SYSTEM_PYTHON) || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint bench clean deploy-tools

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Ctrl-C reaches make and llmstream dev (one process group); dev stops its children itself.
run: install
	$(BIN)/llmstream dev

# Tests wait on real brokers, Redis and worker processes far more than they compute: three
# processes (each with its own embedded broker and Redis; a test file stays in one process)
# take the suite from about 9 minutes to about 3 on two cores. TEST_PROCESSES= runs it serially.
TEST_PROCESSES ?= -n 3 --dist loadfile

test: install deploy-tools
	$(BIN)/python -m pytest $(TEST_PROCESSES) $(PYTEST_ARGS)

# What tests/test_deploy.py runs on the deployment files, without Docker: docker-compose
# (config), promtool (check, test rules) and kubectl (kustomize); and curl, which the README's
# examples use (tests/test_readme.py runs them); openssl, with which tests/test_provider_pool.py
# makes a TLS certificate. Installed from Debian's packages
# when missing and apt-get can run (CI: root); otherwise the checks say what is missing.
deploy-tools:
	@missing=""; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null \
	      || echo "deploy-tools: could not install$$missing; tests/test_deploy.py will fail"; \
	  else \
	    echo "deploy-tools: missing$$missing (apt-get install as root): their checks skip here, fail in CI"; \
	  fi; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/llmstream bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

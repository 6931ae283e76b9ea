# The two commands: `make demo` and `make test`. Both create .venv when missing and install into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quantdeck-installed
PYTEST_ARGS ?=

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Headless when there is no terminal (CI, pipes); the console otherwise.
demo: $(STAMP)
	@if [ -t 1 ] && [ -z "$$CI" ]; then $(VENV)/bin/quantdeck demo; else $(VENV)/bin/quantdeck demo --headless; fi

# Every test runs; GPU-only tests are deselected where no CUDA device exists.
test: $(STAMP)
	@if $(PY) -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then m=""; else m='not requires_gpu'; fi; \
	$(PY) -m pytest -q $${m:+-m "$$m"} $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# fusedit — two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch first (a small wheel); users with GPUs install their own CUDA build instead.
TORCH_PIN ?= torch==2.13.0
LINTED := src tests tools

.PHONY: venv demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# The linters (ruff, mypy) are installed only for `make lint`, not for `make demo`.
$(VENV)/.lint-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,lint]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/fusedit demo

# Everything, the slow end-to-end, demo, distributed and evaluation-command tests included (what CI runs).
test: venv
	$(PY) -m pytest -q tests

# The fast lane (under a minute): every test not marked slow.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

# ruff (lint with bugbear and isort, and the formatter's check) and mypy, as configured in pyproject.toml.
lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

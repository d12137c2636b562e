# fusedit — two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch first (a small wheel); users with GPUs install their own CUDA build instead.
TORCH_PIN ?= torch==2.13.0
LINTED := src tests tools

.PHONY: venv demo test test-fast lint clean gpu-check gpu-check-cpu gpu-prepare

# The demo needs fusedit alone; the tests and the web page need the test and serve extras on top.
$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-core
	$(PY) -m pip install --quiet -e ".[test,serve,lowmem]"
	touch $@

# The linters (ruff, mypy) are installed only for `make lint`, not for `make demo`.
$(VENV)/.lint-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,serve,lowmem,lint]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed-core
	$(VENV)/bin/fusedit demo

# Everything, the slow end-to-end, demo, distributed and evaluation-command tests included (what CI runs).
test: venv
	$(PY) -m pytest -q tests

# The fast lane (under a minute): every test not marked slow, on both cores (pytest-xdist).
test-fast: venv
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# ruff (lint with bugbear and isort, and the formatter's check) and mypy, as configured in pyproject.toml.
lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

# The GPU check (docs/performance.md, "GPU check"): no venv dependency, since a GPU machine brings its own CUDA
# PyTorch (tools/gpu_check.sh picks the Python whose torch sees CUDA). GPU_CHECK_ARGS passes options through.
gpu-check:
	bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

# The same steps at tiny size on the CPU (what tests/test_gpu_check.py runs).
gpu-check-cpu: venv
	PYTHON=$(PY) bash tools/gpu_check.sh --device cpu --quick $(GPU_CHECK_ARGS)

# Before a run on a lent device machine: wheels the device image lacks into .whl/ (git-ignored; name it in the run
# tool's carry).
gpu-prepare: venv
	PYTHON=$(PY) bash tools/gpu_check.sh --prepare

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

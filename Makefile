# fusedit — two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch first (a small wheel); users with GPUs install their own CUDA build instead.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/fusedit demo

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache

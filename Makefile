# fusedit — two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch first (a small wheel); users with GPUs install their own CUDA build instead.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test clean gpu-check gpu-check-cpu gpu-prepare

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

# The GPU check (docs/performance.md, "GPU check"): no venv dependency, since a GPU machine brings its own CUDA
# PyTorch (tools/gpu_check.sh picks the Python whose torch sees CUDA). GPU_CHECK_ARGS passes options through.
gpu-check:
	bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

# The same steps at tiny size on the CPU (what tests/test_gpu_check.py runs).
gpu-check-cpu: venv
	PYTHON=$(PY) bash tools/gpu_check.sh --device cpu --quick $(GPU_CHECK_ARGS)

# Before a run on a lent device machine: wheels the device image lacks into .whl/, ../shared/fixtures into
# .gpu-fixtures/ (both git-ignored; name them in the run tool's carry).
gpu-prepare: venv
	PYTHON=$(PY) bash tools/gpu_check.sh --prepare

clean:
	rm -rf $(VENV) runs .pytest_cache

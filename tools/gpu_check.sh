#!/usr/bin/env bash
# The GPU check (issue 16): one prepared run proving fusedit on one H100/H200 in at most 8 minutes.
#
#   tools/gpu_check.sh                       # on a GPU machine: every step, JSON lines + summary, exit 0 iff all pass
#   tools/gpu_check.sh --device cpu --quick  # every step at tiny size on the CPU (what the tests run)
#   tools/gpu_check.sh --prepare             # here, before a device run: fetch the wheels the device image lacks
#                                            # into .whl/
#   tools/gpu_check.sh --help                # every option (tools/gpu_check.py)
#
# Python: $PYTHON if set; else the first of .venv/bin/python and python3 whose torch sees CUDA (for --device cpu:
# .venv/bin/python first). fusedit runs from this checkout's src/ (PYTHONPATH), so nothing is installed: no
# `pip install -e .`, which would need the network for its build backend. Missing dependencies (the device image has
# no diffusers) are installed from .whl/*.whl, offline, into a temporary folder put on PYTHONPATH.
# See docs/performance.md, "GPU check".
set -u
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)

# Wheels the device image lacks (KINDS.md: torch, transformers, tokenizers, safetensors, ... are there; diffusers is
# not; its other requirements are). Pinned to the version the CPU venv uses.
GPU_CHECK_WHEELS=${GPU_CHECK_WHEELS:-"diffusers==0.42.1"}

prepare() {
    local py=${PYTHON:-}
    if [ -z "$py" ]; then
        if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
    fi
    mkdir -p .whl
    # shellcheck disable=SC2086
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $GPU_CHECK_WHEELS || { echo "gpu_check: pip download of $GPU_CHECK_WHEELS failed" >&2; return 1; }
    echo "prepared: $(ls .whl | tr '\n' ' ')" >&2
    echo "carry: [\".whl\"] (git-ignored; $(du -sh .whl | cut -f1))" >&2
}

device=cuda
prev=""
for arg in "$@"; do
    case "$arg" in
        --prepare) prepare; exit $? ;;
        --device=*) device=${arg#--device=} ;;
    esac
    [ "$prev" = "--device" ] && device=$arg
    prev=$arg
done

has_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

py=${PYTHON:-}
if [ -z "$py" ]; then
    candidates=()
    [ -x .venv/bin/python ] && candidates+=(.venv/bin/python)
    command -v python3 >/dev/null 2>&1 && candidates+=(python3)
    if [ "${device%%:*}" = cuda ]; then
        for c in "${candidates[@]}"; do
            if has_cuda "$c"; then py=$c; break; fi
        done
    fi
    [ -z "$py" ] && py=${candidates[0]:-python3}
fi

deps='import torch, transformers, diffusers, tokenizers, safetensors, yaml, PIL, numpy, tqdm'
# GPU_CHECK_FORCE_WHEELS=1: install .whl/ even when everything imports (to test other versions, e.g. the CI's
# transformers: GPU_CHECK_WHEELS="diffusers==0.42.1 transformers==5.24.0" tools/gpu_check.sh --prepare)
if [ "${GPU_CHECK_FORCE_WHEELS:-0}" = 1 ] || ! "$py" -c "$deps" >/dev/null 2>&1; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        site=${TMPDIR:-/tmp}/fusedit-gpu-check-site
        echo "gpu_check: installing $(ls .whl | tr '\n' ' ')offline into $site" >&2
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            >&2 || echo "gpu_check: offline install from .whl/ failed" >&2
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: $py cannot import the dependencies ($deps) and there is no .whl/ to install from" \
             "(tools/gpu_check.sh --prepare fetches them); the environment step will say what is missing" >&2
    fi
fi
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" tools/gpu_check.py "$@"

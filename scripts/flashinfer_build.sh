#!/usr/bin/env bash
# FlashInfer's sampling kernels, built here for a side-by-side benchmark on a lent GPU machine (which has no network):
# `bench/bench_sample_draft.py --backends flashinfer,cuda,...` times them where `import flashinfer` works.
#
#   bash scripts/flashinfer_build.sh            # -> .flashinfer/ (ignored by git; ~7 MB): carry it to the GPU call
#                                               #    and put it on PYTHONPATH there
#
# The library links torch's C++ symbols, so it is built against the torch and the Python of the GPU machine, not
# this checkout's: in a build venv (FI_VENV, default /tmp/flashinfer-build) of FI_PYTHON (default python3.12) with
# torch==FI_TORCH (default 2.11.0, the lent machines' torch 2.11.0+cu130 as of 2026-11-27; a library built against
# torch 2.14 failed to load there: undefined symbol c10::cuda::CUDAErrorLogCapture). The venv's first install takes
# ~1 min from the wheel mirror, the compilation ~5 min on 2 cores.
#
# Not a dependency of bild-kernels: a benchmark-only install of flashinfer-python 0.3.1.post1, the last release
# whose kernels compile against CUDA 13's CUB without apache-tvm-ffi (0.4 needs it; 0.2 uses cub::Max, gone in
# CUDA 13), its sampling extension compiled ahead of time for sm_90 with torch's C++20 headers (the release asks for
# C++17, which torch 2.14's headers no longer build with), then stripped to its Python files and that one library
# (data/aot/sampling/sampling.so, which its loader takes before trying to compile anything).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.1.post1
DEST=.flashinfer
FI_TORCH=${FI_TORCH:-2.11.0}
FI_VENV=${FI_VENV:-/tmp/flashinfer-build}
PY="$FI_VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$FI_TORCH')" 2>/dev/null; then
    rm -rf "$FI_VENV"
    "${FI_PYTHON:-python3.12}" -m venv "$FI_VENV"
    "$PY" -m pip install -q "torch==$FI_TORCH" numpy setuptools ninja requests pynvml einops click tqdm tabulate \
        "packaging>=24.2"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-build-isolation -d "$work/src" "flashinfer-python==$VERSION"
FLASHINFER_ENABLE_AOT=0 "$PY" -m pip install -q --no-deps --no-build-isolation --target "$work/pkg" \
    "$work"/src/flashinfer_python-"$VERSION".tar.gz
sed -i 's/"-std=c++17"/"-std=c++20"/g' "$work/pkg/flashinfer/jit/core.py"
# (the bytecode pip compiled has the same size and, within a second, the same time stamp: it would still be used)
find "$work/pkg" -name __pycache__ -prune -exec rm -rf {} +
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$work/lib"  # torch's cpp_extension links -lcudart: the CUDA runtime of torch's own nvidia wheel
ln -sf "$site/nvidia/cu13/lib/libcudart.so.13" "$work/lib/libcudart.so"
CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}" LIBRARY_PATH="$work/lib${LIBRARY_PATH:+:$LIBRARY_PATH}" \
    FLASHINFER_CUDA_ARCH_LIST="9.0" TORCH_CUDA_ARCH_LIST="9.0" FLASHINFER_WORKSPACE_BASE="$work/ws" \
    MAX_JOBS=${MAX_JOBS:-2} PYTHONPATH="$work/pkg" "$PY" -c "import flashinfer.sampling as s; s.get_sampling_module()"
so=$(find "$work/ws" -name sampling.so | head -1)
[ -n "$so" ] || { echo "flashinfer_build.sh: the sampling library was not built" >&2; exit 1; }
mkdir -p "$work/pkg/flashinfer/data/aot/sampling"
cp "$so" "$work/pkg/flashinfer/data/aot/sampling/sampling.so"
# the headers, sources and cutlass only served the compilation
rm -rf "$work/pkg/flashinfer/data/"{cutlass,include,csrc,spdlog,tvm_binding} "$work/pkg/"*.dist-info
find "$work/pkg" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$DEST"
mv "$work/pkg" "$DEST"
"$PY" -c "import torch, sys; print(torch.__version__, sys.version.split()[0])" > "$DEST/BUILT_WITH"
du -sh "$DEST"
FLASHINFER_CUDA_ARCH_LIST="9.0" PYTHONPATH="$DEST" "$PY" -c \
    "import flashinfer.sampling as s; s.get_sampling_module(); print('flashinfer $VERSION: sampling for sm_90 ready')"

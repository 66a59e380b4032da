#!/usr/bin/env bash
# The test command (README, .ci/run): installs everything, compile-checks csrc/ and every Triton kernel
# for sm_90, then runs the test suite. Without a GPU, Triton kernels run under TRITON_INTERPRET=1 and
# GPU-only tests skip with their reason; on a GPU machine the same command runs them all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup.sh

echo "== compile check: bild_kernels._C (csrc/ for sm_90)"
if command -v nvcc >/dev/null 2>&1 && [ "${BILD_NO_CUDA:-0}" != "1" ]; then
    python -c "import bild_kernels._C, torch; print('   bild_kernels._C built:', torch.ops.bild_kernels_C.verify_draft)"
else
    echo "   skipped: nvcc not found or BILD_NO_CUDA=1"
fi

echo "== compile check: bild_kernels._cpu (csrc/cpu_linear.cpp, x86-64)"
case "$(uname -m)" in
    x86_64|amd64)
        if [ "${BILD_NO_CPU_EXT:-0}" != "1" ]; then
            python -c "import bild_kernels._cpu, torch; print('   bild_kernels._cpu built; AVX2/FMA here:', torch.ops.bild_kernels_cpu.cpu_linear_supported())"
        else
            echo "   skipped: BILD_NO_CPU_EXT=1"
        fi ;;
    *) echo "   skipped: not x86-64" ;;
esac

echo "== compile check: every Triton kernel ahead of time for sm_90"
python python/tools/aot_compile_triton.py

HAS_GPU=$(python -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_GPU" = "0" ]; then
    export TRITON_INTERPRET=1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The default large model's dequantised cache is written once here, so that the test workers only read it.
python -c "from bild_kernels.models import load_model; from bild_kernels.models.default import default_pair; load_model(default_pair()[0])"
# Two test processes (pytest-xdist), one torch thread each, a test file per process at a time (its fixtures
# built once): the suite is CPU-bound and single-threaded per test.
WORKERS="${BILD_TEST_WORKERS:-$(python -c "import os; print(min(2, os.cpu_count() or 1))")}"
echo "== pytest (TRITON_INTERPRET=${TRITON_INTERPRET:-0}, GPU=$HAS_GPU, $WORKERS workers)"
if [ "$WORKERS" -gt 1 ]; then
    OMP_NUM_THREADS=1 python -m pytest -q -m "not slow" -p no:cacheprovider -n "$WORKERS" --dist loadfile tests "$@"
else
    python -m pytest -q -m "not slow" -p no:cacheprovider tests "$@"
fi

#!/usr/bin/env bash
# The GPU checks, for a session that is lent a GPU machine (the device tool's `run`), which has torch,
# Triton, transformers and pytest but no network and no pip index: build in place, then run the stages
# named on the command line; the logs and bench/results/*.csv come back in $OUT/gpu_session.tgz (the
# device tool returns at most 8 files), and each stage's last lines are printed. Each call of
# the device tool may run 10 minutes, so split the stages over calls, e.g.
#   run: bash scripts/gpu_session.sh build tests          (kernel + engine GPU tests, CUDA-graph draft loop and passes)
#   run: bash scripts/gpu_session.sh build bench          (every kernel benchmark at serving shapes)
#   run: bash scripts/gpu_session.sh build e2e divergence (Llama-1B-shaped pair at batch 1 with the HF
#                                                          baselines; bf16 batch divergence)
#   run: bash scripts/gpu_session.sh build e2e_batch      (the same pair at batch 8 and 32, engine only)
# With little device time: `build kernel_tests bench_targets` (the kernel tests, then verify_draft and
# sample_draft at the issue's target shapes and every rollback size: a few minutes).
# Stages: build | tests | kernel_tests | bench | bench_targets | e2e | e2e_batch | divergence | ctest. Wheels in .whl/ (carried) are installed first.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
LOG="$(mktemp -d)/logs"
mkdir -p "$OUT" "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build
PY="${PYTHON:-python3}"
status=0

stage() {  # stage NAME COMMAND...: run it, log it, remember a failure, go on with the next stage
    local name=$1; shift
    echo "== $name: $*"
    local t0; t0=$(date +%s)
    "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    echo "   $name: rc=$rc, $(( $(date +%s) - t0 )) s (log: $LOG/$name.log)"
    tail -n 15 "$LOG/$name.log"
    [ $rc -eq 0 ] || status=1
}

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$LOG/device.txt"

for s in "$@"; do
    case "$s" in
        build) stage build "$PY" setup.py build_ext --inplace ;;
        tests) stage tests "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --maxfail 20 --timeout 500 \
                   tests/kernels tests/engine/test_draft_loop.py tests/engine/test_static_extend.py tests/engine/test_engine.py \
                   tests/engine/test_models.py tests/engine/test_speculative_sampling.py ;;
        kernel_tests) stage kernel_tests "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --maxfail 20 \
                          --timeout 300 tests/kernels ;;
        bench_targets) stage bench_verify_targets "$PY" bench/bench_verify_draft.py --device cuda \
                           --shapes 64x8x128256,256x8x128256,64x4x32000
                       stage bench_sample_targets "$PY" bench/bench_sample_draft.py --device cuda \
                           --shapes 64x128256,256x128256,1x128256
                       stage bench_rollback "$PY" bench/bench_rollback_paged_kv.py --device cuda ;;
        bench) for op in write_paged_kv rollback_paged_kv gather_paged_kv sample_draft verify_draft paged_attention; do
                   stage "bench_$op" "$PY" "bench/bench_$op.py" --device cuda
               done ;;
        e2e) stage e2e "$PY" bench/bench_e2e.py --device cuda --pair llama-1b --tokens 64 --prompts 8 \
                 --batch-sizes 1 ;;
        e2e_batch) stage e2e_batch "$PY" bench/bench_e2e.py --device cuda --pair llama-1b --tokens 64 \
                       --prompts 64 --batch-sizes 8,32 --no-hf ;;
        divergence) stage divergence "$PY" python/load_test.py --tiny --device cuda --dtype bfloat16 \
                        --out bench/results/serve_load_bf16_cuda.csv ;;
        ctest) stage ctest sh -c "cmake -S . -B build/cmake -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 \
                   && cmake --build build/cmake && ctest --test-dir build/cmake --output-on-failure" ;;
        *) echo "unknown stage: $s (build | tests | kernel_tests | bench | bench_targets | e2e | e2e_batch | divergence | ctest)"; exit 2 ;;
    esac
done
tar czf "$OUT/gpu_session.tgz" -C "$(dirname "$LOG")" logs -C "$ROOT" bench/results
exit $status

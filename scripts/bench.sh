#!/usr/bin/env bash
# Set everything up, then run the benchmarks — the end-to-end engine benchmark
# (every policy vs LargeOnly vs Hugging Face) and each kernel against its reference. On a machine
# without a GPU they run CPU-sized shapes (Triton kernels under the interpreter); on a GPU, serving shapes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$(python -c 'import torch; print(int(torch.cuda.is_available()))')" = "0" ]; then
    export TRITON_INTERPRET=1
    E2E_ARGS=(--pair tiny --tokens 32 --prompts 4 --batch-sizes 1,4)
else
    E2E_ARGS=(--pair llama-1b --tokens 128 --prompts 16 --batch-sizes 1,8,32)
fi
echo "== end to end: policies vs LargeOnly vs Hugging Face"
python bench/bench_e2e.py "${E2E_ARGS[@]}" "$@"
for op in write_paged_kv rollback_paged_kv gather_paged_kv sample_draft verify_draft paged_attention apply_token_bitmask; do
    echo "== bench_$op"
    python "bench/bench_$op.py" "$@"
done
echo "results appended to bench/results/*.csv"

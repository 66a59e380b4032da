#!/usr/bin/env bash
# The feature draft's distillation on a GPU machine of the device tool, after `scripts/gpu_carry.sh` brought the
# GGUF's parts there (the last part rides with this call): joins them, then warm-starts the shipped draft with
# `bild distill` and the arguments given, BatchGenerator writing the corpus. With BULK_CHECK=1 it first checks
# BatchGenerator at batch 1,024 beside HF generate (bench/bench_bulk.py, ~65 s; it passed on the H200 on
# 2026-11-27b) and writes the corpus with HF generate if that fails. What comes back in $OUT: distill.log,
# draft.tgz (the new draft directory, card included), and with the check bench_bulk.log and bulk.csv.
#
#   run(carry=[".carry2"], command="bash scripts/gpu_distill.sh .carry2 --prompts 23704 --corpus-seed 3
#       --self-prompts 8000 --samples-per-prompt 3 --corpus-minutes 2 --minutes 2.5")
#
# Time on an H200 (run 3, 2026-11-27b: 7.2 M tokens): the corpus ~1,150 answers/s, the teacher's targets ~176k and
# features ~250k tokens/s, training as set, ~70 s to load, evaluate and write. DISTILL_TIMEOUT (seconds, default
# 440) cuts the distillation; the batch check is cut at 80 s.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
part="${1:?the carried part of the GGUF, e.g. .carry2}"
shift
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
bash scripts/gpu_carry.sh stash "$part" > /dev/null || exit 3
eval "$(bash scripts/gpu_carry.sh unpack)" || exit 3
t0=$(date +%s)
backend=(--corpus-backend bild)
if [ "${BULK_CHECK:-0}" = 1 ]; then
    timeout 80 python3 bench/bench_bulk.py --device cuda --model default --large "$BILD_LARGE" --batch-sizes 1024 \
        > "$OUT/bench_bulk.log" 2>&1
    rc=$?
    echo "bench_bulk: rc=$rc, $(( $(date +%s) - t0 )) s"
    grep -a "B=1024" "$OUT/bench_bulk.log"
    cp bench/results/bulk.csv "$OUT/" 2>/dev/null
    [ $rc -eq 0 ] || backend=(--corpus-backend hf)
fi
work=/tmp/distill_work
mkdir -p "$work" && cp bench/data/corpus_eval_smollm2-135m-instruct.pt "$work/corpus_eval.pt"
timeout "${DISTILL_TIMEOUT:-440}" python3 -m bild_kernels.cli distill --device cuda --kind feature \
    --large "$BILD_LARGE" --init-draft bild_kernels/data/smollm2-135m-instruct-feature-draft "${backend[@]}" \
    --corpus-batch-size 1024 --no-feature-cache --work-dir "$work" --out /tmp/draft "$@" > "$OUT/distill.log" 2>&1
rc=$?
echo "distill: rc=$rc, $(( $(date +%s) - t0 )) s"
grep -a "^eval @\|held-out top-1\|^corpus: .*answers" "$OUT/distill.log"
[ -d /tmp/draft ] && tar czf "$OUT/draft.tgz" -C /tmp draft
exit $rc

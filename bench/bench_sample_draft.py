"""Benchmark sample_draft: one token per row of bf16 small-model logits, every usable backend.

GPU shapes: B in {1, 8, 64, 256}, V in {32000, 128256}; rows greedy, sampling (T = 0.8), sampling with
top-k 50 / top-p 0.9, or sampling with min-p 0.05. Bandwidth counts one read of the logits (the floor any
implementation pays); the speed-up is against the PyTorch reference ("ref"); "compile" is torch.compile of that reference;
"cuda+graph" and "triton+graph" time the kernels replayed from a CUDA graph (no Python or launch cost).
"flashinfer" (on a GPU, where `import flashinfer` works: `bash scripts/flashinfer_build.sh` makes a benchmark-only
install in .flashinfer/, to put on PYTHONPATH) times FlashInfer's own sampling from logits as its users call it:
`top_k_top_p_sampling_from_logits` (joint filter) for the top-k / top-p rows, `sampling_from_logits` for the
sampled ones, both at temperature 1 (its API takes none), eagerly (it draws from a torch.Generator); it has no
greedy op.
On a CPU (Triton under TRITON_INTERPRET=1) tiny shapes only show that the plumbing works.

    python bench/bench_sample_draft.py [--device cuda] [--backends triton,ref] [--no-save]
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import implementation, FUSED, HINTED, first_pass_of, flashinfer_sampling, parser, pick_shapes, runs_at, time_backend, usable_backends  # noqa: E402

from bild_kernels import reference as R  # noqa: E402

ROWS = {"greedy": (0.0, 0, 1.0, 0.0), "sample": (0.8, 0, 1.0, 0.0), "topk_topp": (0.8, 50, 0.9, 0.0),
        "min_p": (0.8, 0, 1.0, 0.05)}
# what an engine tells the CUDA op of these rows ("cuda-hinted": its `rows` argument, kRowsSampled = 1 |
# kRowsFiltered = 2); every other backend runs without it
HINTS = {"greedy": 0, "sample": 1, "topk_topp": 3, "min_p": 3}


def inputs(B, V, rows, device):
    temp, k, p, m = ROWS[rows]
    logits = (torch.randn(B, V, device=device) * 4).to(torch.bfloat16)
    f = lambda x, dt: torch.full((B,), x, dtype=dt, device=device)  # noqa: E731
    return (logits, f(temp, torch.float32), f(k, torch.int32), f(p, torch.float32),
            torch.arange(B, device=device, dtype=torch.int64), f(7, torch.int64), f(0.3, torch.float32),
            f(m, torch.float32))


def flashinfer_call(rows: str):
    """FlashInfer's call for these rows (see the module's docstring), or None (greedy rows; not importable)."""
    fs = flashinfer_sampling()
    if fs is None:
        return None
    if rows == "topk_topp":
        return lambda logits, temperature, top_k, top_p, *rest: fs.top_k_top_p_sampling_from_logits(
            logits, top_k, top_p, filter_apply_order="joint")
    if rows == "sample":
        return lambda logits, *rest: fs.sampling_from_logits(logits)
    return None


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    gpu = args.device == "cuda"
    shapes = pick_shapes(args, [(B, V) for V in (32000, 128256) for B in (1, 8, 64, 256)] if gpu
                         else [(1, 1000), (8, 1000), (1, 8192), (1, 49152)])
    modes = list(ROWS) if gpu else ["greedy", "topk_topp", "min_p"]
    iters = args.iters or (50 if gpu else 3)
    backends = usable_backends(args.device, args.backends, first_pass=True, cpu_kernel=True)
    backends.sort(key=lambda b: b != "ref")  # ref first: the others report their speed-up against it
    fns = {b: implementation("sample_draft", R.sample_draft_ref, b, args.device) for b in backends}
    if gpu and (args.backends is None or "flashinfer" in args.backends.split(",")) and flashinfer_call("sample"):
        backends.append("flashinfer")
    for B, V in shapes:
        for rows in modes:
            x = inputs(B, V, rows, args.device)
            base = None
            # (on a CPU the interpreted Triton kernels only at the small shapes: the default pair's are for ref/cpu)
            for b in [b for b in backends if runs_at(b, {"B": B, "V": V}) and (gpu or b != "triton" or V <= 1000)]:
                fn = functools.partial(fns[b], rows=HINTS[rows]) if b in (HINTED, FUSED) else fns.get(b)
                if b == "flashinfer" and (fn := flashinfer_call(rows)) is None:
                    continue
                base = time_backend("sample_draft", b, lambda: fn(*x), args,
                                    {"B": B, "V": V, "rows": rows, "dtype": "bf16"}, B * V * 2, base, gpu=gpu,
                                    iters=iters, context=lambda: first_pass_of(b))


if __name__ == "__main__":
    main()

"""Benchmark the small model's weight formats on a CPU: one decode step's matrix products (one row through
every projection of the shipped draft's shapes and its reduced head) in float32, bfloat16 and int8
(per-channel, weight-only, bf16 activations: what `Engine(small_weights="int8")` runs).

"warm" repeats the step, so the weights stay in the cache; "cold" first streams a buffer the size of the
large model (540 MB) through memory, as the large model's verification pass does between two draft steps
inside the engine. Bandwidth counts one read of the weights.

    python bench/bench_draft_weights.py [--threads 1] [--layers 4] [--hidden 576] [--intermediate 1536] [--head 8192] [--no-save]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import parser, record, timeit  # noqa: E402

from bild_kernels.models.llama import Int8Weight, _linear  # noqa: E402


def shapes(layers, hidden, intermediate, kv_width, head):
    """(out, in) of every projection of a Llama decode step: fused qkv, o, fused gate/up, down; then the head."""
    per_layer = [(hidden + 2 * kv_width, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate)]
    return per_layer * layers + [(head, hidden)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--kv-width", type=int, default=192, help="num_kv_heads * head_dim")
    p.add_argument("--head", type=int, default=8192, help="rows of the draft's head (its reduced vocabulary)")
    p.add_argument("--flush-mb", type=int, default=540, help="bytes streamed before a cold step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        raise SystemExit("bench_draft_weights measures the CPU weight formats (int8 weights are a CPU option)")
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g) * 0.02 for s in shapes(args.layers, args.hidden, args.intermediate,
                                                                   args.kv_width, args.head)]
    formats = {"float32": (weights, torch.float32),
               "bfloat16": ([w.bfloat16() for w in weights], torch.bfloat16),
               "int8": ([Int8Weight.of(w.bfloat16()) for w in weights], torch.bfloat16)}
    widths = [w.shape[1] for w in weights]
    flush = torch.zeros(args.flush_mb * 2**20 // 4)
    iters = args.iters or 30
    for name, (ws, act) in formats.items():
        x = torch.randn(1, max(args.hidden, args.intermediate), generator=g).to(act)
        step = lambda: [_linear(x[:, :k], w) for w, k in zip(ws, widths)]  # noqa: E731
        nbytes = sum((w.q.numel() + w.scale.numel() * 2) if isinstance(w, Int8Weight) else w.numel() * w.element_size()
                     for w in ws)
        for cache, setup in (("warm", None), ("cold", lambda: flush.add_(1.0))):
            stats = timeit(step, "cpu", warmup=3, iters=iters, setup=setup)
            record("draft_weights", "cpu", name, {"cache": cache, "threads": torch.get_num_threads(),
                                                  "layers": args.layers, "hidden": args.hidden,
                                                  "head": args.head, "MB": round(nbytes / 2**20, 1)},
                   stats, nbytes, save=not args.no_save)


if __name__ == "__main__":
    main()

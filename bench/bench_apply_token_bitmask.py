"""Benchmark apply_token_bitmask: structured output's grammar mask (-inf on the tokens it does not allow) on logits.

GPU shapes: B in {1, 8, 64, 256} rows of K+1 in {1, 5, 9} positions (a draft of K tokens) of bf16 logits, V in
{32000, 128256}, each position with its own mask: half the rows allow a random half of the vocabulary, a quarter allow
everything, a quarter a few dozen tokens (a grammar's kinds). Bandwidth counts one read and one write of the logits and
one read of the bitmask (V / 8 bytes a row); the speed-up is against the PyTorch reference ("ref"); "compile" is
torch.compile of that reference (at B = 64, V = 128256 only); "cuda+graph" and "triton+graph" time the kernels replayed
from a CUDA graph (no Python or launch cost). On a CPU (Triton under TRITON_INTERPRET=1, the CPU extension's kernel
where it is built) small shapes only show that the plumbing works.

    python bench/bench_apply_token_bitmask.py [--device cuda] [--backends triton,ref] [--shapes 64x5x128256] [--no-save]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import implementation, parser, pick_shapes, runs_at, time_backend, usable_backends  # noqa: E402

from bild_kernels import reference as R  # noqa: E402


def inputs(B, K1, V, device):
    g = torch.Generator().manual_seed(B + K1 + V)
    torch.manual_seed(B + K1 + V)
    logits = (torch.randn(B, K1, V, device=device) * 4).to(torch.bfloat16)
    allowed = torch.rand(B, K1, V, generator=g) < 0.5
    kind = torch.arange(B * K1).view(B, K1) % 4
    allowed[kind == 1] = True
    allowed[kind == 3] = torch.rand(int((kind == 3).sum()), V, generator=g) < 32 / V
    return [logits, R.pack_token_bitmask(allowed).to(device)]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    gpu = args.device == "cuda"
    shapes = pick_shapes(args, [(B, K1, V) for V in (32000, 128256) for K1 in (1, 5, 9) for B in (1, 8, 64, 256)]
                         if gpu else [(1, 3, 1000), (8, 5, 1000), (1, 5, 32000)])
    iters = args.iters or (50 if gpu else 3)
    backends = usable_backends(args.device, args.backends, cpu_kernel=True)
    backends.sort(key=lambda b: b != "ref")  # ref first: the others report their speed-up against it
    fns = {b: implementation("apply_token_bitmask", R.apply_token_bitmask_ref, b, args.device) for b in backends}
    for B, K1, V in shapes:
        x = inputs(B, K1, V, args.device)
        config = {"B": B, "K1": K1, "V": V, "dtype": "bf16"}
        moved = 2 * B * K1 * V * 2 + x[1].numel() * 4
        base = None
        # (on a CPU the interpreted Triton kernel only at the small vocabulary)
        for b in [b for b in backends if runs_at(b, config) and (gpu or b != "triton" or V <= 1000)]:
            base = time_backend("apply_token_bitmask", b, lambda: fns[b](*x), args, config, moved, base, gpu=gpu, iters=iters)


if __name__ == "__main__":
    main()

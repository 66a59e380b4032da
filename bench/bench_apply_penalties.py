"""Benchmark apply_penalties: a logit bias, repetition, presence, frequency and min_tokens on the large model's logits.

GPU shapes: B in {1, 8, 64, 256} rows of P in {1, 5, 9} positions (a draft of P - 1 tokens) of bf16 logits, V in
{32000, 128256}, each row with a history of L = 1024 committed tokens (a 768-token prompt, 256 of output), repetition
1.2, presence 0.5, frequency 0.3, two banned ids that min_tokens holds back on half the rows. Bandwidth counts one
read and one write of the logits (the floor any implementation pays; the histogram of B x V int32 comes on top); the
speed-up is against the PyTorch reference ("ref"); "compile" is torch.compile of that reference (at B = 64,
V = 128256 only); "cuda+graph" and "triton+graph" time the kernels replayed from a CUDA graph (no Python or launch
cost). On a CPU (Triton under TRITON_INTERPRET=1, the CPU extension's kernel where it is built) small shapes only
show that the plumbing works.

    python bench/bench_apply_penalties.py [--device cuda] [--backends triton,ref] [--shapes 64x5x128256] [--no-save]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import implementation, parser, pick_shapes, runs_at, time_backend, usable_backends  # noqa: E402

from bild_kernels import reference as R  # noqa: E402


def inputs(B, P, V, L, device):
    g = torch.Generator().manual_seed(B + P + V)
    torch.manual_seed(B + P + V)
    logits = (torch.randn(B, P, V, device=device) * 4).to(torch.bfloat16)
    token_ids = torch.randint(0, V, (B, L), generator=g)
    prompt_lens = torch.full((B,), L * 3 // 4, dtype=torch.int32)
    draft_ids = torch.randint(0, V, (B, P - 1), generator=g)
    f = lambda x: torch.full((B,), x, dtype=torch.float64)  # noqa: E731
    n_out = L - L * 3 // 4
    min_tokens = torch.where(torch.arange(B) % 2 == 0, n_out + P, 0).int()  # even rows hold the banned ids back
    banned_ids = torch.tensor([[2, V - 1]] * B)
    bias_ids = torch.stack([torch.randperm(V, generator=g)[:16] for _ in range(B)])  # a logit bias of 16 ids a row
    bias_values = torch.randn(B, 16, generator=g, dtype=torch.float64)
    return [logits] + [x.to(device) for x in (token_ids, prompt_lens, draft_ids, f(1.2), f(0.5), f(0.3), min_tokens,
                                   banned_ids, bias_ids, bias_values)]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    gpu = args.device == "cuda"
    shapes = pick_shapes(args, [(B, P, V) for V in (32000, 128256) for P in (1, 5, 9) for B in (1, 8, 64, 256)]
                         if gpu else [(1, 3, 1000), (8, 5, 1000), (1, 5, 32000)])
    L = 1024 if gpu else 64
    iters = args.iters or (50 if gpu else 3)
    backends = usable_backends(args.device, args.backends, cpu_kernel=True)
    backends.sort(key=lambda b: b != "ref")  # ref first: the others report their speed-up against it
    fns = {b: implementation("apply_penalties", R.apply_penalties_ref, b, args.device) for b in backends}
    for B, P, V in shapes:
        x = inputs(B, P, V, L, args.device)
        config = {"B": B, "P": P, "V": V, "L": L, "dtype": "bf16"}
        moved = 2 * B * P * V * 2
        base = None
        # (on a CPU the interpreted Triton kernels only at the small vocabulary)
        for b in [b for b in backends if runs_at(b, config) and (gpu or b != "triton" or V <= 1000)]:
            base = time_backend("apply_penalties", b, lambda: fns[b](*x), args, config, moved, base, gpu=gpu, iters=iters)


if __name__ == "__main__":
    main()

"""Host operations an engine pass runs around its model forward: what a GPU runs eagerly around its CUDA graphs.

On the H200 (bench/results/gpu_h200_2026-11-27b.md) a graphed LargeOnly step of the random Llama-1B pair kept
the GPU busy 35% of the time and a BiLD pass 22%: the host's work around the graphs (each eager op a kernel
launch, each tensor built from Python lists a host-to-device copy) is what a step waits on at batch 1. This
counts, on any device, the aten operations an engine run issues outside the forwards that the graphs replay
(StaticExtend's, the draft loop's decode step and its first update), per large-model pass, by operation and by engine line: the
census to shrink. Views and allocations are not counted (no kernel). On a CPU run every operation counts, also
the host's own building of tensors that a GPU run then sends over in one copy (no launch there): read the lines.

  python bench/census_step.py --policy large-only
  python bench/census_step.py --policy bild --lines 40
"""
from __future__ import annotations

import collections
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from bench_e2e import random_pair  # noqa: E402

from bild_kernels import BiLD, Engine, LargeOnly, SamplingParams  # noqa: E402
from bild_kernels.engine import draft_loop, static_extend  # noqa: E402

POLICIES = {"large-only": LargeOnly(), "bild": BiLD(fallback_threshold=0.5, rollback_threshold=3.0, max_draft_len=6)}
NO_KERNEL = {"detach", "detach_", "view", "_unsafe_view", "as_strided", "alias", "t", "select", "slice", "unsqueeze",
             "squeeze", "reshape", "expand", "lift_fresh", "empty", "empty_strided", "flatten", "_local_scalar_dense",
             "to", "resolve_conj", "resolve_neg", "is_nonzero"}  # views, allocations and dispatch-only composites


class _Census(TorchDispatchMode):
    def __init__(self, inside):
        super().__init__()
        self.inside, self.ops, self.lines = inside, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside[0] and name not in NO_KERNEL:
            self.ops[name] += 1
            mine = [f for f in traceback.extract_stack() if "/bild_kernels/" in f.filename]
            if mine:
                f = mine[-1]
                self.lines[f"{f.filename.split('bild_kernels/')[1]}:{f.lineno}  {(f.line or '').strip()[:80]}"] += 1
        return func(*args, **(kwargs or {}))


def _outside_counted(cls, method, inside):
    orig = getattr(cls, method)

    def wrapped(self, *a, **k):
        inside[0] += 1
        try:
            return orig(self, *a, **k)
        finally:
            inside[0] -= 1
    setattr(cls, method, wrapped)


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policy", default="large-only", choices=sorted(POLICIES))
    ap.add_argument("--pair", default="tiny")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--lines", type=int, default=25, help="engine lines listed")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    large, small = random_pair(args.pair, dtype, args.device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, large.config.vocab_size, (16,), generator=g).tolist()]
    eng = Engine(large=large, small=small, device=args.device, dtype=dtype, max_batch_size=1,
                 max_model_len=64 + args.tokens, block_size=16, draft_loop="static", extend_passes="static")
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    policy = POLICIES[args.policy]
    eng.generate(prompts, params, policy=policy)  # warm-up
    inside = [0]
    _outside_counted(static_extend.StaticExtend, "_forward", inside)
    _outside_counted(draft_loop.StaticDraftLoop, "_decode_step", inside)
    _outside_counted(draft_loop.StaticDraftLoop, "_update", inside)  # step 0's: a graph of its own on a GPU
    with torch.inference_mode(), _Census(inside) as census:
        outs = eng.generate(prompts, params, policy=policy)
    passes = max(o.metrics.large_passes for o in outs)
    total = sum(census.ops.values())
    print(f"{args.policy}, {args.device}: {total} operations outside the replayed forwards over {passes} large passes, "
          f"{total / passes:.1f} a pass")
    for name, n in census.ops.most_common(20):
        print(f"{n / passes:7.1f} a pass  {name}")
    print()
    for line, n in census.lines.most_common(args.lines):
        print(f"{n / passes:7.1f} a pass  {line}")


if __name__ == "__main__":
    main()

"""Where an engine step's time goes: torch.profiler over a few requests of one policy, the top host and device
operations, and the wall time per step beside the device's busy time per step.

On the H200 (2026-11-26) a graphed LargeOnly step of the random Llama-1B pair took 4.2 ms against ~0.5 ms to
read its weights: this says how much of a step is host work (Python, tensor set-up, synchronisations) and
how much the GPU is busy, and with what.

  python bench/profile_step.py --device cuda --pair llama-1b --policy large-only
  python bench/profile_step.py --pair tiny --policy bild --passes static      # CPU: the host side only
  python bench/profile_step.py --pair default --policy default --threads 1     # the default pair on a CPU
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from bench_e2e import PAIRS, random_pair  # noqa: E402

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams  # noqa: E402

POLICIES = {"large-only": LargeOnly(), "greedy": Greedy(max_draft_len=4),
            "bild": BiLD(fallback_threshold=0.5, rollback_threshold=3.0, max_draft_len=6)}


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pair", default="tiny", choices=sorted(PAIRS) + ["default"],
                    help="random Llama pairs, or the package's default pair (SmolLM2-135M-Instruct and its draft)")
    ap.add_argument("--policy", default="large-only", choices=sorted(POLICIES) + ["default"],
                    help="default: the draft's recommended policy (the default pair's BiLD)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--passes", default=None, choices=("graph", "static", "eager", "native"),
                    help="draft_loop and extend_passes (native: the CPU's draft_loop, eager passes; default: graph "
                         "on CUDA, native on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=25, help="operations listed per table")
    args = ap.parse_args()
    dev = args.device
    passes = args.passes or ("graph" if dev == "cuda" else "native")
    extend = "eager" if passes == "native" else passes
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if args.pair == "default":  # real prompts: the held-out set's first ones
        from bild_kernels.distill.corpus import chat_ids
        from bild_kernels.distill.prompts import held_out_prompts
        eng = Engine(device=dev, max_batch_size=args.batch, draft_loop=passes, extend_passes=extend)
        prompts = [chat_ids(eng.tokenizer, p) for p in held_out_prompts()[:args.batch]]
    else:
        large, small = random_pair(args.pair, dtype, dev)
        vocab = large.config.vocab_size
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(args.batch)]
        eng = Engine(large=large, small=small, device=dev, dtype=dtype, max_batch_size=args.batch,
                     max_model_len=64 + args.tokens, block_size=16, draft_loop=passes, extend_passes=extend)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    policy = eng.default_policy if args.policy == "default" else POLICIES[args.policy]
    with torch.inference_mode():
        eng.generate(prompts, params, policy=policy)  # warm-up: compilation, every bucket's graph captured
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            outs = eng.generate(prompts, params, policy=policy)
            wall = time.perf_counter() - t0
    steps = max(o.metrics.large_passes for o in outs)
    tokens = sum(o.metrics.generated_tokens for o in outs)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows))
    if dev == "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"device busy {busy_us / 1e3:.1f} ms of {wall * 1e3:.1f} ms wall ({100 * busy_us / 1e6 / wall:.0f}%)")
    print(f"{args.policy} ({passes}), batch {args.batch}: {tokens} tokens in {wall * 1e3:.1f} ms, {steps} large "
          f"passes a row, {wall / max(steps, 1) * 1e3:.2f} ms a pass (profiled: slower than unprofiled)")
    if dev == "cuda":  # unprofiled: the wall time a pass, and the host's time inside CUDAGraph.replay (the launch)
        replays, orig = [0, 0.0], torch.cuda.CUDAGraph.replay

        def timed(self):
            t = time.perf_counter()
            orig(self)
            replays[0] += 1
            replays[1] += time.perf_counter() - t
        torch.cuda.CUDAGraph.replay = timed
        try:
            with torch.inference_mode():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs = eng.generate(prompts, params, policy=policy)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
        finally:
            torch.cuda.CUDAGraph.replay = orig
        steps = max(o.metrics.large_passes for o in outs)
        print(f"unprofiled: {wall / max(steps, 1) * 1e3:.2f} ms a pass; {replays[0]} graph replays, "
              f"{replays[1] / max(replays[0], 1) * 1e6:.0f} us of host time each "
              f"({replays[1] / max(steps, 1) * 1e3:.2f} ms a pass)")


if __name__ == "__main__":
    main()

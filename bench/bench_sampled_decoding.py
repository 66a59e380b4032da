"""Sampled decoding with the default pair: speculative sampling (lossless at any temperature) against the large
model alone, one request at a time, the policies interleaved prompt by prompt so that a shared machine's drifting
speed slows them alike. Prints tokens/s, speed-up and acceptance; appends rows to
bench/results/sampled_decoding.csv.

  python bench/bench_sampled_decoding.py --prompts 16 --max-tokens 48 --temperature 0.8 --threads 1
  python bench/bench_sampled_decoding.py ... --reference-verify   # sample-mode verification on the reference
                                                                  # (the CPU path before csrc/cpu_sampling.cpp had it)
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import append_rows, device_name, git_rev  # noqa: E402

from bild_kernels import Engine, LargeOnly, SamplingParams, SpeculativeSampling  # noqa: E402
from bild_kernels import reference as R  # noqa: E402


def reference_verify_in_sample_mode() -> None:
    """Route sample-mode verify_draft calls on CPU tensors to the reference (the other modes keep the CPU kernel)."""
    from bild_kernels import _backend
    _backend._load_backends()
    impls = _backend._IMPLS["verify_draft"]
    kernel = impls["cpu"]

    def verify(draft_ids, target_logits, mode, *args, target_stats=None):
        if mode == R.MODE_SAMPLE:
            return R.verify_draft_ref(draft_ids, target_logits, mode, *args)
        return kernel(draft_ids, target_logits, mode, *args, target_stats=target_stats)
    impls["cpu"] = verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts (max 59)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--draft-lens", default="2,3", help="SpeculativeSampling(max_draft_len=k) for each k")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference-verify", action="store_true", help="sample-mode verification on the reference")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reference_verify:
        reference_verify_in_sample_mode()
    from bild_kernels.distill.corpus import chat_ids
    from bild_kernels.distill.prompts import held_out_prompts
    eng = Engine(device=args.device, max_batch_size=1)
    prompts = [chat_ids(eng.tokenizer, p) for p in held_out_prompts()[:args.prompts]]
    policies = {"large-only": LargeOnly()}
    policies.update({f"speculative-sampling({k})": SpeculativeSampling(max_draft_len=int(k))
                     for k in args.draft_lens.split(",")})
    eng.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=args.temperature, seed=1),
                 policy=policies[list(policies)[-1]])  # warm-up
    tot = {name: dict(seconds=0.0, tokens=0, accepted=0, drafted=0) for name in policies}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=i)
        for name, policy in policies.items():
            t0 = time.perf_counter()
            out = eng.generate([prompt], params, policy=policy)[0]
            t = tot[name]
            t["seconds"] += time.perf_counter() - t0
            t["tokens"] += len(out.token_ids)
            t["accepted"] += out.metrics.accepted_tokens
            t["drafted"] += out.metrics.drafted_tokens
    base = tot["large-only"]["tokens"] / tot["large-only"]["seconds"]
    rows = []
    for name, t in tot.items():
        tps = t["tokens"] / t["seconds"]
        acc = t["accepted"] / t["drafted"] if t["drafted"] else None
        print(f"{name:<26} {tps:6.1f} tokens/s  {tps / base:5.2f}x large-only"
              + (f"  acceptance {acc:.2f}" if acc is not None else ""), flush=True)
        rows.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "device": device_name(args.device), "rev": git_rev(), "policy": name,
                     "temperature": args.temperature, "prompts": len(prompts), "max_tokens": args.max_tokens,
                     "threads": torch.get_num_threads(), "reference_verify": args.reference_verify,
                     "tokens_per_s": round(tps, 2), "speedup": round(tps / base, 3),
                     "acceptance": "" if acc is None else round(acc, 3)})
    if not args.no_save:
        append_rows("sampled_decoding.csv", rows)


if __name__ == "__main__":
    main()

"""What SamplingParams' penalties cost speculative decoding on a pair: each policy's speed-up over LargeOnly() and its
drafts' acceptance, with and without penalties, the settings interleaved prompt by prompt in one process (this
machine's noise is a few percent). Penalties reshape the large model's distribution, the one every policy verifies
against, and the drafts are drafted from the small model's penalised distribution; what is left is how far the
penalised small model still agrees with the penalised large one. Usage:

    python python/tools/penalties_ab.py [--prompts 30] [--max-tokens 48] [--threads 2] [--large X --small Y]
"""
from __future__ import annotations

import argparse
import time

import torch

from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
from bild_kernels.distill.prompts import held_out_prompts

SETTINGS = {"none": {}, "repetition 1.2": dict(repetition_penalty=1.2), "frequency 0.5": dict(frequency_penalty=0.5),
            "presence 0.5 + min_tokens 32": dict(presence_penalty=0.5, min_tokens=32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=30, help="the first N held-out prompts")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--large", default=None)
    ap.add_argument("--small", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eng = Engine(large=args.large, small=args.small) if args.large else Engine()
    policies = {"LargeOnly()": LargeOnly(), "Greedy(2)": Greedy(max_draft_len=2), "default BiLD": None}
    prompts = held_out_prompts()[:args.prompts]
    eng.generate(prompts[:1], SamplingParams(max_tokens=8), chat_template=True)  # warm-up
    total = {(s, p): [0, 0.0, 0, 0] for s in SETTINGS for p in policies}
    for prompt in prompts:
        for s, kw in SETTINGS.items():
            for name, pol in policies.items():
                t = time.perf_counter()
                o = eng.generate([prompt], SamplingParams(max_tokens=args.max_tokens, **kw), policy=pol,
                                 chat_template=True)[0]
                row = total[s, name]
                row[0] += len(o.token_ids)
                row[1] += time.perf_counter() - t
                row[2] += o.metrics.drafted_tokens
                row[3] += o.metrics.accepted_tokens
    print(f"{len(prompts)} held-out prompts, {args.max_tokens} tokens, batch 1, {args.threads} threads")
    print("| penalties | policy | tokens/s | speed-up | acceptance |\n|---|---|---|---|---|")
    for s in SETTINGS:
        base = total[s, "LargeOnly()"][0] / total[s, "LargeOnly()"][1]
        for name in policies:
            n, dt, drafted, accepted = total[s, name]
            acc = f"{accepted / drafted:.3f}" if drafted else "-"
            print(f"| {s} | {name} | {n / dt:.1f} | {n / dt / base:.3f}x | {acc} |")


if __name__ == "__main__":
    main()

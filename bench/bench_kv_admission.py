"""KV admission: a pool too small for every request's worst case, served by reserving each request's worst case
(`Engine(kv_admission="reserve")`) or by admitting on what the next step needs and preempting the newest request when
the pool runs short (`"preempt"`, the default; its KV swapped out and back, or recomputed: `preemption`), side by side
in one run.

Chat requests ask for up to `--max-tokens` tokens but most answers end well before (at the model's end of sequence);
the pool holds `--pool-requests` worst cases. Per setting: tokens/s over the whole batch, the largest and mean number
of requests stepped together, preemptions, and whether every request's tokens equal those of the first setting (on
the default pair's CPU kernels a recomputed row holds the same bits: `LlamaExecutor.rows_independent`). Rows go to
bench/results/kv_admission.csv.

  python bench/bench_kv_admission.py --threads 2 --repeat 2              # the default pair, 16 held-out prompts
  python bench/bench_kv_admission.py --pair tiny --max-tokens 64 --prompts 12 --no-save
"""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import append_rows, device_name, engine_args, engine_parser, git_rev  # noqa: E402
from bench_e2e import random_pair  # noqa: E402

from bild_kernels import Engine, LargeOnly, SamplingParams  # noqa: E402

MODES = ("reserve", "preempt-swap", "preempt-recompute")  # kv_admission, and the preemption of "preempt"


def _engine(args, mode: str, device: str) -> tuple[Engine, list[list[int]]]:
    admission, _, preemption = mode.partition("-")
    kw = dict(device=device, max_batch_size=args.batch, max_model_len=args.max_model_len, kv_admission=admission,
              preemption=preemption or "auto",
              prefix_cache=0)  # (no reuse of one run's prompts by the next to blur the comparison)
    if args.pair == "default":
        from bild_kernels.cli.evaluation import _eval_prompts
        probe = Engine(**kw)
        prompts = _eval_prompts(probe, args.prompts)
        worst = max(probe._worst_blocks(_probe_seq(p, args), probe.default_policy) for p in prompts)
        return Engine(**kw, kv_cache_blocks=worst * args.pool_requests), prompts
    large, small = random_pair(args.pair, torch.float32, device)
    large.config.eos_token_id = small.config.eos_token_id = args.eos
    vocab = large.config.vocab_size
    prompts = [[(7 * i + 5 * j + 3) % vocab for j in range(4 + i % 9)] for i in range(args.prompts)]
    probe = Engine(large=large, small=small, dtype=torch.float32, **kw)
    worst = max(probe._worst_blocks(_probe_seq(p, args), LargeOnly()) for p in prompts)
    return Engine(large=large, small=small, dtype=torch.float32, kv_cache_blocks=worst * args.pool_requests,
                  **kw), prompts


def _probe_seq(prompt, args):
    from bild_kernels.engine.sequence import Sequence
    return Sequence(0, prompt, SamplingParams(max_tokens=args.max_tokens))


def run_one(args, mode: str, device: str, policy) -> tuple[dict, list[list[int]]]:
    eng, prompts = _engine(args, mode, device)
    policy = eng.default_policy if policy == "default" else policy
    eng.generate(prompts[:1], SamplingParams(max_tokens=4), policy=policy)  # warm-up
    sizes, step = [], eng._step
    eng._step = lambda running, pol: sizes.append(len(running)) or step(running, pol)
    t0 = time.perf_counter()
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=i)
              for i in range(len(prompts))]
    outs = eng.generate(prompts, params, policy=policy)
    wall = time.perf_counter() - t0
    errors = [o.error for o in outs if o.error]
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    tokens = sum(len(o.token_ids) for o in outs)
    row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(device), "rev": git_rev(), "pair": args.pair, "policy": policy.name,
           "kv_admission": mode, "kv_cache_blocks": eng.kv_cache_blocks, "block_size": eng.block_size,
           "max_batch_size": args.batch, "prompts": len(prompts), "max_tokens": args.max_tokens,
           "temperature": args.temperature,
           "tokens": tokens, "mean_tokens": round(tokens / len(outs), 1),
           "ended_by_eos": sum(o.finish_reason == "eos" for o in outs), "wall_s": round(wall, 3),
           "tokens_per_s": round(tokens / wall, 2), "max_running": max(sizes),
           "mean_running": round(sum(sizes) / len(sizes), 2), "steps": len(sizes),
           "preemptions": sum(o.metrics.preemptions for o in outs)}
    return row, [o.token_ids for o in outs]


def main():
    ap = engine_parser(__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="requests sent together (the default pair: held-out "
                                                            "chat prompts)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="the engine's max_batch_size")
    ap.add_argument("--pool-requests", type=int, default=2, help="the pool holds this many worst cases")
    ap.add_argument("--policy", default="large-only", choices=("large-only", "default"),
                    help="large-only, or the engine's default policy (the default pair's BiLD)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (request i: seed i)")
    ap.add_argument("--eos", type=int, default=None, help="random pairs: an end-of-sequence id their answers stop at "
                                                          "(default: none; every answer runs to --max-tokens)")
    args = engine_args(ap)
    policy = LargeOnly() if args.policy == "large-only" else "default"
    rows, first = [], None
    for _ in range(args.repeat):
        for mode in MODES:
            row, tokens = run_one(args, mode, args.device, policy)
            first = tokens if first is None else first
            row["same_tokens"] = sum(a == b for a, b in zip(tokens, first))
            rows.append(row)
            print(row, flush=True)
    best = {m: max(r["tokens_per_s"] for r in rows if r["kv_admission"] == m) for m in MODES}
    for m in MODES[1:]:
        print(f"{m} / reserve: {best[m] / best['reserve']:.2f}x tokens/s ({best[m]:.1f} against {best['reserve']:.1f})")
    print(f"the same tokens in {min(r['same_tokens'] for r in rows)} of {rows[0]['prompts']} requests")
    if not args.no_save:
        print(f"rows appended to {append_rows('kv_admission.csv', rows)}")


if __name__ == "__main__":
    main()

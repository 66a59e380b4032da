"""Chunked prefill: how long a running stream stalls while a long prompt arrives, prefilled whole or a chunk a step
(`Engine(prefill_chunk=...)`), side by side in one run.

A short request streams; once it has committed `--warm` runs of tokens, a second thread sends a long prompt. Per chunk
setting: the stream's largest gap between two of its chunks after the long prompt arrived (what a user of the running
request sees stall), its median gap, the long request's time to first token, and the whole run's wall time. Rows go
to bench/results/prefill_chunks.csv.

  python bench/bench_prefill_chunks.py --chunks 128,256,512,0 --repeat 2  # the default pair, 1,500-token prompt
  python bench/bench_prefill_chunks.py --pair tiny --prompt-tokens 200 --chunks 32,0 --decode-tokens 24
"""
from __future__ import annotations

import datetime
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import append_rows, device_name, engine_args, engine_parser, git_rev  # noqa: E402
from bench_e2e import random_pair  # noqa: E402

from bild_kernels import BiLD, Engine, LargeOnly, SamplingParams  # noqa: E402

PARAGRAPH = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion of the "
             "costs of the new library, the members agreed to postpone the vote until the engineers had finished "
             "their survey of the old building and its foundations. ")


def _engine(args, chunk: int, device: str):
    kw = dict(device=device, max_batch_size=2, max_model_len=args.prompt_tokens + 2 * args.decode_tokens + 64,
              prefill_chunk=chunk or None)
    if args.pair == "default":
        eng = Engine(**kw, prefix_cache=0)  # (each run's prompts are new: no reuse to blur the prefill's cost)
        long = eng.tokenize(PARAGRAPH * (args.prompt_tokens // 40 + 1))[:args.prompt_tokens]
        short = eng.tokenize("Write a short poem about the sea.")
        return eng, short, long
    large, small = random_pair(args.pair, torch.float32, device)
    eng = Engine(large=large, small=small, dtype=torch.float32, **kw)
    vocab = large.config.vocab_size
    return eng, [(7 * i + 3) % vocab for i in range(8)], [(5 * i + 1) % vocab for i in range(args.prompt_tokens)]


def run_one(args, chunk: int, device: str, policy) -> dict:
    eng, short, long = _engine(args, chunk, device)
    params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    eng.generate([short], SamplingParams(max_tokens=4, ignore_eos=True), policy=policy)  # warm-up
    arrivals, result, arrived = [], {}, None

    def send_long():
        result["out"] = eng.generate([long], SamplingParams(max_tokens=4, ignore_eos=True), policy=policy)[0]

    t0 = time.perf_counter()
    sender = threading.Thread(target=send_long)
    for i, _ in enumerate(eng.stream(short, params, policy=policy)):
        arrivals.append(time.perf_counter())
        if i + 1 == args.warm:
            arrived = time.perf_counter()
            sender.start()
    sender.join()
    wall = time.perf_counter() - t0
    after = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > arrived]
    m = result["out"].metrics
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "rev": git_rev(), "pair": args.pair, "policy": policy.name,
            "prompt_tokens": len(long), "prefill_chunk": chunk, "chunks": m.prefill_chunks,
            "max_gap_ms": round(1e3 * max(after), 2) if after else 0.0,
            "median_gap_ms": round(1e3 * statistics.median(after), 2) if after else 0.0,
            "long_ttft_ms": round(1e3 * (m.first_token_time - m.start_time), 2), "wall_s": round(wall, 3)}


def main():
    ap = engine_parser(__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--chunks", default="512,0", help="prefill_chunk settings, comma-separated (0: whole prompts)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="the running stream's tokens")
    ap.add_argument("--warm", type=int, default=4, help="stream chunks before the long prompt is sent")
    ap.add_argument("--policy", default="large-only", choices=("large-only", "bild"))
    args = engine_args(ap)
    chunks = [int(c) for c in args.chunks.split(",")]
    if args.policy == "large-only":
        policy = LargeOnly()
    elif args.pair == "default":  # the default pair's recommended BiLD (what Engine().generate uses)
        from bild_kernels.engine.engine import _recommended_policy
        from bild_kernels.models.default import default_small
        policy = _recommended_policy(default_small())
    else:
        policy = BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4)
    rows = []
    for _ in range(args.repeat):
        for chunk in chunks:
            rows.append(run_one(args, chunk, args.device, policy))
            print(rows[-1], flush=True)
    by = {c: [r for r in rows if r["prefill_chunk"] == c] for c in chunks}
    if 0 in by and len(by) > 1:
        base = min(r["max_gap_ms"] for r in by[0])
        for c, rs in by.items():
            if c:
                best = min(r["max_gap_ms"] for r in rs)
                print(f"prefill_chunk {c}: the running stream's largest gap {best:.1f} ms against {base:.1f} ms whole "
                      f"({base / best:.2f}x shorter); long request's TTFT "
                      f"{min(r['long_ttft_ms'] for r in rs):.1f} against "
                      f"{min(r['long_ttft_ms'] for r in by[0]):.1f} ms")
    if not args.no_save:
        print(f"rows appended to {append_rows('prefill_chunks.csv', rows)}")


if __name__ == "__main__":
    main()

"""Bounded soak of the engine on a tiny pair: many threads, >= 10,000 requests, a small KV pool.

    python python/soak.py                          # 10,000 requests, 8 threads, a few minutes on a CPU
    python python/soak.py --requests 500 --window 100

Threads draw requests from a pool of distinct ones (every policy; greedy and seeded sampling) whose
outputs alone are computed first. Most are generated or streamed to the end and must equal their
output alone; some streams are abandoned after the first chunk, some cancelled from the thread, some
get a deadline too short to finish (their tokens must be a prefix of the output alone). Per window of
requests: throughput and the process's RSS. At the end: every block free, the pool's invariants, RSS
growth after the first window, and the last window's throughput against the first's. Figures are
printed and appended to bench/results/soak_<date>.csv; exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import dated, run_info, write_csv  # noqa: E402

from bild_kernels import (BiLD, Engine, Greedy, Jacobi, LargeOnly, SamplingParams, ShallowDeep,  # noqa: E402
                          SpeculativeSampling)

POLICIES = [LargeOnly(), Greedy(max_draft_len=4), BiLD(fallback_threshold=0.5, rollback_threshold=0.0),
            BiLD(fallback_threshold=0.4, rollback_threshold=2.0, max_draft_len=5), SpeculativeSampling(max_draft_len=3),
            Jacobi(block_size=4), ShallowDeep(exit_layer=2)]


def request_pool(n: int, seed: int, max_tokens: int):
    rng = random.Random(seed)
    pool = []
    for i in range(n):
        policy = POLICIES[i % len(POLICIES)]
        sample = policy.name in ("large-only", "bild", "speculative-sampling") and rng.random() < 0.5
        params = SamplingParams(max_tokens=rng.randint(1, max_tokens), temperature=0.8 if sample else 0.0,
                                seed=rng.randrange(10**6))
        pool.append(([rng.randrange(97) for _ in range(rng.randint(1, 10))], params, policy))
    return pool


def run_soak(engine: Engine, *, requests: int, threads: int, window: int, pool_size: int = 64, seed: int = 0,
             max_tokens: int = 12, log=print) -> dict:
    pool = request_pool(pool_size, seed, max_tokens)
    alone = [engine.generate([p], s, policy=pol)[0].token_ids for p, s, pol in pool]
    proc = psutil.Process()
    lock = threading.Lock()
    state = {"issued": 0, "done": 0, "tokens": 0, "mismatches": [], "errors": [], "kinds": {}, "preemptions": 0}
    windows: list[dict] = []
    t_start = time.perf_counter()
    mark = {"t": t_start, "tokens": 0}

    def finish(kind: str, toks: int, out=None) -> None:
        with lock:
            state["done"] += 1
            state["preemptions"] += out.metrics.preemptions if out is not None else 0
            state["tokens"] += toks
            state["kinds"][kind] = state["kinds"].get(kind, 0) + 1
            if state["done"] % window == 0:
                now = time.perf_counter()
                free = min(r.num_free_blocks() for r in engine.runners.values())
                w = {"window": len(windows) + 1, "requests_done": state["done"], "elapsed_s": round(now - t_start, 2),
                     "req_per_s": round(window / (now - mark["t"]), 1),
                     "tokens_per_s": round((state["tokens"] - mark["tokens"]) / (now - mark["t"]), 1),
                     "rss_mb": round(proc.memory_info().rss / 2**20, 1), "free_blocks_now": free}
                windows.append(w)
                mark["t"], mark["tokens"] = now, state["tokens"]
                log(" ".join(f"{k}={v}" for k, v in w.items()))

    def check(k: int, got: list[int], exact: bool, what: str) -> None:
        ok = got == alone[k] if exact else got == alone[k][:len(got)]
        if not ok:
            with lock:
                state["mismatches"].append(f"{what} pool[{k}]: {got} vs alone {alone[k]}")

    def worker(wid: int) -> None:
        rng = random.Random(seed * 1000 + wid)
        while True:
            with lock:
                if state["issued"] >= requests:
                    return
                state["issued"] += 1
            k = rng.randrange(pool_size)
            prompt, params, policy = pool[k]
            r = rng.random()
            try:
                if r < 0.6:
                    out = engine.generate([prompt], params, policy=policy)[0]
                    check(k, out.token_ids, True, "generate")
                    finish("generate", len(out.token_ids), out)
                elif r < 0.85:
                    chunks = list(engine.stream(prompt, params, policy=policy))
                    toks = sum((c.token_ids for c in chunks), [])
                    check(k, toks, True, "stream")
                    finish("stream", len(toks), chunks[-1].output)
                elif r < 0.92:  # abandoned after its first chunk
                    it = engine.stream(prompt, params, policy=policy)
                    toks = next(it).token_ids
                    it.close()
                    check(k, toks, False, "abandoned")
                    finish("abandoned", len(toks))
                else:  # a deadline that may or may not be met
                    p = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, seed=params.seed,
                                       timeout_s=rng.choice([1e-4, 2e-3, 1e-2]))
                    out = engine.generate([prompt], p, policy=policy)[0]
                    check(k, out.token_ids, out.finish_reason != "timeout", "deadline")
                    finish("deadline-" + out.finish_reason, len(out.token_ids), out)
            except Exception as e:
                with lock:
                    state["errors"].append(f"{type(e).__name__}: {e}")
                finish("exception", 0)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t_start
    sched = engine._scheduler
    leaked = sum(engine.kv_cache_blocks - r.num_free_blocks() for r in engine.runners.values())
    invariants = "ok"
    try:
        for r in engine.runners.values():
            r.check_invariants()
    except AssertionError as e:
        invariants = str(e)
    full = windows[1:] if len(windows) > 2 else windows
    rss_growth = full[-1]["rss_mb"] - full[0]["rss_mb"] if full else 0.0
    tput_ratio = full[-1]["req_per_s"] / full[0]["req_per_s"] if full else 1.0
    summary = {"requests": state["done"], "threads": threads, "wall_s": round(wall, 1),
               "req_per_s": round(state["done"] / wall, 1), "tokens_per_s": round(state["tokens"] / wall, 1),
               "mismatches": len(state["mismatches"]), "exceptions": len(state["errors"]), "leaked_blocks": leaked,
               "preemptions": state["preemptions"],
               "in_flight_at_end": len(sched.running) + len(sched.waiting), "invariants": invariants,
               "rss_first_mb": full[0]["rss_mb"] if full else None, "rss_last_mb": full[-1]["rss_mb"] if full else None,
               "rss_growth_mb": round(rss_growth, 1), "throughput_last_over_first": round(tput_ratio, 2),
               "kinds": " ".join(f"{k}:{v}" for k, v in sorted(state["kinds"].items()))}
    failed = [name for name, bad in (("mismatches", summary["mismatches"]), ("exceptions", summary["exceptions"]),
                                     ("leaked blocks", leaked), ("requests in flight", summary["in_flight_at_end"]),
                                     ("invariants", invariants != "ok"), ("memory growth", rss_growth > 64),
                                     ("throughput drop", tput_ratio < 0.5)) if bad]
    return {"summary": summary, "windows": windows, "failed": failed,
            "details": state["mismatches"][:5] + state["errors"][:5]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--kv-cache-blocks", type=int, default=40, help="a small pool: requests wait for blocks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="CSV (default bench/results/soak_<date>.csv)")
    args = ap.parse_args(argv)
    from tiny_pair import tiny_models
    dtype = getattr(torch, args.dtype)
    large, small = tiny_models(dtype)
    engine = Engine(large=large, small=small, dtype=dtype, max_batch_size=8, max_model_len=64, block_size=4,
                    kv_cache_blocks=args.kv_cache_blocks)
    res = run_soak(engine, requests=args.requests, threads=args.threads, window=args.window, seed=args.seed)
    print(" ".join(f"{k}={v}" for k, v in res["summary"].items()))
    for d in res["details"]:
        print("DETAIL", d, file=sys.stderr)
    info = run_info() | {"dtype": args.dtype, "kv_cache_blocks": args.kv_cache_blocks}
    rows = [info | {"row": f"window {w['window']}"} | w for w in res["windows"]]
    rows.append(info | {"row": "summary"} | {k: v for k, v in res["summary"].items()})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    path = write_csv(args.out or dated("soak"), [{k: r.get(k, "") for k in keys} for r in rows])
    print(f"wrote {path}" + (f"; FAILED: {', '.join(res['failed'])}" if res["failed"] else "; all checks passed"),
          file=sys.stderr)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Priorities: an interactive request arriving while a batch job fills every batch row, sent at the job's priority
(first come, first served) or at an earlier one (`SamplingParams(priority=...)`, which preempts a job request to get
in), side by side in one run.

`--background` requests of priority 10 start together and fill the engine's `--batch` rows (the rest wait); once
they stream, the interactive request arrives. Per setting: its time to first token and its whole latency, the
batch job's tokens/s, and the preemptions. Rows go to bench/results/priority.csv.

  python bench/bench_priority.py --threads 2 --repeat 2            # the default pair, held-out chat prompts
  python bench/bench_priority.py --pair tiny --background 6 --batch 2 --max-tokens 32 --no-save
"""
from __future__ import annotations

import datetime
import sys
import threading
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import append_rows, device_name, engine_args, engine_parser, git_rev  # noqa: E402
from bench_e2e import random_pair  # noqa: E402

from bild_kernels import Engine, LargeOnly, SamplingParams  # noqa: E402

JOB_PRIORITY = 10


def _engine(args, device: str) -> tuple[Engine, list[list[int]], list[int]]:
    kw = dict(device=device, max_batch_size=args.batch, max_model_len=args.max_tokens + 256, prefix_cache=0)
    if args.pair == "default":
        from bild_kernels.cli.evaluation import _eval_prompts
        eng = Engine(**kw)
        prompts = _eval_prompts(eng, args.background + 1)
        return eng, prompts[1:], prompts[0]
    large, small = random_pair(args.pair, torch.float32, device)
    vocab = large.config.vocab_size
    eng = Engine(large=large, small=small, dtype=torch.float32, **kw)
    return eng, [[(7 * i + 5 * j + 3) % vocab for j in range(6 + i % 5)] for i in range(args.background)], [1, 2, 3]


def run_one(args, eng, job, probe, priority: int, policy) -> dict:
    done = []
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, priority=JOB_PRIORITY)
    t0 = time.perf_counter()
    it = eng.stream(job[0], params, policy=policy)  # one job request streamed here: it keeps the engine stepping
    chunks = [next(it)]
    others = threading.Thread(target=lambda: done.append(eng.generate(job[1:], params, policy=policy)))
    others.start()
    while not chunks[-1].finished and eng.load()["running"] < min(args.batch, len(job)):
        chunks.append(next(it))  # until the job runs in every row
    box = []
    sent = time.perf_counter()
    asker = threading.Thread(target=lambda: box.append(eng.generate(
        [probe], SamplingParams(max_tokens=args.probe_tokens, ignore_eos=True, priority=priority), policy=policy)[0]))
    asker.start()
    chunks += list(it)
    asker.join()
    others.join()
    wall = time.perf_counter() - t0
    outs = [chunks[-1].output, *done[0]]
    probe_out = box[0]
    m = probe_out.metrics
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(args.device), "rev": git_rev(), "pair": args.pair, "policy": policy.name,
            "batch": args.batch, "background": args.background, "max_tokens": args.max_tokens,
            "probe_priority": priority, "job_priority": JOB_PRIORITY,
            "probe_ttft_ms": round(1e3 * (m.first_token_time - sent), 1),
            "probe_latency_ms": round(1e3 * (m.end_time - sent), 1), "probe_tokens": len(probe_out.token_ids),
            "job_tokens_per_s": round(sum(len(o.token_ids) for o in outs) / wall, 2),
            "preemptions": sum(o.metrics.preemptions for o in outs) + m.preemptions}


def main():
    ap = engine_parser(__doc__.splitlines()[0])
    ap.add_argument("--background", type=int, default=8, help="the batch job's requests")
    ap.add_argument("--batch", type=int, default=4, help="the engine's max_batch_size")
    ap.add_argument("--max-tokens", type=int, default=128, help="each job request's tokens")
    ap.add_argument("--probe-tokens", type=int, default=32, help="the interactive request's tokens")
    ap.add_argument("--policy", default="large-only", choices=("large-only", "default"))
    args = engine_args(ap)
    eng, job, probe = _engine(args, args.device)
    policy = LargeOnly() if args.policy == "large-only" else eng.default_policy
    eng.generate([probe], SamplingParams(max_tokens=4), policy=policy)  # warm-up
    rows = []
    for _ in range(args.repeat):
        for priority in (JOB_PRIORITY, 0):
            rows.append(run_one(args, eng, job, probe, priority, policy))
            print(rows[-1], flush=True)
    best = {p: min(r["probe_ttft_ms"] for r in rows if r["probe_priority"] == p) for p in (JOB_PRIORITY, 0)}
    lat = {p: min(r["probe_latency_ms"] for r in rows if r["probe_priority"] == p) for p in (JOB_PRIORITY, 0)}
    print(f"the interactive request at priority 0 against the job's {JOB_PRIORITY}: time to first token "
          f"{best[0]:.0f} against {best[JOB_PRIORITY]:.0f} ms ({best[JOB_PRIORITY] / best[0]:.1f}x sooner), latency "
          f"{lat[0]:.0f} against {lat[JOB_PRIORITY]:.0f} ms")
    if not args.no_save:
        print(f"rows appended to {append_rows('priority.csv', rows)}")


if __name__ == "__main__":
    main()

"""Offline batch generation, tokens/s: bild's BatchGenerator (a host-free decode loop, CUDA graphs on a GPU) beside
transformers' `generate` on the same model and prompts, in one run. What `bild distill` writes its corpus with.

On the H200 (2026-11-26b) `generate` wrote the distillation corpus of SmolLM2-135M-Instruct at 18.6k tokens/s in
batches of 768 (7.7k in batches of 256): ~40 ms a decode step whatever the batch, i.e. host-bound.

  python bench/bench_bulk.py --model default --batch-sizes 256,768          # the default large model (GGUF)
  python bench/bench_bulk.py --model default --large "$BILD_LARGE" ...      # its carried copy on a GPU machine
  python bench/bench_bulk.py --model tiny --batch-sizes 8 --tokens 32       # a random Llama, CPU-sized
"""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import append_rows, device_name, git_rev  # noqa: E402
from bench_e2e import random_pair  # noqa: E402

from bild_kernels.distill.corpus import hf_answers  # noqa: E402
from bild_kernels.engine.bulk import BatchGenerator  # noqa: E402


def _model(name: str, dtype, device: str, large=None):
    """(HF model on the device, its vocabulary size, stop ids, prompts' source)."""
    if name == "default":
        from bild_kernels.distill.pipeline import _teacher
        model, tok, _ = _teacher(large)
        stops = sorted({tok.eos_token_id, tok.pad_token_id} - {None})
        return model.to(device, dtype), model.config.vocab_size, stops, tok
    large, _ = random_pair(name, dtype, device)
    return large, large.config.vocab_size, [], None


def _prompts(n: int, vocab: int, tok) -> list[list[int]]:
    if tok is not None:  # real chat prompts: the templated training prompts
        from bild_kernels.distill.corpus import chat_ids
        from bild_kernels.distill.prompts import all_train_prompts
        return [chat_ids(tok, p) for p in all_train_prompts(n)]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (int(k),), generator=g).tolist()
            for k in torch.randint(16, 64, (n,), generator=g)]


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="tiny", choices=("default", "tiny", "llama-1b"),
                    help="default: SmolLM2-135M-Instruct (the package's large model); else a random Llama")
    ap.add_argument("--large", default=None, help="--model default: this GGUF or model directory instead of the "
                                                   "package's (a GPU machine's carried copy)")
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per answer (at most)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--backends", default="bild,hf")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model, vocab, stops, tok = _model(args.model, dtype, dev, args.large)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    backends = args.backends.split(",")
    pad = stops[0] if stops else 0
    rows, rev, where = [], git_rev(), device_name(dev)
    for B in sizes:
        prompts = _prompts(B, vocab, tok)
        max_len = max(map(len, prompts)) + args.tokens
        gen = BatchGenerator(model, device=dev, dtype=dtype, max_batch_size=B, max_model_len=max_len) \
            if "bild" in backends else None
        rate = {}
        for backend in backends:
            def once():
                if backend == "bild":
                    return gen.generate(prompts, max_new_tokens=args.tokens, temperature=args.temperature,
                                        stop_ids=stops)
                torch.manual_seed(0)
                return hf_answers(model, prompts, max_new_tokens=args.tokens, temperature=args.temperature,
                                  pad=pad, stops=stops)
            once()  # warm-up: graphs recorded, kernels compiled
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            answers = once()
            if dev == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            n = sum(len(a) for a in answers)
            rate[backend] = n / sec
            print(f"{args.model:9s} B={B:<4d} {backend + ':':5s} {n:7d} tokens in {sec:7.2f} s, {n / sec:9.0f} tokens/s, "
                  f"{sec / args.tokens * 1e3:7.2f} ms a step" + (
                      f", {rate[backend] / rate['hf']:.2f}x hf" if backend != "hf" and "hf" in rate else ""),
                  flush=True)
            rows.append({"model": args.model, "batch": B, "new_tokens": args.tokens, "temperature": args.temperature,
                         "backend": backend, "tokens": n, "seconds": round(sec, 3), "tokens_per_s": round(n / sec, 1)})
        if "bild" in rate and "hf" in rate:
            print(f"{args.model:9s} B={B:<4d} bild / hf: {rate['bild'] / rate['hf']:.2f}x")
    if not args.no_save:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        path = append_rows("bulk.csv", [{"time": now, "device": where, "rev": rev, **r} for r in rows])
        print(f"rows appended to {path}")


if __name__ == "__main__":
    main()

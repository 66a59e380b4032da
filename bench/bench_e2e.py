"""End-to-end: every policy vs LargeOnly on the same executor vs Hugging Face generate and assisted
generation (and HF prompt lookup beside NGram), at batch 1 and at batch sizes HF assisted generation cannot do.

Reports tokens/s, speed-up over LargeOnly measured in the same run, acceptance rate, mean accepted
length, and the time split between drafting, verifying and the engine's own overhead.

  python bench/bench_e2e.py --pair tiny             # random tiny Llama pair (CPU-sized)
  python bench/bench_e2e.py --pair llama-1b          # random weights at Llama shapes (for a GPU)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import device_name, git_rev, parser, RESULTS  # noqa: E402

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, NGram, SamplingParams, SpeculativeSampling  # noqa: E402
from bild_kernels.hf import hf_generate  # noqa: E402

PAIRS = {
    # (large layers, small layers, hidden, heads, kv heads, intermediate, vocab)
    "tiny": (8, 2, 256, 8, 4, 768, 4096),
    "llama-1b": (16, 2, 2048, 32, 8, 8192, 32000),
}


def random_pair(name: str, dtype, device, depth_scale: float = 0.05):
    """A random large Llama and a draft made of its first layers, agreeing often as a distilled one would: the
    deep layers' output projections are scaled by `depth_scale`, so they refine the stream instead of
    rewriting it. Top-1 agreement of the draft with the large model's greedy continuations of random
    prompts (float32, teacher-forced): llama-1b 0.14 at scale 0.2, 0.74 at 0.05, 0.89 at 0.02; tiny 0.32,
    0.77 at 0.2, 0.05 (peak probabilities 0.7-0.9 from the head scaled by 30)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    L, S, hidden, heads, kv, inter, vocab = PAIRS[name]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=L,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    large = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        large.lm_head.weight.mul_(30.0)  # peaked distributions, like a trained model's
        for layer in large.model.layers[S:]:  # deep layers refine rather than rewrite: drafts agree often
            layer.self_attn.o_proj.weight.mul_(depth_scale)
            layer.mlp.down_proj.weight.mul_(depth_scale)
    scfg = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": S})
    small = LlamaForCausalLM(scfg).to(dtype).eval()
    small.load_state_dict(large.state_dict(), strict=False)
    return large.to(device), small.to(device)


def main():
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--pair", default="tiny", choices=sorted(PAIRS))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--depth-scale", type=float, default=0.05,
                    help="scale of the large model's deep layers' output projections: sets how often the draft "
                         "agrees (llama-1b: 0.2 -> 14%%, 0.05 -> 74%%, 0.02 -> 89%%)")
    ap.add_argument("--draft-loops", default=None,
                    help="how the engine runs, comma-separated, each both its draft_loop and its extend_passes: "
                         "graph (CUDA graphs for draft steps and for short large/small passes), eager, static, native "
                         "(native: the CPU's draft_loop, eager passes; default: graph,eager on CUDA, native on CPU)")
    args = ap.parse_args()
    dev = args.device
    loops = (args.draft_loops or ("graph,eager" if dev == "cuda" else "native")).split(",")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    large, small = random_pair(args.pair, dtype, dev, args.depth_scale)
    vocab = large.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    policies = [LargeOnly(), Greedy(max_draft_len=4), BiLD(fallback_threshold=0.5, rollback_threshold=3.0,
                                                             max_draft_len=6), SpeculativeSampling(max_draft_len=4),
                NGram(max_draft_len=4)]
    rows = []
    with torch.inference_mode():
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            engines = {loop: Engine(large=large, small=small, device=dev, dtype=dtype, max_batch_size=bs,
                                    max_model_len=64 + args.tokens, block_size=16, draft_loop=loop,
                                    extend_passes="eager" if loop == "native" else loop) for loop in loops}
            for eng in engines.values():  # warm-up: kernels compiled, every bucket's graph captured
                eng.generate(prompts[:bs], SamplingParams(max_tokens=8), policy=Greedy())
            base = None
            # speed-ups are over LargeOnly run the first way (on CUDA: with graphs, the faster baseline)
            runs = [(loop, LargeOnly()) for loop in loops] + [(loop, pol) for pol in policies[1:] for loop in loops]
            for loop, pol in runs:
                eng = engines[loop]
                eng.time_split = {"draft": 0.0, "verify": 0.0}
                t0 = time.perf_counter()
                outs = eng.generate(prompts, params, policy=pol)
                wall = time.perf_counter() - t0
                from bild_kernels.engine.sequence import RequestMetrics
                m = RequestMetrics.aggregate(o.metrics for o in outs)
                tps = m.generated_tokens / wall
                base = tps if isinstance(pol, LargeOnly) and base is None else base
                split = eng.time_split
                label = f"engine {pol.name}" + (f" ({loop})" if len(loops) > 1 else "")
                row = dict(pair=args.pair, depth_scale=args.depth_scale, batch=bs, system=label,
                           tokens_per_s=round(tps, 1), speedup=round(tps / base, 3),
                           acceptance=round(m.acceptance_rate, 3),
                           mean_accepted=round(m.mean_accepted_length, 2),
                           draft_s=round(split["draft"], 3), verify_s=round(split["verify"], 3),
                           overhead_s=round(wall - split["draft"] - split["verify"], 3))
                rows.append(row)
                print(row, flush=True)
            if bs == 1 and not args.no_hf:
                for name, kw in (("hf generate (large)", {}), ("hf assisted", dict(assistant=small)),
                                 ("hf assisted conf=0.4", dict(assistant=small, confidence=0.4)),
                                 ("hf prompt lookup", dict(lookup=4))):
                    outs, secs = hf_generate(large, prompts, args.tokens, min_tokens=args.tokens, **kw)
                    tps = sum(map(len, outs)) / secs
                    row = dict(pair=args.pair, depth_scale=args.depth_scale, batch=1, system=name,
                               tokens_per_s=round(tps, 1), speedup=round(tps / base, 3))
                    rows.append(row)
                    print(row, flush=True)
    if not args.no_save:
        import csv
        import datetime
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "bench_e2e.csv"
        fields = ["time", "device", "rev", "pair", "depth_scale", "batch", "system", "tokens_per_s", "speedup",
                  "acceptance", "mean_accepted", "draft_s", "verify_s", "overhead_s"]
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for r in rows:
                w.writerow({"time": now, "device": device_name(dev), "rev": git_rev(), **r})


if __name__ == "__main__":
    main()

"""Benchmark cpu_feature_draft_chain (a feature draft's greedy draft run, here of one sequence, in one call of the CPU
extension) against its reference twin and against the same run as one call per piece ("pieces":
cpu_feature_input, cpu_decoder_layer, cpu_rms_norm, the head's product and sample_draft each step, the kernels the
engine's eager loop calls, without its bookkeeping).

Shapes: the shipped feature draft of SmolLM2-135M (hidden 576, one layer of 9 query heads over 3 kv heads of 64,
intermediate 1536, a head over 8,192 ids), its weights float32, int8, or (AVX-512 VNNI) int8 packed for int16
activations as the engine runs them there; a run of T0 = 2 verified positions then --steps chained ones over a
96-token context, never unsure. Prints median and 20th/80th percentile us per run. CPU only; one thread unless
--threads.

  python bench/bench_cpu_feature_draft.py [--threads 2] [--steps 1,3] [--head-rows 8192,12288] [--no-save]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import cpu_extension_rows, parser, record, timeit  # noqa: E402

from bild_kernels import ops  # noqa: E402
from bild_kernels.models.llama import Int8Weight, int8_x16  # noqa: E402
from bild_kernels.ops.cpu_decoder_layer import LayerWeights, layer_args  # noqa: E402
from bild_kernels.ops.cpu_feature_draft import cpu_feature_draft_chain  # noqa: E402

H, HQ, HKV, D, INTER, VH, V, BLOCK, CONTEXT, T0 = 576, 9, 3, 64, 1536, 8192, 49152, 16, 96, 2


def _proj(t, form, bias=None):
    if form == "float32":
        return (t, None, bias)
    w = Int8Weight.of(t)
    return (*int8_x16(w), bias) if form == "int8x16" else (w.q, w.scale.float(), bias)


def _draft(form, blocks, vh=VH):
    def w(n, k):
        return torch.randn(n, k) * k ** -0.5
    layer = LayerWeights(torch.ones(H), _proj(w((HQ + 2 * HKV) * D, H), form), _proj(w(H, HQ * D), form),
                         torch.ones(H), _proj(w(2 * INTER, H), form), _proj(w(H, INTER), form))
    angle = torch.arange(CONTEXT + 32).float()[:, None] * torch.rand(D // 2)[None]
    emb = torch.cat((angle, angle), -1)
    return dict(shift=torch.zeros(H), inv_std=torch.ones(H), embed=torch.randn(V, H), inv_emb_scale=1.0,
                fc=_proj(w(H, 2 * H), form, torch.zeros(H)), layers=[layer],
                key_caches=[torch.randn(blocks, BLOCK, HKV, D)], value_caches=[torch.randn(blocks, BLOCK, HKV, D)],
                norm=torch.ones(H), head=_proj(w(vh, H), form), head_vocab=torch.randperm(V)[:vh].sort().values,
                cos=emb.cos(), sin=emb.sin(), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                num_heads=HQ, num_kv_heads=HKV, scale=D ** -0.5, sliding_windows=[0], eps=1e-5)


def _pieces(features, next_ids, *, steps, start, slot_mapping, d):
    """The same run as one kernel call per piece (what the eager loop calls, without the engine around it)."""
    ext = torch.ops.bild_kernels_cpu
    flat = layer_args(d["layers"][0])
    feed, ids, pos, used, tokens = features, next_ids, start, 0, []
    for _ in range(steps):
        T = feed.shape[0]
        x = ext.cpu_feature_input(feed, ids, d["shift"], d["inv_std"], d["embed"], d["inv_emb_scale"], *d["fc"])
        x = ext.cpu_decoder_layer(x, d["cos"][pos:pos + T], d["sin"][pos:pos + T], *flat, d["key_caches"][0],
                                  d["value_caches"][0], slot_mapping[used:used + T],
                                  torch.tensor([0, T], dtype=torch.int32), torch.arange(pos, pos + T),
                                  d["block_tables"], torch.tensor([pos + T], dtype=torch.int32), HQ, HKV, d["scale"], 0,
                                  d["eps"], 16)
        h = ext.cpu_rms_norm(x[-1:], d["norm"], d["eps"])
        w, s, b = d["head"]
        logits = (ext.cpu_linear(h, w, b) if s is None else ext.cpu_linear_q8_0x16(h, w, s, b, 16) if w.dim() == 5
                  else ext.cpu_linear_int8(h, w, s, b))
        tok = int(d["head_vocab"][ops.sample_draft(logits).token_ids[0]])
        tokens.append(tok)
        feed, ids, pos, used = x[-1:], torch.tensor([tok]), pos + T, used + T
    return tokens


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", default="1,3", help="comma-separated draft lengths (steps a run)")
    p.add_argument("--head-rows", default=str(VH),
                   help=f"comma-separated head vocabulary sizes (default {VH}, the shipped draft's)")
    args = p.parse_args()
    head_rows = [int(x) for x in args.head_rows.split(",")]
    args.rows = args.steps
    steps_list = cpu_extension_rows(args, "cpu_feature_draft_chain", "steps", 16)
    forms = ["float32", "int8"]
    if torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported():
        forms.append("int8x16")
    blocks = -(-(CONTEXT + 32) // BLOCK)
    for form, vh in [(form, vh) for form in forms for vh in head_rows]:
        d = _draft(form, blocks, vh)
        for steps in steps_list:
            f, nxt = torch.randn(T0, H), torch.randint(0, V, (T0,))
            pos = torch.arange(CONTEXT, CONTEXT + T0 + steps - 1)
            slots = pos  # the table is the identity: position p at slot p
            medians = {}
            chain = dict(counts=[T0], starts=[CONTEXT], caps=[steps], slot_mapping=slots, fallback_threshold=0.0, **d)
            runs = {"cpu": lambda: cpu_feature_draft_chain(f, nxt, backend="cpu", **chain),
                    "pieces": lambda: _pieces(f, nxt, steps=steps, start=CONTEXT, slot_mapping=slots, d=d),
                    "ref": lambda: cpu_feature_draft_chain(f, nxt, backend="ref", **chain)}
            for backend, fn in runs.items():
                stats = timeit(fn, "cpu", iters=args.iters or (20 if backend != "ref" else 3))
                row = record("cpu_feature_draft_chain", "cpu", backend,
                             {"weights": form, "T0": T0, "steps": steps, "threads": args.threads,
                              **({"head_rows": vh} if vh != VH else {})}, stats, None,
                             save=not args.no_save)
                medians[backend] = row["median_us"]
            cpu = medians["cpu"]
            print(f"  {form}, head {vh}, {steps} steps: cpu {cpu:.0f} us ({cpu / steps:.0f} a step), "
                  f"pieces/cpu {medians['pieces'] / cpu:.2f}x, ref/cpu {medians['ref'] / cpu:.1f}x")


if __name__ == "__main__":
    main()

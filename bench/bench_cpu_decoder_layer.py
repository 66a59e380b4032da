"""Benchmark cpu_decoder_layer (one decoder layer in one call of the CPU extension) against its reference twin
(the same layer as PyTorch ops with F.linear products: "ref") and against the same PyTorch ops on the
extension's matmul and attention kernels ("torch-ops": what the executor ran before the fused layer).

Shapes: SmolLM2-135M's layer (hidden 576, 9 query heads over 3 kv heads of 64, intermediate 1536), as a stack
of distinct layers (30 float32 ones: the default large model's decode step or verify pass; 30 with Q4_1 blocks:
the same from its GGUF's blocks; 4 int8 ones: the shipped draft's step; where the CPU has AVX-512 VNNI, the same
stacks packed for integer activations as the executor runs them there: q4_1x16 (int16), q4_1x16i8 (int8) and
int8x16, the cpu backend only; and the float32 stack with Qwen3's per-head q/k norms, "float32+qk_norm", or in
Gemma's form, "float32+gemma"), T = 1 or 3 new tokens of one sequence over a 96-token context. Prints median and
20th/80th percentile µs per stack, and the ratios to cpu. CPU only; one thread unless --threads.

  python bench/bench_cpu_decoder_layer.py [--threads 1] [--rows 1,3] [--no-save]
"""
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import cpu_extension_rows, parser, record, timeit  # noqa: E402

from bild_kernels import reference as R  # noqa: E402
from bild_kernels.models.attention import AttentionMetadata  # noqa: E402
from bild_kernels.models.llama import Int8Weight, int8_x16  # noqa: E402
from bild_kernels.ops.cpu_decoder_layer import LayerWeights, layer_args, layer_extras  # noqa: E402
from bild_kernels.ops.cpu_linear import MAX_ROWS  # noqa: E402

H, HQ, HKV, D, INTER, BLOCK, CONTEXT = 576, 9, 3, 64, 1536, 16, 96


def _layer(kind: str) -> LayerWeights:
    def w(n, k):
        t = torch.randn(n, k) * k ** -0.5
        if kind == "q4_1":  # the default large model's layers in its GGUF: Q4_1 blocks (uint8 weight, dm as scale)
            return (*R.q4_1_quantize(t), None)
        if kind.startswith("q4_1x16"):  # those blocks packed for integer activations (int16, or int8: "i8")
            return (*R.q4_1x16_pack(*R.q4_1_quantize(t)), None)
        if kind == "int8x16":  # the draft's int8 weights packed as Q8_0 blocks (int16 activations)
            return (*int8_x16(Int8Weight.of(t)), None)
        return (*Int8Weight.of(t), None) if kind == "int8" else (t, None, None)
    return LayerWeights(torch.ones(H), w((HQ + 2 * HKV) * D, H), w(H, HQ * D), torch.ones(H), w(2 * INTER, H),
                        w(H, INTER))


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,3", help="comma-separated new-token counts T (1..16)")
    p.add_argument("--layers", type=int, default=30, help="float32 layers in the stack (the draft's stack is 4)")
    args = p.parse_args()
    rows = cpu_extension_rows(args, "cpu_decoder_layer", "T", MAX_ROWS)  # the executor's fused passes
    ext = torch.ops.bild_kernels_cpu
    kernels = {"cpu": ext.cpu_decoder_layer, "ref": R.cpu_decoder_layer_ref,
               "torch-ops": functools.partial(R.cpu_decoder_layer_ref, linear=ext.cpu_linear,
                                              linear_int8=ext.cpu_linear_int8, attention=ext.paged_attention)}
    blocks = -(-(CONTEXT + 16) // BLOCK)
    totals = {}  # (kind, T) -> the cpu backend's median
    built = {}
    kinds = [(args.layers, "float32"), (args.layers, "float32+qk_norm"), (args.layers, "float32+gemma"),
             (args.layers, "q4_1"), (4, "int8")]
    if ext.cpu_linear_q4_1x16_supported():  # AVX-512 VNNI: the packed forms the executor runs here
        kinds += [(args.layers, "q4_1x16"), (args.layers, "q4_1x16i8"), (4, "int8x16")]
    for stack, kind in kinds:
        bits = 8 if kind.endswith("i8") else 16
        if kind in ("float32+qk_norm", "float32+gemma"):  # the float32 stack's own weights and caches, with
            # Qwen3's per-head norms added, or Gemma's form (those, its output norms and GeGLU)
            def extra(n):
                return 0.5 + torch.rand(n)
            gemma = kind == "float32+gemma"
            layers = [(a, (extra(D), extra(D), extra(H) if gemma else None, extra(H) if gemma else None, int(gemma)))
                      for a, _ in built["float32"][0]]
            caches = built["float32"][1]
        else:
            layers = [(layer_args(w), layer_extras(w)) for w in (_layer(kind) for _ in range(stack))]
            caches = [(torch.randn(blocks, BLOCK, HKV, D), torch.randn(blocks, BLOCK, HKV, D)) for _ in range(stack)]
        if kind == "float32":
            built[kind] = layers, caches
        for T in rows:
            meta = AttentionMetadata.build([T], [CONTEXT], torch.arange(blocks, dtype=torch.int32)[None], BLOCK)
            x = torch.randn(T, H)
            angle = meta.positions.float()[:, None] * torch.rand(D // 2)[None]
            cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
            tail = (meta.slot_mapping, meta.query_start_loc, meta.positions, meta.block_tables, meta.context_lens,
                    HQ, HKV, D ** -0.5, 0, 1e-5, bits)
            medians = {}
            for backend, fn in kernels.items():
                if kind.startswith("q4_1") and backend == "torch-ops":  # its products would dequantise each call
                    continue
                if kind.endswith("x16") or kind.endswith("i8"):  # packed: its reference is int64 arithmetic, slow
                    if backend != "cpu":
                        continue

                def run():
                    h = x
                    for (w, norms), (kc, vc) in zip(layers, caches):
                        h = fn(h, cos, sin, *w, kc, vc, *tail, *norms)
                    return h
                stats = timeit(run, "cpu", iters=args.iters or 20)
                row = record("cpu_decoder_layer", "cpu", backend,
                             {"weights": kind, "stack": stack, "T": T,
                              "threads": args.threads}, stats, None, save=not args.no_save)
                medians[backend] = row["median_us"]
            totals[kind, T] = medians["cpu"]
            line = f"  {kind} stack of {stack}, T={T}: cpu {medians['cpu'] / 1e3:.2f} ms"
            if "ref" in medians:
                line += f", ref/cpu {medians['ref'] / medians['cpu']:.2f}x"
            unpacked = {"q4_1x16": "q4_1", "q4_1x16i8": "q4_1", "int8x16": "int8"}.get(kind)
            if unpacked:
                line += f", {unpacked} (float activations)/{kind} {totals[unpacked, T] / medians['cpu']:.2f}x"
            if kind.startswith("float32+"):
                line += f", float32 (Llama's form)/{kind} {totals['float32', T] / medians['cpu']:.3f}x"
            if "torch-ops" in medians:
                line += (f", torch-ops/cpu {medians['torch-ops'] / medians['cpu']:.2f}x "
                         f"({(medians['torch-ops'] - medians['cpu']) / stack:.0f} us a layer saved)")
            print(line)


if __name__ == "__main__":
    main()

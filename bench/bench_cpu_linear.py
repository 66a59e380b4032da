"""Benchmark cpu_linear (the CPU small-M float32 matmul of a verify pass) against F.linear, its reference.

Shapes: SmolLM2-135M's projections (the default large model: fused q/k/v 960x576, o 576x576, fused gate/up
3072x576, down 576x1536, head 49152x576), each timed as a stack of 30 distinct weights (one per layer, so
the weights stream from memory as in a forward pass; the head once), at M = 1..16 rows. Prints median and
20th/80th percentiles, GB/s of weights read, and the ratio ref / cpu at each M; "vs M=1" says what a verify
pass over M tokens costs against a decode step. Then cpu_linear_int8 at the shipped draft's shapes (4-layer
stacks of int8 weights, an 8192-row head) at M = 1, 2, against torch's int8 weight kernel with bfloat16
activations (`torch-bf16`, what the draft ran on before). CPU only; set threads with --threads (default 1,
as `bild eval --threads 1`). Then cpu_linear_q8_0 on the large model's head shape (its Q8_0 form in the GGUF)
beside cpu_linear on the same weights in float32; last, cpu_linear_q4_1 on the layers' shapes (their Q4_1 form in
the GGUF, 30-weight stacks) beside cpu_linear on the same weights in float32 and, where the CPU has AVX-512 VNNI,
cpu_linear_q4_1x16 on those blocks packed (int16 activations; `cpu-x16i8`: int8 activations), with the totals of
one forward. The draft's int8 weights also run packed as Q8_0 blocks (`cpu-x16`: cpu_linear_q8_0x16, int16
activations), and the head's Q8_0 blocks packed at both activation widths (`cpu-x16stats`: with its rows' statistics,
cpu_linear_q8_0x16_stats).

  python bench/bench_cpu_linear.py [--threads 1] [--rows 1,2,3,4,8] [--no-save]
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import cpu_extension_rows, parser, pick_shapes, record, timeit  # noqa: E402

from bild_kernels.models.llama import Int8Weight, int8_x16  # noqa: E402
from bild_kernels.ops.cpu_linear import MAX_ROWS  # noqa: E402

# (name, N, K, weights in the stack)
SHAPES = [("qkv", 960, 576, 30), ("o", 576, 576, 30), ("gate_up", 3072, 576, 30), ("down", 576, 1536, 30),
          ("head", 49152, 576, 1)]


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,2,3,4,5,8", help="comma-separated M values (1..16)")
    args = p.parse_args()
    rows = cpu_extension_rows(args, "cpu_linear", "M", MAX_ROWS)
    kernels = {"cpu": torch.ops.bild_kernels_cpu.cpu_linear, "ref": lambda x, w, b: F.linear(x, w, b)}
    wanted = {(n, k) for n, k in pick_shapes(args, [(n, k) for _, n, k, _ in SHAPES])}
    totals = {}
    for name, N, K, L in SHAPES:
        if (N, K) not in wanted:
            continue
        weights = [torch.randn(N, K) for _ in range(L)]
        for M in rows:
            x = torch.randn(M, K)
            for backend, fn in kernels.items():
                stats = timeit(lambda: [fn(x, w, None) for w in weights], "cpu", iters=args.iters or 20)
                row = record("cpu_linear", "cpu", backend,
                             {"shape": name, "N": N, "K": K, "stack": L, "M": M, "threads": args.threads},
                             stats, L * N * K * 4, save=not args.no_save)
                totals[backend, M] = totals.get((backend, M), 0.0) + row["median_us"]
    print("\nall shapes (one forward's matmuls of the 30-layer model):")
    for M in rows:
        cpu, ref = totals.get(("cpu", M)), totals.get(("ref", M))
        if cpu is None:
            continue
        print(f"  M={M}: cpu {cpu / 1e3:7.1f} ms (vs M={rows[0]} {cpu / totals['cpu', rows[0]]:.2f}x)   "
              f"ref {ref / 1e3:7.1f} ms (vs M={rows[0]} {ref / totals['ref', rows[0]]:.2f}x)   ref/cpu {ref / cpu:.2f}x")

    int8 = {"cpu": lambda x, w: torch.ops.bild_kernels_cpu.cpu_linear_int8(x, w.q, w.scale, None),
            "torch-bf16": lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w.q, w.scale)}
    x16 = torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported()
    if x16:  # the same int8 weights packed as Q8_0 blocks (what the executor runs on a CPU with VNNI)
        int8["cpu-x16"] = lambda x, w: torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16(x, *w, None, 16)
    for name, N, K, L in SHAPES:
        if (N, K) not in wanted:
            continue
        N, L = (8192, 1) if name == "head" else (N, 4)  # the draft's reduced-vocabulary head, its 4 layers
        weights = {"cpu": [Int8Weight.of(torch.randn(N, K)) for _ in range(L)]}
        weights["torch-bf16"] = [Int8Weight(w.q, w.scale.bfloat16()) for w in weights["cpu"]]
        if x16:
            weights["cpu-x16"] = [int8_x16(w) for w in weights["cpu"]]
        for M in (1, 2):
            x = torch.randn(M, K)
            for backend, fn in int8.items():
                xb = x.bfloat16() if backend == "torch-bf16" else x
                stats = timeit(lambda: [fn(xb, w) for w in weights[backend]], "cpu", iters=args.iters or 50)
                record("cpu_linear_q8_0x16" if backend == "cpu-x16" else "cpu_linear_int8", "cpu",
                       "cpu" if backend == "cpu-x16" else backend,
                       {"shape": "draft_" + name, "N": N, "K": K, "stack": L, "M": M, "threads": args.threads},
                       stats, L * N * K, save=not args.no_save)

    # cpu_linear_q8_0 on the large model's head (a Q8_0 matrix in the GGUF) beside cpu_linear on its float32 weights
    if (49152, 576) in wanted:
        N, K = 49152, 576
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        d = (torch.rand(N, K // 32) * 0.02).half().float()
        w = q.float() * d.repeat_interleave(32, dim=1)
        q8 = {"cpu-q8_0": lambda x: torch.ops.bild_kernels_cpu.cpu_linear_q8_0(x, q, d, None),
              "cpu-f32": lambda x: torch.ops.bild_kernels_cpu.cpu_linear(x, w, None)}
        if x16:  # the blocks packed, int16 and int8 activations
            from bild_kernels.reference import q8_0x16_pack
            qp, dp = q8_0x16_pack(q, d)
            for bits in (16, 8):
                q8[f"cpu-x16{'i8' if bits == 8 else ''}"] = (
                    lambda x, bits=bits: torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16(x, qp, dp, None, bits))
            # with its rows' max / logsumexp / argmax / finite flag (what the engine's verification reads)
            q8["cpu-x16stats"] = lambda x: torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16_stats(x, qp, dp, None, 16)
        for M in rows:
            x = torch.randn(M, K)
            for backend, fn in q8.items():
                stats = timeit(lambda: fn(x), "cpu", iters=args.iters or 20)
                op = ("cpu_linear_q8_0x16_stats" if backend == "cpu-x16stats" else
                      "cpu_linear_q8_0x16" if backend.startswith("cpu-x16") else "cpu_linear_q8_0")
                record(op, "cpu", {"cpu-x16": "cpu", "cpu-x16i8": "cpu-i8", "cpu-x16stats": "cpu"}.get(backend, backend),
                       {"shape": "head", "N": N, "K": K, "stack": 1, "M": M, "threads": args.threads},
                       stats, N * K * 4 if backend == "cpu-f32" else N * (K + K // 32 * 4), save=not args.no_save)

    # cpu_linear_q4_1 on the layers' projections (Q4_1 in the GGUF) beside cpu_linear on their float32 weights
    from bild_kernels.reference import q4_1_dequantize, q4_1x16_pack
    q4_totals = {}
    for name, N, K, L in SHAPES:
        if name == "head" or (N, K) not in wanted:
            continue
        blocks = [(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8),
                   torch.stack([(torch.rand(N, K // 32) * 0.02).half().float(),
                                (-torch.rand(N, K // 32) * 0.1).half().float()], -1).contiguous()) for _ in range(L)]
        floats = [q4_1_dequantize(q, dm) for q, dm in blocks]
        q4 = {"cpu-q4_1": lambda x: [torch.ops.bild_kernels_cpu.cpu_linear_q4_1(x, q, dm, None) for q, dm in blocks],
              "cpu-f32": lambda x: [torch.ops.bild_kernels_cpu.cpu_linear(x, w, None) for w in floats]}
        if x16:  # the same blocks packed, int16 (and int8) activations
            packed = [q4_1x16_pack(q, dm) for q, dm in blocks]
            for bits in (16, 8):
                q4[f"cpu-x16{'i8' if bits == 8 else ''}"] = (
                    lambda x, bits=bits: [torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16(x, q, dm, None, bits)
                                          for q, dm in packed])
        for M in rows:
            x = torch.randn(M, K)
            for backend, fn in q4.items():
                stats = timeit(lambda: fn(x), "cpu", iters=args.iters or 20)
                op = "cpu_linear_q4_1x16" if backend.startswith("cpu-x16") else "cpu_linear_q4_1"
                row = record(op, "cpu", {"cpu-x16": "cpu", "cpu-x16i8": "cpu-i8"}.get(backend, backend),
                             {"shape": name, "N": N, "K": K, "stack": L, "M": M, "threads": args.threads},
                             stats, L * N * (K // 2 + K // 32 * 8) if backend != "cpu-f32" else L * N * K * 4,
                             save=not args.no_save)
                q4_totals[backend, M] = q4_totals.get((backend, M), 0.0) + row["median_us"]
    if q4_totals:
        print("\nthe 30 layers' projections, Q4_1 blocks against float32 weights:")
        for M in rows:
            q, f = q4_totals["cpu-q4_1", M], q4_totals["cpu-f32", M]
            t16, t8 = q4_totals.get(("cpu-x16", M)), q4_totals.get(("cpu-x16i8", M))
            print(f"  M={M}: q4_1 {q / 1e3:7.1f} ms (vs M={rows[0]} {q / q4_totals['cpu-q4_1', rows[0]]:.2f}x)   "
                  f"f32 {f / 1e3:7.1f} ms   f32/q4_1 {f / q:.2f}x"
                  + ("" if t16 is None else f"   x16 {t16 / 1e3:7.1f} ms (vs M={rows[0]} "
                     f"{t16 / q4_totals['cpu-x16', rows[0]]:.2f}x)   q4_1/x16 {q / t16:.2f}x"
                     f"   x16i8 {t8 / 1e3:7.1f} ms (vs M={rows[0]} {t8 / q4_totals['cpu-x16i8', rows[0]]:.2f}x)"))


if __name__ == "__main__":
    main()

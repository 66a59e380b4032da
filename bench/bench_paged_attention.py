"""Benchmark paged attention: decode, verification extend (K+1 = 5) and prefill over the paged cache.

GPU: Llama-3-8B heads (Hq=32, Hkv=8, D=128) bf16, block 16, blocks scattered through the pool;
decode and extend at B in {1, 8, 64} with 2048 cached tokens per row, prefill of 4 x 512 tokens.
CPU: SmolLM2-135M's heads (Hq=9, Hkv=3, D=64) float32, decode and extend (K+1 = 3) at B in {1, 8} with
150 cached tokens (what the default pair's layers do on a CPU), plus a small prefill and a 1,024-token one; backends
ref, cpu (bild_kernels._cpu) and, under TRITON_INTERPRET=1, Triton. Bytes = K and V of every row's context read
once + queries and outputs: the floor for decode, where attention is bound by the cache read.

  python bench/bench_paged_attention.py [--device cpu] [--backends cpu,ref] [--no-save]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, record, timeit, usable_backends  # noqa: E402

from bild_kernels.models.attention import AttentionMetadata, paged_attention  # noqa: E402


def _case(mode, B, L, Hq, Hkv, D, bs, dtype, dev):
    q_len = {"decode": 1, "extend": 5 if dev == "cuda" else 3, "prefill": L}[mode]
    M = -(-L // bs)
    block_tables = torch.randperm(B * M, device=dev).int().view(B, M)
    meta = AttentionMetadata.build([q_len] * B, [L] * B, block_tables, bs)
    key_cache = torch.randn(B * M, bs, Hkv, D, device=dev).to(dtype)
    value_cache = torch.randn_like(key_cache)
    query = torch.randn(meta.num_tokens, Hq, D, device=dev).to(dtype)
    moved = (2 * B * L * Hkv + 2 * meta.num_tokens * Hq) * D * dtype.itemsize
    return query, key_cache, value_cache, meta, moved


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    dev = args.device
    gpu = dev == "cuda"
    Hq, Hkv, D, bs, dtype = (32, 8, 128, 16, torch.bfloat16) if gpu else (9, 3, 64, 16, torch.float32)
    configs = ([("decode", B, 2048) for B in (1, 8, 64)] + [("extend", B, 2048) for B in (1, 8, 64)]
               + [("prefill", 4, 512)]) if gpu else ([("decode", B, 150) for B in (1, 8)]
                                                     + [("extend", B, 150) for B in (1, 8)] + [("prefill", 2, 32)]
                                                     + [("prefill", 1, 1024)])  # a long prompt: threads' balance
    # No CUDA-extension kernel and no compiled variant: the reference loops over rows in Python.
    for backend in [b for b in usable_backends(dev, args.backends, cpu_kernel=True) if b in ("triton", "cpu", "ref")]:
        for mode, B, L in configs:
            if backend == "triton" and not gpu and L > 64:
                continue  # the interpreter: minutes per call at these sizes
            query, key_cache, value_cache, meta, moved = _case(mode, B, L, Hq, Hkv, D, bs, dtype, dev)
            stats = timeit(lambda: paged_attention(query, key_cache, value_cache, meta, scale=D ** -0.5,
                                                   backend=backend),
                           dev, iters=args.iters or (50 if gpu or backend == "cpu" else 10), warmup=3)
            record("paged_attention", dev, backend,
                   {"mode": mode, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "block": bs,
                    "dtype": str(dtype).split(".")[-1]}, stats, moved, save=not args.no_save)


if __name__ == "__main__":
    main()

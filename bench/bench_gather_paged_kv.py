"""Benchmark gather_paged_kv: dense [B, L, H, D] copies of the paged cache for the reference attention path.

GPU: B in {1, 8, 64, 256} rows of 512 tokens (every row full, so no zero padding), H=8 D=128 bf16,
block 16, blocks scattered through the pool. CPU: tiny shapes (TRITON_INTERPRET=1 to include Triton).
Bytes = cache read + dense write, K and V. The length read (one host sync) is part of the op's cost.

  python bench/bench_gather_paged_kv.py [--device cpu] [--backends triton,ref] [--no-save]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, record, timeit, usable_backends  # noqa: E402

from bild_kernels import reference as R  # noqa: E402
from bild_kernels._backend import resolve  # noqa: E402


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    dev = args.device
    gpu = dev == "cuda"
    H, D, bs, L, dtype = (8, 128, 16, 512, torch.bfloat16) if gpu else (2, 16, 4, 32, torch.float32)
    batches = [1, 8, 64, 256] if gpu else [1, 4]
    M = L // bs
    for backend in usable_backends(dev, args.backends):
        fn = (torch.compile(R.gather_paged_kv_ref, dynamic=True) if backend == "compile"
              else resolve("gather_paged_kv", torch.device(dev), backend))
        for B in batches:
            num_blocks = B * M
            key_cache = torch.randn(num_blocks, bs, H, D, device=dev).to(dtype)
            value_cache = torch.randn_like(key_cache)
            block_tables = torch.randperm(num_blocks, device=dev).int().view(B, M)
            context_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
            stats = timeit(lambda: fn(key_cache, value_cache, block_tables, context_lens), dev,
                           iters=args.iters or (50 if gpu else 5))
            moved = 2 * 2 * B * L * H * D * dtype.itemsize + B * M * 4
            record("gather_paged_kv", dev, backend, {"B": B, "L": L, "H": H, "D": D, "block": bs,
                                                     "dtype": str(dtype).split(".")[-1]},
                   stats, moved, save=not args.no_save)


if __name__ == "__main__":
    main()

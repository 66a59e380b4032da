"""Benchmark write_paged_kv: scatter a decode/verify batch of new K/V into the paged cache.

GPU: B in {1, 8, 64, 256} rows x (1 decode | 6 verify) tokens, Llama-ish H=8 D=128 bf16, block 16.
CPU: tiny shapes (run under TRITON_INTERPRET=1 to include Triton). Bytes = K/V read + cache write + slots.

  python bench/bench_write_paged_kv.py [--device cpu] [--backends triton,ref] [--no-save]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, record, timeit, usable_backends  # noqa: E402

from bild_kernels import reference as R  # noqa: E402
from bild_kernels._backend import resolve  # noqa: E402


def impl(backend: str, device: str):
    if backend == "compile":
        return torch.compile(R.write_paged_kv_ref)
    # The backend's kernel itself, without the public op's input checks (they read the device).
    return resolve("write_paged_kv", torch.device(device), backend)


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    dev = args.device
    gpu = dev == "cuda"
    H, D, bs, dtype = (8, 128, 16, torch.bfloat16) if gpu else (2, 16, 16, torch.float32)
    batches = [1, 8, 64, 256] if gpu else [1, 8]
    tokens_per_row = [1, 6] if gpu else [1]
    num_blocks = 8192 if gpu else 64
    key_cache = torch.zeros(num_blocks, bs, H, D, dtype=dtype, device=dev)
    value_cache = torch.zeros_like(key_cache)
    for backend in usable_backends(dev, args.backends):
        fn = impl(backend, dev)
        for B in batches:
            for n in tokens_per_row:
                T = B * n
                key = torch.randn(T, H, D, device=dev).to(dtype)
                value = torch.randn(T, H, D, device=dev).to(dtype)
                # Every row writes its tokens at the end of its own blocks, as in decoding; no padding rows.
                slot_mapping = torch.randperm(num_blocks * bs, device=dev)[:T]
                stats = timeit(lambda: fn(key, value, key_cache, value_cache, slot_mapping), dev,
                               iters=args.iters or (100 if gpu else 5))
                moved = 2 * T * H * D * dtype.itemsize * 2 + T * 8
                record("write_paged_kv", dev, backend, {"B": B, "tokens_per_row": n, "H": H, "D": D, "block": bs,
                                                        "dtype": str(dtype).split(".")[-1]},
                       stats, moved, save=not args.no_save)


if __name__ == "__main__":
    main()

"""Benchmark rollback_paged_kv (and reserve_paged_kv, its partner): the per-step block bookkeeping.

Each of B rows holds ~1000 tokens plus a verify window of K+1 = 6 reserved slots (block 16, tables of 256
blocks); rollback drops 0..6 tokens per row, reserve asks 6 more per row. B in {1, 8, 64, 256}; the
target is rollback of 256 rows < 20 us on an H100. On a GPU the Triton/CUDA kernels are also timed
replayed from a CUDA graph ("+graph"), as the engine runs them, which removes the Python launch cost.
On a CPU (tables of 16 blocks of 4): the reference and the CPU extension's twin ("cpu"), and Triton under
TRITON_INTERPRET=1. Bytes = block tables read + per-row vectors.

  python bench/bench_rollback_paged_kv.py [--device cpu] [--backends cpu,ref] [--no-save]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import parser, record, timeit, usable_backends  # noqa: E402

from bild_kernels._backend import resolve  # noqa: E402

K1 = 6  # drafted tokens + 1


def make_state(B, M, bs, dev, gen):
    """Rows with random lengths that hold their blocks plus the verify window's; the rest of the pool free."""
    lens = torch.randint(M * bs // 8, M * bs // 4, (B,), generator=gen, dtype=torch.int32)
    held = (lens + K1 + bs - 1) // bs
    N = B * M
    perm = torch.randperm(N, generator=gen, dtype=torch.int32)
    tables = torch.full((B, M), -1, dtype=torch.int32)
    start = 0
    for b in range(B):
        tables[b, :held[b]] = perm[start:start + held[b]]
        start += int(held[b])
    free = torch.cat([perm[start:], torch.full((start,), -1, dtype=torch.int32)])
    return [t.to(dev) for t in (tables, lens, free, torch.tensor([N - start], dtype=torch.int32))]


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    dev = args.device
    gpu = dev == "cuda"
    bs, M = (16, 256) if gpu else (4, 16)
    gen = torch.Generator().manual_seed(0)
    for backend in [b for b in usable_backends(dev, args.backends, cpu_kernel=True) if b != "compile"]:  # loops: nothing to compile
        modes = [False, True] if gpu and backend != "ref" else [False]
        for op in ("rollback", "reserve"):
            fn = resolve(f"{op}_paged_kv", torch.device(dev), backend)
            for B in (1, 8, 64, 256):
                base = make_state(B, M, bs, dev, gen)
                counts = (torch.randint(0, K1 + 1, (B,), generator=gen, dtype=torch.int32) if op == "rollback"
                          else torch.full((B,), K1, dtype=torch.int32)).to(dev)
                state = [t.clone() for t in base]

                def restore():
                    for s, t in zip(state, base):
                        s.copy_(t)

                for graphed in modes:
                    call = lambda: fn(*state[:2], counts, *state[2:], bs)  # noqa: E731
                    if graphed:
                        call()
                        torch.cuda.synchronize()
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            call()
                        call = graph.replay
                    stats = timeit(call, dev, setup=restore, iters=args.iters or (200 if gpu else 5))
                    moved = B * M * 4 + 3 * B * 4
                    record(f"{op}_paged_kv", dev, backend + ("+graph" if graphed else ""),
                           {"B": B, "M": M, "block": bs}, stats, moved, save=not args.no_save)


if __name__ == "__main__":
    main()

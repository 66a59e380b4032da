"""Compile every Triton kernel of bild_kernels ahead of time for sm_90 (no GPU needed).

Each module under bild_kernels/triton/ lists representative compilations of its kernels in
AOT_SPECS = [(jit_function, signature, constexprs), ...]. This catches type and lowering errors
that the interpreter (which runs kernels as NumPy) never sees. Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 or 80")
    args = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import bild_kernels.triton as pkg

    target = GPUTarget("cuda", args.arch, 32)
    failures, count = 0, 0
    for mod_info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"bild_kernels.triton.{mod_info.name}")
        for fn, signature, constexprs in getattr(mod, "AOT_SPECS", []):
            name = f"{mod_info.name}.{getattr(fn, '__name__', fn)}"
            t0 = time.perf_counter()
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs), target=target)
                size = len(kernel.asm.get("cubin", b""))
                print(f"   ok   {name:<50} sm_{args.arch} cubin {size:>7} B  {time.perf_counter() - t0:5.1f} s")
            except Exception as exc:  # report every failing kernel, not just the first
                failures += 1
                print(f"   FAIL {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            count += 1
    if count == 0:
        print("   no AOT_SPECS found", file=sys.stderr)
        return 1
    print(f"   {count - failures}/{count} Triton kernels compiled for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

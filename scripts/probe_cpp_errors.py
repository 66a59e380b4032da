"""Whether the CUDA extension's own argument checks (TORCH_CHECK in csrc/*.cu) raise on a GPU machine, or take the
process down: on the H100 of 2026-11-27c (torch 2.11) `test_a_rows_hint_out_of_range_raises` crashed its pytest worker
with a segmentation fault, while the same call on CPU tensors raised here. Each probe runs in a process of its own
and prints one line: raised (with the message's start), returned, or died (with the signal).

  python scripts/probe_cpp_errors.py
"""
from __future__ import annotations

import subprocess
import sys

SETUP = """
import torch, bild_kernels
from bild_kernels._backend import cuda_extension
assert cuda_extension() is not None, "bild_kernels._C was not built"
C = torch.ops.bild_kernels_C
dev = "{dev}"
B, V = 2, 7
row = lambda dt=torch.float32: torch.zeros(B, dtype=dt, device=dev)
"""
PROBES = {  # name: (device, the failing call)
    "sample_draft rows=8 (the crashed test)": (
        "cuda", "C.sample_draft(torch.randn(B, V, device=dev), row(), row(torch.int32), row() + 1, row(torch.int64), "
                "row(torch.int64), row(), 8)"),
    "sample_draft rows=8 on CPU tensors": (
        "cpu", "C.sample_draft(torch.randn(B, V), row(), row(torch.int32), row() + 1, row(torch.int64), "
               "row(torch.int64), row(), 8)"),
    "sample_draft logits [B] (a later check)": (
        "cuda", "C.sample_draft(torch.randn(B, device=dev), row(), row(torch.int32), row() + 1, row(torch.int64), "
                "row(torch.int64), row())"),
    "verify_draft mode 5": (
        "cuda", "C.verify_draft(torch.zeros(B, 1, dtype=torch.int64, device=dev), torch.randn(B, 2, V, device=dev), 5, "
                "row(), None, row(), row(torch.int32), row() + 1, row(torch.int64), row(torch.int64))"),
    "verify_draft on CPU tensors (passed on the H100)": (
        "cpu", "C.verify_draft(torch.zeros(B, 1, dtype=torch.int64), torch.randn(B, 2, V), 0, row(), None, row(), "
               "row(torch.int32), row() + 1, row(torch.int64), row(torch.int64))"),
}


def main() -> int:
    for name, (dev, call) in PROBES.items():
        code = SETUP.format(dev=dev) + f"""
try:
    {call}
    print("returned")
except RuntimeError as e:
    print("raised: " + str(e).splitlines()[0][:120])
"""
        res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                             timeout=120)
        if res.returncode < 0:
            out = f"died with signal {-res.returncode}"
        elif res.returncode != 0:
            out = f"exit {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1][:160]}"
        else:
            out = res.stdout.strip()
        print(f"{name}: {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

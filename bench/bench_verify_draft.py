"""Benchmark verify_draft: a batch of K-token drafts against bf16 large-model logits, every usable backend.

GPU shapes: B in {1, 8, 64, 256}, K in {4, 8}, V in {32000, 128256}; modes greedy (greedy target), bild
(greedy target) and sample (target at T = 0.8, fp32 draft probabilities). Drafts agree with the target's
argmax at 70% of positions, so rows accept a mix of lengths. Bandwidth counts one read of the target
logits [B, K+1, V] (sample mode adds nothing: it reads a single p_S row per rejected sequence). The
speed-up is against the PyTorch reference ("ref"); "compile" is torch.compile of that reference;
"cuda+graph" and "triton+graph" time the kernels replayed from a CUDA graph (no Python or launch cost).
On a CPU (Triton under TRITON_INTERPRET=1) tiny shapes only show that the plumbing works.
"flashinfer" (sample mode, on a GPU, where `import flashinfer` works: scripts/flashinfer_build.sh) times what a
FlashInfer user calls for the same verification: softmax of the target logits at the rows' temperature, then
`chain_speculative_sampling` over those probabilities and the drafts' (eagerly: it draws from a torch.Generator).

    python bench/bench_verify_draft.py [--device cuda] [--backends triton,ref] [--no-save]
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # run from a checkout
from _common import implementation, FUSED, HINTED, first_pass_of, flashinfer_sampling, parser, pick_shapes, runs_at, time_backend, usable_backends  # noqa: E402

from bild_kernels import reference as R  # noqa: E402


# mode name -> (op mode, temperature, top_k, top_p) of the large model's tokens
MODES = {"greedy": (R.MODE_GREEDY, 0.0, 0, 1.0), "bild": (R.MODE_BILD, 0.0, 0, 1.0), "sample": (R.MODE_SAMPLE, 0.8, 0, 1.0),
         "bild-topk_topp": (R.MODE_BILD, 0.8, 50, 0.9)}  # BiLD with sampled tokens at the cut, top-k 50, top-p 0.9
# what an engine tells the CUDA op of these rows ("cuda-hinted": its `rows` argument, kRowsSampled = 1 |
# kRowsFiltered = 2); every other backend runs without it
HINTS = {"greedy": 0, "bild": 0, "sample": 1, "bild-topk_topp": 3}


def inputs(B, K, V, mode_name, device):
    mode, temp, top_k, top_p = MODES[mode_name]
    target_logits = (torch.randn(B, K + 1, V, device=device) * 4).to(torch.bfloat16)
    amax = target_logits[:, :K].float().argmax(2)
    draft_ids = torch.where(torch.rand(B, K, device=device) < 0.7, amax, torch.randint(0, V, (B, K), device=device))
    f = lambda x, dt: torch.full((B,), x, dtype=dt, device=device)  # noqa: E731
    draft_probs = torch.softmax(torch.randn(B, K, V, device=device), 2) if mode == R.MODE_SAMPLE else None
    return (draft_ids, target_logits, mode, f(2.0, torch.float32), draft_probs, f(temp, torch.float32),
            f(top_k, torch.int32), f(top_p, torch.float32), torch.arange(B, device=device, dtype=torch.int64),
            f(3, torch.int64))


def flashinfer_verify(mode_name: str):
    """FlashInfer's speculative-sampling verification (see the module's docstring), or None (other modes; not
    importable)."""
    fs = flashinfer_sampling() if mode_name == "sample" else None
    if fs is None:
        return None

    def fn(draft_ids, target_logits, mode, thresholds, draft_probs, temperature, *rest):
        target_probs = torch.softmax(target_logits.float() / temperature[:, None, None], dim=2)
        return fs.chain_speculative_sampling(draft_probs, draft_ids.int(), target_probs)
    return fn


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    shapes = pick_shapes(args, [(B, K, V) for V in (32000, 128256) for K in (4, 8) for B in (1, 8, 64, 256)] if gpu
                         else [(1, 4, 1000), (8, 4, 1000), (1, 4, 49152)])
    modes = ["greedy", "bild", "sample"] if gpu else ["greedy", "sample", "bild-topk_topp"]
    if args.modes:
        modes = args.modes.split(",")
        if any(m not in MODES for m in modes):
            raise SystemExit(f"--modes: {args.modes!r} names a mode outside {','.join(MODES)}")
    iters = args.iters or (50 if gpu else 3)
    backends = usable_backends(args.device, args.backends, first_pass=True, cpu_kernel=True)
    backends.sort(key=lambda b: b != "ref")  # ref first: the others report their speed-up against it
    fns = {b: implementation("verify_draft", R.verify_draft_ref, b, args.device) for b in backends}
    if gpu and (args.backends is None or "flashinfer" in args.backends.split(",")) and flashinfer_verify("sample"):
        backends.append("flashinfer")
    for B, K, V in shapes:
        for mode in modes:
            x = inputs(B, K, V, mode, args.device)
            base = None
            # (on a CPU the interpreted Triton kernels only at the small shapes: the default pair's are for ref/cpu)
            for b in [b for b in backends if runs_at(b, {"B": B, "V": V}) and (gpu or b != "triton" or V <= 1000)]:
                fn = functools.partial(fns[b], rows=HINTS[mode]) if b in (HINTED, FUSED) else fns.get(b)
                if b == "flashinfer" and (fn := flashinfer_verify(mode)) is None:
                    continue
                base = time_backend("verify_draft", b, lambda: fn(*x), args,
                                    {"B": B, "K": K, "V": V, "mode": mode, "dtype": "bf16"}, B * (K + 1) * V * 2, base,
                                    gpu=gpu, iters=iters, context=lambda: first_pass_of(b))


if __name__ == "__main__":
    main()

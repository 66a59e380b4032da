"""Does a feature draft train alike under other matrix-product numerics or batch orders? From scratch, side by side.

A GPU session is short and cannot be spent finding out that TF32 breaks training (bfloat16 autocast does: the draft
works in the large model's raw residual space). This trains the same draft from scratch on the same answers
(the large model's, at temperature 0.7, to `--prompts` training prompts) for `--steps` steps in each mode and
prints the logged loss and the held-out agreement:

- `fp32`: as `bild distill` on a CPU;
- `tf32`: TF32 emulated on the CPU: both inputs of every `F.linear` and `@` product, forward and backward, rounded to
  TF32's 10-bit mantissa as cuBLAS does under `allow_tf32` (cvt.rna), float32 sums;
- `bf16`: bfloat16 autocast, the known failure, to show that the comparison can fail;
- a `-grouped` suffix: batches from `length_grouped_batches`; an `-s<N>` suffix: batch order seed N.

    python python/tools/train_numerics.py --modes fp32,tf32,bf16 [--prompts 256] [--steps 200] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _tf32_context():
    import torch
    import torch.nn.functional as F

    def r(x):  # float32 -> TF32, round to nearest, ties away from zero
        return ((x.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)

    lin, mm = F.linear, torch.Tensor.__matmul__

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return mm(r(x), r(w).t())

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return mm(r(g), r(w)), mm(r(g).reshape(-1, g.shape[-1]).t(), r(x).reshape(-1, x.shape[-1]))

    class MatMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return mm(r(a), r(b))

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            ga, gb = mm(r(g), r(b).transpose(-1, -2)), mm(r(a).transpose(-1, -2), r(g))
            return _unbroadcast(ga, a.shape), _unbroadcast(gb, b.shape)

    @contextlib.contextmanager
    def tf32():
        F.linear = lambda x, w, b=None: Linear.apply(x, w) + (0 if b is None else b)
        torch.Tensor.__matmul__ = lambda a, b: MatMul.apply(a, b)
        try:
            yield
        finally:
            F.linear, torch.Tensor.__matmul__ = lin, mm
    return tf32()


def _unbroadcast(g, shape):
    while g.dim() > len(shape):
        g = g.sum(0)
    for d, n in enumerate(shape):
        if n == 1 and g.shape[d] != 1:
            g = g.sum(d, keepdim=True)
    return g


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="fp32,tf32,bf16")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import torch

    from bild_kernels.distill.corpus import chat_ids, generate_corpus
    from bild_kernels.distill.feature_draft import (FeatureDraft, executor_features, feature_agreement,
                                                    feature_stats, teacher_features, train_feature_draft)
    from bild_kernels.distill.pipeline import _teacher
    from bild_kernels.distill.prompts import all_train_prompts, held_out_prompts
    from bild_kernels.models import load_model
    from bild_kernels.models.default import FEATURE_DRAFT_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok, _ = _teacher(None)
    prompts = random.Random(0).sample(all_train_prompts(), args.prompts)
    t = time.perf_counter()
    corpus = generate_corpus(teacher, tok, prompts, max_new_tokens=64, temperature=0.7, log=lambda s: None)
    print(f"corpus: {len(corpus)} answers, {sum(map(len, corpus))} tokens ({time.perf_counter() - t:.0f} s)",
          flush=True)
    feats, targets = executor_features(load_model(teacher, dtype=torch.float32)[0], corpus, targets_k=32,
                                       log=lambda s: None)
    held = torch.load(ROOT / "bench" / "data" / "corpus_eval_smollm2-135m-instruct.pt")
    pairs = [(x, len(chat_ids(tok, p))) for p, x in zip(held_out_prompts(), held)]
    held_feats = teacher_features(teacher, held, log=lambda s: None)
    vocab = FeatureDraft.from_dir(FEATURE_DRAFT_DIR, teacher).vocab
    mean, std = feature_stats(feats)
    for mode in args.modes.split(","):
        seed = int(mode.rsplit("-s", 1)[1]) if re.search(r"-s\d+$", mode) else 0
        kind = mode.split("-")[0]
        if kind not in ("fp32", "tf32", "bf16"):
            raise SystemExit(f"unknown mode {mode!r}: fp32, tf32 or bf16, then -grouped and/or -s<seed>")
        torch.manual_seed(0)
        draft = FeatureDraft.from_teacher(teacher, n_layers=1, vocab=vocab, feat_mean=mean, feat_std=std)
        ctx = (_tf32_context() if kind == "tf32" else torch.autocast("cpu", dtype=torch.bfloat16) if kind == "bf16"
               else contextlib.nullcontext())
        lines = []
        t = time.perf_counter()
        with ctx:  # as `bild distill` trains a feature draft, for a fixed number of steps
            train_feature_draft(draft, corpus, feats, targets, minutes=1e6, max_steps=args.steps, lr=2e-3,
                                batch_size=8, depth=2, noise=0.1, w_ce=1.0, log=lines.append, seed=seed,
                                group_by_length="-grouped" in mode)
        el = time.perf_counter() - t
        a = feature_agreement(draft, held_feats, pairs, depth=2, max_k=2)
        steps = [line for line in lines if line.startswith("step ")]
        losses = " ".join(f"{float(s.split(' loss ')[1].split()[0]):.3f}" for s in steps)
        pad = steps[-1].split("padding")[0].split()[-1] if steps else "?"
        print(f"{mode}: {args.steps} steps in {el:.0f} s, {pad} padding; loss every 20 steps {losses}; held-out d1 "
              f"{a['d1']:.3f}, acc_2 {a['acc_2']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Would the feature draft agree more with the large model if it also read the large model's middle layers?

EAGLE-3 feeds its draft the target's low, middle and high layers' hidden states, not only the last one. This checks
that idea on the default pair before any engine or GPU work is spent on it: the shipped feature draft is fine-tuned
on the same corpus (the large model's answers at temperature 0.7 to `--prompts` training prompts, written by bild's
batch decoder) in arms that differ only in what the draft reads at the verified (depth-1) positions:

- `ctrl`: the last layer's hidden state, as shipped;
- `all`, `mid`, `low`, `hi`: also layers 6, 14 and 22 / 14 / 6 / 22 (their outputs, standardised per dimension), through
  a projection added to the draft's input map, initialised to zero so that every arm starts as the shipped draft.
  Chain steps (depth 2 on) feed the draft's own predicted feature, as before: the middle layers exist only where
  the large model ran.

Each arm trains `--steps` steps (batch 8, depth 2, the pipeline's loss, length-grouped batches) and prints the
held-out top-1 agreement (d1) and acc_2 as it goes. The corpus, its features (four layers, float16) and top-32
targets are computed once with transformers' float32 forward and kept in `--work`.

    python python/tools/feature_layers_ab.py --prompts 1200 --arms ctrl,all --steps 600 --lr 2e-4 [--threads 2]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
LAYERS = [6, 14, 22]
ARMS = {"ctrl": [], "all": [6, 14, 22], "mid": [14], "low": [6], "hi": [22]}


def _features(teacher, seqs, k: int = 32):
    """Per sequence: [L, 4H] float16 (the last layer's stream before the final norm, then layers LAYERS' outputs)
    and the top-k next-token distribution (ids int32, probabilities float16)."""
    import torch
    cap = {}
    hooks = [teacher.model.norm.register_forward_pre_hook(lambda m, a: cap.__setitem__("f", a[0]))]
    for i in LAYERS:
        hooks.append(teacher.model.layers[i].register_forward_hook(
            lambda m, a, o, i=i: cap.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    feats, targets = [], []
    try:
        with torch.inference_mode():
            for s in seqs:
                z = teacher(input_ids=torch.tensor([s])).logits[0].float()
                feats.append(torch.cat([cap["f"][0]] + [cap[i][0] for i in LAYERS], -1).to(torch.float16).clone())
                top, idx = z.topk(k, -1)
                targets.append((idx.to(torch.int32), (top - torch.logsumexp(z, -1, keepdim=True)).exp().half()))
    finally:
        for h in hooks:
            h.remove()
    return feats, targets


def _data(teacher, tok, n_prompts: int, path: Path) -> dict:
    import torch

    from bild_kernels.distill.corpus import chat_ids, generate_corpus
    from bild_kernels.distill.prompts import all_train_prompts, held_out_prompts
    if path.is_file():
        data = torch.load(path)
        if len(data["corpus"]) == n_prompts and data["layers"] == LAYERS:
            return data
    t = time.perf_counter()
    prompts = random.Random(7).sample(all_train_prompts(), n_prompts)
    corpus = generate_corpus(teacher, tok, prompts, max_new_tokens=96, temperature=0.7, seed=7, backend="bild",
                             batch_size=16, log=lambda s: None)
    print(f"corpus: {len(corpus)} answers, {sum(map(len, corpus))} tokens ({time.perf_counter() - t:.0f} s)",
          flush=True)
    feats, targets = _features(teacher, corpus)
    held = torch.load(ROOT / "bench" / "data" / "corpus_eval_smollm2-135m-instruct.pt")
    held_feats, _ = _features(teacher, held)
    pairs = [(x, len(chat_ids(tok, p))) for p, x in zip(held_out_prompts(), held)]
    data = dict(corpus=corpus, feats=feats, targets=targets, held_feats=held_feats, pairs=pairs, layers=LAYERS)
    torch.save(data, path)
    return data


def _with_layers(draft, feats, H: int):
    """Give `draft` a zero-initialised projection of the standardised columns of `feats` after the first H (other
    layers' outputs), added to its input map wherever its input carries them (features wider than H: the verified
    positions)."""
    import torch
    import torch.nn as nn
    a = torch.cat([f[1:, H:] for f in feats]).float()
    draft.register_buffer("aux_mean", a.mean(0))
    draft.register_buffer("aux_std", a.std(0).clamp(min=1e-3))
    draft.aux = nn.Linear(a.shape[1], H, bias=False)
    nn.init.zeros_(draft.aux.weight)
    plain = draft._inp

    def _inp(self, f, next_tokens, noise: float = 0.0):
        if f.shape[-1] == H:  # a chain step: the draft's own feature
            return plain(f, next_tokens, noise)
        z = (f[..., H:].float() - self.aux_mean) / self.aux_std
        if noise > 0:
            z = z + (torch.rand_like(z) - 0.5) * (2 * noise)
        return plain(f[..., :H], next_tokens, noise) + self.aux(z)
    draft._inp = types.MethodType(_inp, draft)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=1200)
    ap.add_argument("--arms", default="ctrl,all")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-every", type=float, default=180.0, help="seconds between held-out evaluations")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default="/tmp/feature_layers_ab.pt", help="corpus, features and targets, kept here")
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}: choose from {sorted(ARMS)}")
    import torch

    import bild_kernels.distill.feature_draft as fd
    from bild_kernels.distill.pipeline import _teacher
    from bild_kernels.models.default import FEATURE_DRAFT_DIR
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok, _ = _teacher(None)
    H = teacher.config.hidden_size
    data = _data(teacher, tok, args.prompts, Path(args.work))
    base_loss = fd.feature_loss

    def loss(draft, ids, f, n, tid, tp, **kw):  # the pipeline's loss; its feature targets are the last layer's
        return base_loss(draft, ids, f, n, tid, tp, target_feats=f[..., :H], **kw)

    for arm in arms:
        use = ARMS[arm]
        cols = torch.tensor(list(range(H)) + [H * (1 + LAYERS.index(i)) + j for i in use for j in range(H)])
        feats = [f[:, cols] for f in data["feats"]]
        held = [f[:, cols] for f in data["held_feats"]]
        draft = fd.FeatureDraft.from_dir(FEATURE_DRAFT_DIR, teacher)
        if use:
            _with_layers(draft, feats, H)

        def measure(d):
            r = fd.feature_agreement(d, held, data["pairs"], depth=2, max_k=2)
            return {"d1": r["d1"], "acc_2": r["acc_2"]}
        draft.eval()
        r = measure(draft)
        print(f"{arm} (layers {use or 'last only'}): step 0 d1 {r['d1']:.4f} acc_2 {r['acc_2']:.4f}", flush=True)
        t = time.perf_counter()
        fd.feature_loss = loss
        try:
            fd.train_feature_draft(draft, data["corpus"], feats, data["targets"], minutes=1e6, max_steps=args.steps,
                                   lr=args.lr, batch_size=8, depth=2, noise=0.1, w_ce=1.0, eval_fn=measure,
                                   eval_every_s=args.eval_every, group_by_length=True,
                                   log=lambda s: print(f"{arm} {s}", flush=True) if s.startswith("eval") else None)
        finally:
            fd.feature_loss = base_loss
        print(f"{arm}: {args.steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`bild distill`: from a large model to a shippable draft directory, in one call.

  1. corpus   — the large model answers the training prompts (sampled, T = 0.7) and the held-out
                prompts (greedy: what the draft is scored against);
  2. targets  — the large model's top-k next-token distribution over its own training text;
  3. train    — a few of its layers, its frozen embedding and head, distilled for `minutes`; or, with
                kind="feature", an EAGLE-style feature draft (`bild_kernels.distill.feature_draft`): one
                layer that reads the large model's last hidden state, trained to predict the next one;
  4. measure  — top-1 agreement with the large model on the held-out continuations;
  5. write    — the draft directory (bild_kernels.models.draft) with a card saying all of the above.
Steps 1–2 are cached in `work_dir` so that a second run only trains.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch


def _teacher(large):
    from transformers import AutoTokenizer

    from bild_kernels.hf import hf_model
    from bild_kernels.models.default import default_large
    source = Path(large) if large is not None else default_large()
    if not source.exists():
        raise FileNotFoundError(f"large model: no such file or directory: {str(source)!r}")
    try:
        model = hf_model(source)
        tok = (AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name) if source.suffix == ".gguf"
               else AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"large model: cannot load {str(source)!r}: {exc}") from None
    return model, tok, source


def _cached(work_dir: Path | None, name: str, make):
    path = work_dir / name if work_dir is not None else None
    if path is not None and path.is_file():
        return torch.load(path)
    value = make()
    if path is not None:
        torch.save(value, path)
    return value


def distill(*, large=None, out, prompts: int = 512, max_new_tokens: int = 96, minutes: float = 15.0,
            init_layers: list[int] | None = None, draft_vocab: int = 8192, threads: int | None = None,
            work_dir=None, bf16: bool | None = None, kind: str = "layers", log=print) -> dict:
    """Train a draft for `large` (default: SmolLM2-135M-Instruct) and write it to `out`; returns its stats.

    `bf16` (default: where it is fast, see `fast_bf16`): the teacher writes the training corpus and its
    targets in bfloat16 and training runs under bfloat16 autocast; the held-out references the draft
    is scored against always come from the teacher in float32.
    kind="feature": a one-layer feature draft initialised from the large model's last layer (init_layers
    is then refused); its teacher features come from bild's executor (bfloat16 where fast) and it always
    trains in float32 (under bfloat16 autocast it does not learn)."""
    from bild_kernels.distill.corpus import chat_ids, generate_corpus
    from bild_kernels.distill.prompts import all_train_prompts, held_out_prompts
    from bild_kernels.distill.train import agreement, build_draft, fast_bf16, frequent_tokens, teacher_targets, train
    from bild_kernels.models import load_model
    from bild_kernels.models.draft import save_draft

    for name, val in (("prompts", prompts), ("max_new_tokens", max_new_tokens)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    if draft_vocab < 0:
        raise ValueError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got {draft_vocab}")
    if kind not in ("layers", "feature"):
        raise ValueError(f"kind must be 'layers' or 'feature', got {kind!r}")
    if kind == "feature" and init_layers is not None:
        raise ValueError("init_layers: a feature draft is one layer initialised from the large model's last")
    train_set = all_train_prompts(prompts)  # refuses more prompts than there are
    if threads is not None:
        torch.set_num_threads(threads)
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    teacher, tok, source = _teacher(large)
    L = teacher.config.num_hidden_layers
    layers = init_layers or [0, 1, 2, L - 1]
    if any(not 0 <= j < L for j in layers):
        raise ValueError(f"init layers {layers} out of range: the large model has {L} layers")
    bf16 = fast_bf16() if bf16 is None else bool(bf16)
    log(f"corpus: {len(train_set)} training prompts, {len(held_out_prompts())} held-out prompts"
        f"{', bfloat16 teacher and training' if bf16 else ''}")
    held = _cached(work, "corpus_eval.pt", lambda: generate_corpus(
        teacher, tok, held_out_prompts(), max_new_tokens=64, temperature=0.0, log=log))
    held_pairs = [(ids, len(chat_ids(tok, p))) for p, ids in zip(held_out_prompts(), held)]
    fast_teacher = copy.deepcopy(teacher).to(torch.bfloat16) if bf16 else teacher
    tag = f"{len(train_set)}_{max_new_tokens}{'_bf16' if bf16 else ''}"
    corpus = _cached(work, f"corpus_train_{tag}.pt", lambda: generate_corpus(
        fast_teacher, tok, train_set, max_new_tokens=max_new_tokens, temperature=0.7,
        batch_size=64 if bf16 else 16, log=log))
    targets = _cached(work, f"targets_{tag}.pt",
                      lambda: teacher_targets(fast_teacher, corpus, k=32, log=log))
    del fast_teacher
    always = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = frequent_tokens(corpus, draft_vocab, always) if draft_vocab else None
    if kind == "feature":
        return _distill_feature(teacher, source, corpus, targets, held_pairs, vocab, minutes, bf16, out, work, log)
    draft = build_draft(teacher, layers)
    t0 = time.perf_counter()
    before = agreement(draft, held_pairs, vocab)
    lr, final_lr_frac = 3e-4, 0.1
    history = train(draft, corpus, targets, minutes=minutes, vocab=vocab, log=log, bf16=bf16, lr=lr,
                    final_lr_frac=final_lr_frac,
                    eval_fn=lambda d: agreement(d, held_pairs, vocab), eval_every_s=max(60.0, minutes * 12))
    acc = agreement(draft, held_pairs, vocab)
    log(f"held-out top-1 agreement {before:.3f} -> {acc:.3f} after {minutes:g} min")
    base, _ = load_model(teacher, dtype=torch.float32)
    n_tokens = sum(len(c) for c in corpus)
    stats = {"agreement": round(acc, 4), "agreement_before": round(before, 4), "minutes": minutes,
             "corpus_sequences": len(corpus), "corpus_tokens": n_tokens, "init_layers": layers,
             "draft_vocab": None if vocab is None else int(vocab.numel()), "history": history,
             "train_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
             "bf16": bf16, "lr": lr, "final_lr": lr * final_lr_frac}
    card = _card(source.name, stats, len(held_pairs))
    save_draft(out, draft.state_dict(), base=base, init_layers=layers, draft_vocab=vocab, base_name=source.name,
               card=card)
    log(f"draft written to {out}")
    return stats


def _distill_feature(teacher, source, corpus, targets, held_pairs, vocab, minutes, bf16, out, work, log) -> dict:
    from bild_kernels.distill.feature_draft import (FeatureDraft, executor_features, feature_agreement,
                                                    feature_stats, teacher_features, train_feature_draft)
    from bild_kernels.models import load_model
    fdtype = torch.bfloat16 if bf16 else torch.float32
    tag = f"{len(corpus)}_{sum(map(len, corpus))}{'_bf16' if bf16 else ''}"
    feats = _cached(work, f"features_{tag}.pt", lambda: executor_features(
        load_model(teacher, dtype=fdtype)[0], corpus, log=log))
    held_feats = _cached(work, "features_eval.pt", lambda: teacher_features(
        teacher, [ids for ids, _ in held_pairs], log=log))
    mean, std = feature_stats(feats)
    draft = FeatureDraft.from_teacher(teacher, n_layers=1, vocab=vocab, feat_mean=mean, feat_std=std)

    def measure(d):
        return feature_agreement(d, held_feats, held_pairs, depth=2, max_k=2)

    t0 = time.perf_counter()
    before = measure(draft)["d1"]
    lr, depth = 2e-3, 2
    history = train_feature_draft(draft, corpus, feats, targets, minutes=minutes, lr=lr, batch_size=8, depth=depth,
                                  noise=0.1, w_ce=1.0, eval_fn=measure, eval_every_s=max(60.0, minutes * 12), log=log)
    acc = history[-1]["d1"]
    log(f"held-out top-1 agreement {before:.3f} -> {acc:.3f} after {minutes:g} min")
    stats = {"kind": "feature", "agreement": round(acc, 4), "agreement_before": round(before, 4),
             "minutes": minutes, "corpus_sequences": len(corpus), "corpus_tokens": sum(map(len, corpus)),
             "init_layers": [teacher.config.num_hidden_layers - 1],
             "draft_vocab": None if vocab is None else int(vocab.numel()),
             "history": [(h["minutes"], h["tokens"], h["d1"]) for h in history],
             "train_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
             "bf16": bf16, "lr": lr, "final_lr": lr * 0.1, "depth": depth}
    base, _ = load_model(teacher, dtype=torch.float32)
    draft.save_dir(out, base, base_name=source.name, card=_card(source.name, stats, len(held_pairs)))
    log(f"draft written to {out}")
    return stats


def _card(base_name: str, s: dict, n_held: int) -> str:
    vocab = "the whole vocabulary" if s["draft_vocab"] is None else f"the {s['draft_vocab']} most frequent corpus tokens"
    precision = ", matrix products in bfloat16 (autocast; teacher corpus and targets too)" if s.get("bf16") else ""
    hist = "\n".join(f"| {m} | {seen} | {acc:.3f} |" for m, seen, acc in s["history"]) or "| - | - | - |"
    if s.get("kind") == "feature":
        head = f"""# Feature draft for {base_name}

An EAGLE-style draft for big-little speculative decoding with bild-kernels, made by `bild distill --kind feature`.

- **Architecture**: fc(standardised large-model feature f_t, next-token embedding) -> one Llama decoder layer
  initialised from the large model's layer {s['init_layers'][0]} -> the large model's final norm and head. It
  reads the large model's last hidden state (before the final norm) at every verified position and predicts the
  next one; while chaining it feeds its own predictions back. The head scores {vocab}.
- **Data**: the large model's own answers (temperature 0.7) to {s['corpus_sequences']} templated chat prompts
  (bild_kernels/distill/prompts.py), {s['corpus_tokens']} tokens with the prompts; features from bild's executor
  ({'bfloat16' if s.get('bf16') else 'float32'}). No external data set.
- **Objective**: smooth-L1 to the next feature (standardised) plus cross-entropy to the large model's top-32
  next-token distribution, unrolled {s['depth']} steps on the draft's own features.
- **Training**: AdamW, lr {s['lr']:g} (cosine to {s['final_lr']:g}), batch 8, float32, {s['minutes']:g} minutes
  on {s['threads']} CPU thread(s).
"""
    else:
        head = ""
    agreement = f"""- **Agreement**: top-1 agreement with the large model's greedy continuations of {n_held} held-out
  prompts (templates and topics training never saw): {s['agreement_before']:.3f} before training,
  **{s['agreement']:.3f}** after.

| minutes | tokens seen | held-out agreement |
|---|---|---|
{hist}
"""
    if head:
        return head + agreement
    return f"""# Draft model for {base_name}

A draft for big-little speculative decoding with bild-kernels, made by `bild distill`.

- **Architecture**: {len(s['init_layers'])} Llama decoder layers initialised from the large model's layers
  {s['init_layers']}, its own final norm; the large model's token embedding and LM head are borrowed at
  load time (frozen during training, not stored here). The head scores {vocab}; any other token is
  never proposed (the verifier supplies it).
- **Data**: the large model's own answers (temperature 0.7) to {s['corpus_sequences']} templated chat
  prompts (instructions, summaries, translations; bild_kernels/distill/prompts.py), {s['corpus_tokens']}
  tokens with the prompts. No external data set.
- **Objective**: cross-entropy to the large model's top-32 next-token distribution at every position.
- **Training**: AdamW, lr {s['lr']:g} (cosine to {s['final_lr']:g} over the time budget), batch 8, {s['minutes']:g} minutes of wall time on {s['threads']} CPU thread(s){precision}.
{agreement}"""

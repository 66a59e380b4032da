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

For a short GPU session: device="cuda" runs the large model and the draft there (bfloat16, larger
batches); `samples_per_prompt` draws more answers from the same prompts; `corpus_minutes` bounds step 1
by wall time; `init_draft` starts from an existing draft (the shipped one) instead of the large model's
layers, so the session's minutes add to the training it already had. The held-out references
(`corpus_eval.pt`) do not depend on the device: a work dir that already holds them skips their generation.
"""
from __future__ import annotations

import copy
import random
import time
from collections import Counter
from pathlib import Path

import torch

from bild_kernels.distill.card import draft_card


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


def _check_device(device, kind: str) -> torch.device:
    """The torch.device for `device`, refused here (before any model is loaded) when it cannot run."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA GPU is usable here (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _init_manifest(init_draft, init_layers, draft_vocab, kind: str = "layers") -> dict:
    """The manifest of the draft to warm-start from, refused when it cannot be (another kind than `kind`, no
    such directory) or when it contradicts `init_layers` / `draft_vocab`."""
    from bild_kernels.models.draft import is_draft_dir, read_manifest
    if not is_draft_dir(init_draft):
        raise FileNotFoundError(f"init_draft: no draft directory (with bild_draft.json) at {str(init_draft)!r}")
    manifest = read_manifest(init_draft)
    if manifest["kind"] != kind:
        raise ValueError(f"init_draft: {str(init_draft)!r} is a {manifest['kind']} draft; a {kind} draft warm-starts "
                         f"from a {kind} draft")
    if init_layers is not None and list(init_layers) != manifest["init_layers"]:
        raise ValueError(f"init_layers {list(init_layers)} conflicts with init_draft {str(init_draft)!r}, whose "
                         f"layers were initialised from {manifest['init_layers']} (leave init_layers out)")
    own = manifest["draft_vocab_size"] or 0
    if draft_vocab is not None and (draft_vocab or None) != (own or None) and not (own and (
            draft_vocab == 0 or draft_vocab > own)):
        raise ValueError(f"draft_vocab {draft_vocab} conflicts with init_draft {str(init_draft)!r}, whose head "
                         f"scores {own or 'the whole vocabulary'}{' tokens' if own else ''}: a warm start keeps its "
                         f"head's tokens and can only add to them (leave draft_vocab out to keep them as they are)")
    return manifest


def _warm_start(draft, init_draft) -> torch.Tensor | None:
    """Copy a draft directory's layers and final norm into `draft` (built with its init layers); returns
    its `draft_vocab` (None: the whole vocabulary)."""
    from safetensors.torch import load_file
    weights = load_file(str(Path(init_draft) / "model.safetensors"))
    vocab = weights.pop("draft_vocab", None)
    with torch.no_grad():
        missing, unexpected = draft.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if unexpected or any(k not in ("model.embed_tokens.weight", "lm_head.weight") for k in missing):
        raise ValueError(f"init_draft: {str(init_draft)!r} does not fit a draft of its manifest "
                         f"(unexpected {unexpected}, missing {missing})")
    return vocab


def distill(*, large=None, out, prompts: int = 512, max_new_tokens: int = 96, minutes: float = 15.0,
            init_layers: list[int] | None = None, draft_vocab: int | None = None, threads: int | None = None,
            work_dir=None, bf16: bool | None = None, kind: str = "layers", device: str = "cpu",
            samples_per_prompt: int = 1, init_draft=None, corpus_minutes: float | None = None, corpus_seed: int = 0,
            corpus_batch_size: int | None = None, train_batch_size: int | None = None, lr: float | None = None,
            feature_layers: int | None = None, self_prompts: int = 0, topic_prompts: int = 0,
            json_prompts: int = 0, corpus_backend: str = "auto", feature_cache: bool = True, log=print) -> dict:
    """Train a draft for `large` (default: SmolLM2-135M-Instruct) and write it to `out`; returns its stats.

    `bf16` (default: where it is fast, see `fast_bf16`): the teacher writes the training corpus and its
    targets in bfloat16 and training runs under bfloat16 autocast; the held-out references the draft
    is scored against always come from the teacher in float32.
    `device` ("cpu" or "cuda"): where the teacher and the draft run (bfloat16 by default on CUDA); the
    corpus and the top-k targets stay on the CPU (and in `work_dir`). CUDA defaults: corpus batches of
    256 answers (CPU: 64 in bfloat16, 16 in float32), training batches of 64 sequences (CPU: 8).
    `corpus_seed`: the sampling seed of the corpus's first pass (pass s is seeded corpus_seed + s): another
    seed gives other answers to the same prompts, e.g. fresh data for a warm start.
    `samples_per_prompt`: every training prompt is answered that many times (T = 0.7, pass s seeded s),
    so more data comes from the same prompts. `corpus_minutes`: the training corpus stops at the first
    batch boundary after that much wall time and the run goes on with what it has (the held-out
    references are always complete).
    `init_draft`: a draft directory to warm-start from (e.g. the shipped one): its layers, final norm,
    layer count and head vocabulary are kept (init_layers, if given, must agree; draft_vocab may grow the head); lr
    then defaults to 2e-4 (3e-4 from scratch), as the shipped draft's warm-started stages used.
    `draft_vocab` (default 8192): the head scores the most frequent corpus tokens (0: the whole vocabulary);
    with `init_draft`, a larger size (or 0) adds the corpus's most frequent tokens its head lacks (`_grow_vocab`).
    `feature_cache=False`: a feature draft's teacher features are not written to `work_dir` (two bytes per
    hidden unit and token: 14 GB for a GPU session's 12.5M tokens, slower to write than to compute there).
    kind="feature": a feature draft of `feature_layers` decoder layers (default 1) initialised from the large
    model's last ones (init_layers is then refused); its teacher features come from bild's executor on `device` (bfloat16 where fast) and
    it always trains in float32 (under bfloat16 autocast it does not learn), on `device` too (lr defaults
    to 2e-3, batches to train_batch_size). With `init_draft` (a feature draft directory, e.g. the shipped
    one) its layers, input map, feature statistics, head vocabulary and policy go on training (lr 1e-3), so
    that short GPU sessions add up (`feature_layers`, if given, must be its layer count).
    `self_prompts`: that many more training prompts written by the large model itself (`generate_self_prompts`,
    Magpie-style: sampled from its chat template's user-turn header; none equal to a held-out prompt), mixed
    with the templated ones (seeded by corpus_seed) before the corpus answers them all. The shipped feature
    draft agreed 0.664 on training prompts' greedy continuations against 0.585 on the held-out ones: the
    templates' narrow variety costs agreement that more varied prompts can buy back.
    `topic_prompts`: that many more training prompts about everyday topics from WordNet (`prompts.topic_prompts`:
    ~10,000 topics, none held out, each under a random training template, seeded by corpus_seed), mixed with
    the others before the corpus answers them all: the held-out misses are word pieces of topics the ~400
    templated ones never name.
    `json_prompts`: that many more prompts asking for JSON about WordNet topics (`prompts.json_prompts`, seeded by
    corpus_seed), mixed in the same way: structured outputs' JSON, which the chat prompts never ask for.
    `corpus_backend`: what writes the training answers and self-written prompts (see `generate_corpus`):
    "bild" (bild's host-free batch decode loop, CUDA graphs; the default on CUDA), "hf" (transformers'
    `generate`; the default on a CPU) or "auto". The held-out references always come from "hf"."""
    from bild_kernels.distill.corpus import _backend, _user_turn, chat_ids, generate_corpus, generate_self_prompts
    from bild_kernels.distill.prompts import all_train_prompts, held_out_prompts, tune_topics
    from bild_kernels.distill.prompts import json_prompts as json_prompt_list
    from bild_kernels.distill.prompts import topic_prompts as wordnet_prompts
    from bild_kernels.distill.train import agreement, build_draft, fast_bf16, teacher_targets, train
    from bild_kernels.models import load_model
    from bild_kernels.models.draft import load_draft, save_draft

    for name, val in (("prompts", prompts), ("max_new_tokens", max_new_tokens),
                      ("samples_per_prompt", samples_per_prompt), ("corpus_batch_size", corpus_batch_size),
                      ("train_batch_size", train_batch_size)):
        if val is None and name.endswith("batch_size"):
            continue
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    for name, val, optional in (("minutes", minutes, False), ("corpus_minutes", corpus_minutes, True),
                                ("lr", lr, True)):
        if not (optional and val is None) and not (isinstance(val, (int, float)) and val > 0):
            raise ValueError(f"{name} must be > 0{' or None' if optional else ''}, got {val!r}")
    if isinstance(corpus_seed, bool) or not isinstance(corpus_seed, int) or corpus_seed < 0:
        raise ValueError(f"corpus_seed must be an int >= 0, got {corpus_seed!r}")
    if isinstance(self_prompts, bool) or not isinstance(self_prompts, int) or self_prompts < 0:
        raise ValueError(f"self_prompts must be an int >= 0, got {self_prompts!r}")
    if draft_vocab is not None and draft_vocab < 0:
        raise ValueError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got {draft_vocab}")
    if kind not in ("layers", "feature"):
        raise ValueError(f"kind must be 'layers' or 'feature', got {kind!r}")
    if kind == "feature" and init_layers is not None:
        raise ValueError("init_layers: a feature draft's layers are initialised from the large model's last ones "
                         "(feature_layers says how many)")
    if not feature_cache and kind != "feature":
        raise ValueError(f"feature_cache=False applies to kind='feature' only (kind is {kind!r}: its cache holds no "
                         f"features)")
    if feature_layers is not None:
        if kind != "feature":
            raise ValueError(f"feature_layers applies to kind='feature' only (kind is {kind!r}; init_layers chooses "
                             "a layers draft's layers)")
        if isinstance(feature_layers, bool) or not isinstance(feature_layers, int) or feature_layers < 1:
            raise ValueError(f"feature_layers must be a positive int, got {feature_layers!r}")
    dev = _check_device(device, kind)
    corpus_backend = _backend(corpus_backend, dev)
    init = _init_manifest(init_draft, init_layers, draft_vocab, kind) if init_draft is not None else None
    if init is not None and feature_layers is not None and feature_layers != init["num_layers"]:
        raise ValueError(f"feature_layers {feature_layers} conflicts with init_draft {str(init_draft)!r}, which has "
                         f"{init['num_layers']} layer(s) (leave feature_layers out)")
    train_set = all_train_prompts(prompts)  # refuses more prompts than there are
    # (refuses a count out of range; never a topic of the tuning set that `bild eval --prompt-set tune` asks)
    topical = wordnet_prompts(topic_prompts, seed=corpus_seed, skip_topics=tune_topics())
    topical += json_prompt_list(json_prompts, seed=corpus_seed, skip_topics=tune_topics())
    if threads is not None:
        torch.set_num_threads(threads)
    teacher, tok, source = _teacher(large)
    from bild_kernels.models.config import MULTIMODAL_TEXT
    if teacher.config.model_type in MULTIMODAL_TEXT:
        raise ValueError(f"large model: {str(source)!r} is an image-text model ({teacher.config.model_type}); bild "
                         f"distill trains drafts for text models (the engine runs this one's language model, and a "
                         f"text model with its tokenizer can draft for it, e.g. Gemma 3 1B or 270M for Gemma 3 4B)")
    if kind == "feature":
        from bild_kernels.distill.feature_model import check_feature_teacher
        check_feature_teacher(teacher)
    if self_prompts:
        _user_turn(tok)  # a tokenizer that cannot frame a user turn is refused before any generation
    L = teacher.config.num_hidden_layers
    n_feature = feature_layers or 1
    layers = init["init_layers"] if init is not None else (init_layers or (list(range(L - n_feature, L))
                                                                           if kind == "feature" else [0, 1, 2, L - 1]))
    if any(not 0 <= j < L for j in layers):
        raise ValueError(f"init layers {layers} out of range: the large model has {L} layers")
    base = None
    if init is not None:  # the checks the engine makes when it loads the result: the same large model
        base, _ = load_model(teacher, dtype=torch.float32)
        load_draft(init_draft, base, who="init_draft")
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    teacher.to(dev)
    bf16 = fast_bf16(dev.type) if bf16 is None else bool(bf16)
    gen_batch = corpus_batch_size or (256 if dev.type == "cuda" else 64 if bf16 else 16)
    train_batch = train_batch_size or (64 if dev.type == "cuda" else 8)
    log(f"corpus: {len(train_set)} templated{f' and {len(topical)} topic' if topical else ''} training prompts"
        f"{f' x {samples_per_prompt} samples' if samples_per_prompt > 1 else ''}, "
        f"{len(held_out_prompts())} held-out prompts{', bfloat16 teacher and training' if bf16 else ''}"
        f"{f' on {_device_name(dev)}' if dev.type != 'cpu' else ''}")
    held = _cached(work, "corpus_eval.pt", lambda: generate_corpus(
        teacher, tok, held_out_prompts(), max_new_tokens=64, temperature=0.0, device=dev, backend="hf", log=log))
    held_pairs = [(ids, len(chat_ids(tok, p))) for p, ids in zip(held_out_prompts(), held)]
    fast_teacher = copy.deepcopy(teacher).to(torch.bfloat16) if bf16 else teacher
    templated, self_written, self_s = len(train_set), [], 0.0
    if topical:
        train_set = train_set + topical
        random.Random(corpus_seed).shuffle(train_set)  # mixed, so that a corpus time budget keeps both kinds
    if self_prompts:
        t_self = time.perf_counter()
        bk = "_bild" if corpus_backend == "bild" else ""
        self_written = _cached(work, f"self_prompts_{self_prompts}{'_bf16' if bf16 else ''}{bk}_seed{corpus_seed}.pt",
                               lambda: generate_self_prompts(
                                   fast_teacher, tok, self_prompts, seed=corpus_seed, batch_size=gen_batch,
                                   exclude=held_out_prompts() + train_set, device=dev, backend=corpus_backend,
                                   log=log))
        self_s = time.perf_counter() - t_self
        log(f"corpus: {len(self_written)} self-written prompts in {self_s:.0f} s, e.g. {self_written[:3]}")
        # mixed, so that a corpus time budget keeps both kinds
        train_set = train_set + self_written
        random.Random(corpus_seed).shuffle(train_set)
    # The corpus is cut by its time budget at an arbitrary point: such a corpus gets a name of its own.
    tag = (f"{len(train_set)}_{max_new_tokens}{'_bf16' if bf16 else ''}"
           f"{f'_self{len(self_written)}' if self_written else ''}"
           f"{f'_topics{len(topical) - json_prompts}' if len(topical) > json_prompts else ''}"
           f"{f'_json{json_prompts}' if json_prompts else ''}"
           f"{f'_x{samples_per_prompt}' if samples_per_prompt > 1 else ''}"
           f"{f'_{corpus_minutes:g}min' if corpus_minutes is not None else ''}"
           f"{f'_seed{corpus_seed}' if corpus_seed else ''}{'_bild' if corpus_backend == 'bild' else ''}")
    t_data = time.perf_counter()
    written = {}  # which backend wrote the corpus (a failing BatchGenerator hands over to HF under "auto")
    corpus = _cached(work, f"corpus_train_{tag}.pt", lambda: generate_corpus(
        fast_teacher, tok, train_set, max_new_tokens=max_new_tokens, temperature=0.7, batch_size=gen_batch,
        samples=samples_per_prompt, max_seconds=None if corpus_minutes is None else corpus_minutes * 60,
        seed=corpus_seed, device=dev, backend=corpus_backend, info=written, log=log))
    corpus_backend = written.get("backend", corpus_backend)
    corpus_s = time.perf_counter() - t_data
    n_tokens = sum(len(c) for c in corpus)
    log(f"corpus: {len(corpus)} answers, {n_tokens} tokens with the prompts, in {corpus_s:.0f} s")
    targets_name = f"targets_{tag}.pt"
    if kind == "feature" and not (work is not None and (work / targets_name).is_file()):
        targets = None  # from the feature draft's pass of the large model over the corpus: one pass for both
    else:
        targets = _cached(work, targets_name, lambda: teacher_targets(
            fast_teacher, corpus, k=32, batch_tokens=16384 if dev.type == "cuda" else 4096, device=dev, log=log))
    targets_s = time.perf_counter() - t_data - corpus_s
    fast_teacher = None  # its memory back (on a GPU too): training reads only the corpus and targets
    corpus_info = {"prompts": templated, "topic_prompts": len(topical) - json_prompts, "json_prompts": json_prompts,
                   "self_prompts": len(self_written),
                   "self_prompts_seconds": round(self_s, 1),
                   "samples_per_prompt": samples_per_prompt, "corpus_seed": corpus_seed,
                   "corpus_minutes": corpus_minutes, "corpus_backend": corpus_backend,
                   "corpus_planned": len(train_set) * samples_per_prompt,
                   "corpus_seconds": round(corpus_s, 1), "targets_seconds": round(targets_s, 1)}
    if kind == "feature":
        vocab = _vocab(corpus, draft_vocab, tok) if init is None else None  # a warm start keeps its own
        return _distill_feature(teacher, source, corpus, targets, held_pairs, vocab, minutes, bf16, out, work, log,
                                feature_cache=feature_cache, targets_name=targets_name,
                                device=dev, batch_size=train_batch, lr=lr, corpus_info=corpus_info,
                                init_draft=init_draft, policy=None if init is None else init.get("policy"),
                                n_layers=len(layers), grow_vocab=draft_vocab if init is not None else None)
    draft = build_draft(teacher, layers)
    own_vocab = _warm_start(draft, init_draft) if init is not None else None
    vocab = _grow_vocab(own_vocab, corpus, draft_vocab, log) if init is not None else _vocab(corpus, draft_vocab, tok)
    grown = ({"draft_vocab_before": int(own_vocab.numel())} if init is not None and vocab is not own_vocab
             else {})  # _grow_vocab grew it (a head of the whole vocabulary never grows)
    draft.to(dev)
    t0 = time.perf_counter()
    before = agreement(draft, held_pairs, vocab, device=dev)
    if init is not None:
        log(f"warm start from {init_draft}: held-out top-1 agreement {before:.3f}")
    lr = lr or (2e-4 if init is not None else 3e-4)
    final_lr_frac = 0.1
    history = train(draft, corpus, targets, minutes=minutes, vocab=vocab, log=log, bf16=bf16, lr=lr,
                    final_lr_frac=final_lr_frac, batch_size=train_batch, device=dev,
                    eval_fn=lambda d: agreement(d, held_pairs, vocab, device=dev),
                    eval_every_s=max(60.0, minutes * 12))
    acc = agreement(draft, held_pairs, vocab, device=dev)
    log(f"held-out top-1 agreement {before:.3f} -> {acc:.3f} after {minutes:g} min")
    if base is None:
        base, _ = load_model(teacher, dtype=torch.float32)
    stats = {"agreement": round(acc, 4), "agreement_before": round(before, 4), "minutes": minutes,
             "corpus_sequences": len(corpus), "corpus_tokens": n_tokens, "init_layers": layers,
             "draft_vocab": None if vocab is None else int(vocab.numel()), "history": history,
             "train_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
             "bf16": bf16, "lr": lr, "final_lr": lr * final_lr_frac, "device": _device_name(dev), **corpus_info,
             "batch_size": train_batch, "init_draft": None if init_draft is None else str(init_draft), **grown}
    card = draft_card(source.name, stats, len(held_pairs))
    save_draft(out, draft.state_dict(), base=base, init_layers=layers, draft_vocab=vocab, base_name=source.name,
               card=card, policy=None if init is None else init.get("policy"))
    log(f"draft written to {out}")
    return stats


def _grow_vocab(vocab: torch.Tensor | None, corpus, n: int | None, log) -> torch.Tensor | None:
    """A warm start's head vocabulary grown to n ids (0: the whole vocabulary) by the most frequent corpus tokens
    it lacks; n None (or its own size) keeps it. The head's rows are the large model's, so nothing new is trained:
    the draft can propose tokens it never could (5.8% of held-out response tokens were outside the first 8,192)."""
    if vocab is None or n is None or n == len(vocab):
        return vocab
    if n == 0:
        log(f"head vocabulary: {len(vocab)} ids -> the whole vocabulary")
        return None
    have = set(vocab.tolist())
    counts = Counter(t for seq in corpus for t in seq if t not in have)
    grown = torch.tensor(sorted(have | {t for t, _ in counts.most_common(n - len(have))}), dtype=vocab.dtype)
    log(f"head vocabulary: {len(vocab)} -> {len(grown)} ids (the corpus's most frequent tokens it lacked)")
    return grown


def _vocab(corpus, draft_vocab: int | None, tok) -> torch.Tensor | None:
    """The head vocabulary of a new draft: the `draft_vocab` (default 8192) most frequent corpus tokens."""
    from bild_kernels.distill.train import frequent_tokens
    n = 8192 if draft_vocab is None else draft_vocab
    always = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return frequent_tokens(corpus, n, always) if n else None


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _distill_feature(teacher, source, corpus, targets, held_pairs, vocab, minutes, bf16, out, work, log, *,
                     device=None, batch_size: int = 8, lr: float | None = None,
                     corpus_info: dict | None = None, init_draft=None, policy: dict | None = None,
                     n_layers: int = 1, feature_cache: bool = True, targets_name: str = "targets.pt",
                     grow_vocab: int | None = None) -> dict:
    """targets None: the large model's top-32 targets come from the pass that computes its features (and are
    cached in `work` under `targets_name`). grow_vocab: a warm start's head vocabulary grows to that many ids
    (`_grow_vocab`)."""
    from bild_kernels.distill.feature_draft import (FeatureDraft, executor_features, feature_agreement,
                                                    feature_stats, teacher_features, train_feature_draft)
    from bild_kernels.models import load_model
    fdtype = torch.bfloat16 if bf16 else torch.float32
    tag = f"{len(corpus)}_{sum(map(len, corpus))}{'_bf16' if bf16 else ''}"
    dev = torch.device(device or "cpu")
    own_vocab = vocab

    def features(targets_k=0):
        return executor_features(load_model(teacher, dtype=fdtype, device=dev)[0], corpus, log=log,
                                 batch_tokens=65536 if dev.type == "cuda" else 8192, targets_k=targets_k)

    feats_name = f"features_{tag}.pt"
    if targets is None:
        t_pass = time.perf_counter()
        feats, targets = features(targets_k=32)
        if corpus_info is not None:
            corpus_info = dict(corpus_info, targets_seconds=round(time.perf_counter() - t_pass, 1),
                               targets_with_features=True)
        if work is not None:
            torch.save(targets, work / targets_name)
            if feature_cache and not (work / feats_name).is_file():
                torch.save(feats, work / feats_name)
    else:
        feats = _cached(work if feature_cache else None, feats_name, features)
    held_feats = _cached(work, "features_eval.pt", lambda: teacher_features(
        teacher, [ids for ids, _ in held_pairs], log=log))
    if init_draft is None:
        mean, std = feature_stats(feats)
        draft = FeatureDraft.from_teacher(teacher, n_layers=n_layers, vocab=vocab, feat_mean=mean,
                                          feat_std=std).to(dev)
    else:  # its layers, input map, feature statistics and head vocabulary go on training
        draft = FeatureDraft.from_dir(init_draft, teacher).to(dev)
        own_vocab = draft.vocab
        draft.vocab = vocab = _grow_vocab(own_vocab, corpus, grow_vocab, log)

    def measure(d):
        return feature_agreement(d, held_feats, held_pairs, depth=2, max_k=2)

    # the large model's executor names the pair in the manifest: loaded before training, so that each evaluation
    # that beats the ones before it is written at once (a run cut short still leaves its best draft)
    base, _ = load_model(teacher, dtype=torch.float32)
    t0 = time.perf_counter()
    before = measure(draft)["d1"]
    grown = {}
    if init_draft is not None and vocab is not own_vocab:  # _grow_vocab grew it
        draft.vocab = own_vocab
        grown = {"draft_vocab_before": int(own_vocab.numel()),
                 "agreement_before_vocab": round(measure(draft)["d1"], 4)}
        draft.vocab = vocab
        log(f"warm start from {init_draft}: held-out top-1 agreement {grown['agreement_before_vocab']:.3f} with its "
            f"own head vocabulary, {before:.3f} with the grown one")
    elif init_draft is not None:
        log(f"warm start from {init_draft}: held-out top-1 agreement {before:.3f}")
    lr, depth = lr or (1e-3 if init_draft is not None else 2e-3), 2
    best: dict = {}

    def checkpoint(d, history):
        h = history[-1]
        if best and h["d1"] <= best["agreement"]:
            return
        best.clear()
        best.update({
            "kind": "feature", "agreement": round(h["d1"], 4), "agreement_before": round(before, 4),
            "minutes": h["minutes"], "minutes_planned": minutes, "evaluations": len(history),
            "corpus_sequences": len(corpus), "corpus_tokens": sum(map(len, corpus)),
            "init_layers": list(range(teacher.config.num_hidden_layers - len(d.layers),
                                      teacher.config.num_hidden_layers)),
            "draft_vocab": None if vocab is None else int(vocab.numel()),
            "history": [(e["minutes"], e["tokens"], e["d1"]) for e in history],
            "train_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
            "bf16": bf16, "lr": lr, "final_lr": lr * 0.1, "depth": depth, "device": _device_name(dev),
            "batch_size": batch_size, "tf32": dev.type == "cuda", "group_by_length": True,
            "init_draft": None if init_draft is None else str(init_draft),
            **grown, **(corpus_info or {})})
        card = draft_card(source.name, best, len(held_pairs))
        _replace_dir(Path(out), lambda path: d.save_dir(path, base, base_name=source.name, card=card, policy=policy))
        log(f"draft written to {out} (held-out top-1 agreement {h['d1']:.3f} at {h['minutes']:g} min)")

    history = train_feature_draft(draft, corpus, feats, targets, minutes=minutes, lr=lr, batch_size=batch_size,
                                  depth=depth, noise=0.1, w_ce=1.0, eval_fn=measure,
                                  eval_every_s=max(60.0, minutes * 12), on_eval=checkpoint, log=log,
                                  group_by_length=True)
    log(f"held-out top-1 agreement {before:.3f} -> {history[-1]['d1']:.3f} after {minutes:g} min; the draft "
        f"written is the best of {len(history)} evaluations ({best['agreement']:.3f} at {best['minutes']:g} min)")
    draft.to("cpu")
    return best


def _replace_dir(out: Path, write) -> None:
    """write(path) into a fresh directory beside `out`, then swap it in: `out` is never half-written."""
    import shutil
    fresh, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    write(fresh)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    fresh.rename(out)
    shutil.rmtree(old, ignore_errors=True)

"""Train a draft model for a large one by distillation, and measure how often it agrees.

The draft is a Llama with a few transformer layers copied from the large model (a better start than
random), sharing the large model's frozen token embedding. Its head may be restricted to the
`draft_vocab` most frequent tokens of the corpus: the head is ~1/5 of a small model's cost, and a
token outside that set is one the verifier simply never accepts from the draft.

Targets are the large model's own distributions over its own text, kept as top-k (ids, probs) per
token, computed once (the teacher never runs again during training).
"""
from __future__ import annotations

import copy
import math
import time
from collections import Counter

import torch
import torch.nn.functional as F

from bild_kernels._backend import cpu_has_amx
from bild_kernels.distill.corpus import model_device


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bfloat16 matrix products beat float32 here: any CUDA device, or a CPU with AMX or
    AVX512-BF16 (measured on a Sapphire Rapids core: 680 vs 181 GFLOP/s at 1024 x 576 x 1536)."""
    if str(device).startswith("cuda"):
        return True
    return cpu_has_amx() or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def build_draft(teacher, init_layers: list[int]):
    """A model of the teacher's own family (Llama, Mistral, Qwen2 with its biases, Qwen3 with its per-head q/k
    norms) with len(init_layers) layers copied from the teacher's, sharing its embedding; each layer keeps the
    attention kind (full or sliding) of the teacher's layer it copies, as the engine runs it."""
    from transformers import AutoModelForCausalLM
    spec = teacher.config.to_dict()
    spec["num_hidden_layers"] = len(init_layers)
    types = getattr(teacher.config, "layer_types", None)
    if types:
        spec["layer_types"] = [types[j] for j in init_layers]
    cfg = type(teacher.config).from_dict(spec)
    draft = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    src = teacher.model
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(src.embed_tokens.weight)
        draft.model.norm.weight.copy_(src.norm.weight)
        for i, j in enumerate(init_layers):
            draft.model.layers[i].load_state_dict(copy.deepcopy(src.layers[j].state_dict()))
        if not cfg.tie_word_embeddings:
            draft.lm_head.weight.copy_(teacher.lm_head.weight)
    draft.model.embed_tokens.weight.requires_grad_(False)
    draft.lm_head.weight.requires_grad_(False)
    return draft


def frequent_tokens(corpus: list[list[int]], n: int, always: list[int]) -> torch.Tensor:
    """The n most frequent token ids of the corpus plus `always` (EOS, ...), sorted."""
    counts = Counter(t for seq in corpus for t in seq)
    ids = set(always) | {t for t, _ in counts.most_common(n)}
    return torch.tensor(sorted(ids)[: max(n, len(always))] if len(ids) > n else sorted(ids))


@torch.inference_mode()
def teacher_targets(teacher, corpus: list[list[int]], k: int = 32, batch_tokens: int = 4096, device=None,
                    log=print):
    """Per sequence: (top-k ids [L, k] int32, top-k probs [L, k] fp16) of the teacher's next-token distribution.

    Sequences are grouped by length into batches of at most `batch_tokens` (padded) tokens; the teacher
    runs on `device` (see `model_device`; on a GPU ~16k tokens per batch keep it busy) and the targets
    are kept on the CPU, where training reads them."""
    dev = model_device(teacher, device)
    t0 = last_log = time.perf_counter()
    done = 0
    order = sorted(range(len(corpus)), key=lambda i: len(corpus[i]))
    res = [None] * len(corpus)
    i = 0
    while i < len(order):
        group = [order[i]]
        while i + len(group) < len(order) and (len(group) + 1) * len(corpus[order[i + len(group)]]) <= batch_tokens:
            group.append(order[i + len(group)])
        width = max(len(corpus[g]) for g in group)
        ids = torch.tensor([corpus[g] + [0] * (width - len(corpus[g])) for g in group], device=dev)
        mask = torch.tensor([[1] * len(corpus[g]) + [0] * (width - len(corpus[g])) for g in group], device=dev)
        logits = teacher(ids, attention_mask=mask).logits.float()  # [B, W, V]
        p, idx = torch.softmax(logits, -1).topk(k, dim=-1)  # [B, W, k]
        idx, p = idx.to("cpu", torch.int32), p.to("cpu", torch.float16)  # one copy per batch, not per row
        for row, g in enumerate(group):
            n = len(corpus[g])
            res[g] = (idx[row, :n].clone(), p[row, :n].clone())  # own storage: saved without the padding
        done += sum(len(corpus[g]) for g in group)
        i += len(group)
        if i == len(order) or time.perf_counter() - last_log > 5.0:
            log(f"teacher targets: {done} tokens, {done / (time.perf_counter() - t0):.0f} tok/s")
            last_log = time.perf_counter()
    return res


def _batch(corpus, targets, idxs, draft_vocab_map, device):
    width = max(len(corpus[i]) for i in idxs)
    ids = torch.zeros(len(idxs), width, dtype=torch.long)
    mask = torch.zeros(len(idxs), width, dtype=torch.long)
    k = targets[idxs[0]][0].shape[1]
    tid = torch.zeros(len(idxs), width, k, dtype=torch.long)
    tp = torch.zeros(len(idxs), width, k)
    for r, i in enumerate(idxs):
        n = len(corpus[i])
        ids[r, :n] = torch.tensor(corpus[i])
        mask[r, :n] = 1
        tid[r, :n] = targets[i][0].long()
        tp[r, :n] = targets[i][1].float()
    ids, mask, tid, tp = (t.to(device, non_blocking=True) for t in (ids, mask, tid, tp))
    if draft_vocab_map is not None:  # teacher ids outside the draft vocabulary carry no target mass
        mapped = draft_vocab_map[tid]
        tp = torch.where(mapped >= 0, tp, torch.zeros_like(tp))
        tid = mapped.clamp(min=0)
    return ids, mask, tid, tp


def draft_logits(draft, ids, mask, vocab: torch.Tensor | None):
    hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state
    head = draft.lm_head.weight if vocab is None else draft.lm_head.weight[vocab.to(hidden.device)]
    return hidden @ head.T


def train(draft, corpus, targets, *, minutes: float, lr: float = 3e-4, batch_size: int = 8, vocab=None,
          eval_fn=None, eval_every_s: float = 300.0, log=print, seed: int = 0, bf16: bool = False,
          final_lr_frac: float = 1.0, device=None):
    """Distil for `minutes` of wall time (cross-entropy against the teacher's top-k distribution).

    `bf16`: run the forward and backward matrix products in bfloat16 (autocast; the weights and the
    optimizer stay float32), ~3x the tokens per second on a CPU with AMX (see `fast_bf16`).
    `final_lr_frac` < 1: the learning rate follows a cosine over the wall-time budget down to that
    fraction of `lr` (the budget is time, so the schedule is too).
    `device`: where the draft trains (see `model_device`); each batch is built on the CPU from the
    corpus and its targets, then moved there."""
    if not 0.0 < final_lr_frac <= 1.0:
        raise ValueError(f"final_lr_frac must be in (0, 1], got {final_lr_frac!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dev = model_device(draft, device)
    g = torch.Generator().manual_seed(seed)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vmap = None
    if vocab is not None:
        vmap = torch.full((draft.config.vocab_size,), -1, dtype=torch.long)
        vmap[vocab] = torch.arange(len(vocab))
        vmap, vocab = vmap.to(dev), vocab.to(dev)
    log_every = 20 if dev.type == "cpu" else 200  # a GPU step is ~100x faster: keep the log readable
    t0 = last_eval = time.perf_counter()
    step, seen, history = 0, 0, []
    draft.train()
    while (done := (time.perf_counter() - t0) / (minutes * 60)) < 1.0:
        for group in opt.param_groups:
            group["lr"] = lr * (final_lr_frac + (1 - final_lr_frac) * 0.5 * (1 + math.cos(math.pi * done)))
        idxs = torch.randint(len(corpus), (batch_size,), generator=g).tolist()
        ids, mask, tid, tp = _batch(corpus, targets, idxs, vmap, dev)
        with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = draft_logits(draft, ids, mask, vocab)
        logp = F.log_softmax(logits.float(), -1)
        loss_tok = -(tp * logp.gather(-1, tid)).sum(-1)
        loss = (loss_tok * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen += sum(len(corpus[i]) for i in idxs)  # = mask.sum(), without waiting for the device
        if step % log_every == 0:
            el = time.perf_counter() - t0
            log(f"step {step} loss {loss.item():.3f} tokens {seen} ({seen / el:.0f} tok/s) {el / 60:.1f} min"
                f" lr {opt.param_groups[0]['lr']:.2e}")
        if eval_fn is not None and time.perf_counter() - last_eval > eval_every_s:
            draft.eval()
            acc = eval_fn(draft)
            draft.train()
            history.append((round((time.perf_counter() - t0) / 60, 2), seen, acc))
            log(f"held-out top-1 agreement {acc:.3f}")
            last_eval = time.perf_counter()
    draft.eval()
    return history


@torch.inference_mode()
def agreement(draft, eval_corpus: list[tuple[list[int], int]], vocab=None, device=None) -> float:
    """Top-1 agreement on the large model's greedy continuations: (ids, prompt_len) pairs; at every
    response position the large model's argmax is the next token of its own greedy output.
    `device`: where the draft runs (see `model_device`)."""
    dev = model_device(draft, device)
    vocab = None if vocab is None else vocab.to(dev)
    hits = total = 0
    for ids, plen in eval_corpus:
        x = torch.tensor([ids], device=dev)
        logits = draft_logits(draft, x, torch.ones_like(x), vocab)[0]
        pred = logits.argmax(-1)
        if vocab is not None:
            pred = vocab[pred]
        nxt = x[0, plen:]
        hits += int((pred[plen - 1:-1] == nxt).sum())
        total += len(nxt)
    return hits / max(total, 1)

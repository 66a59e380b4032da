"""Training and evaluating a feature draft (bild_kernels.distill.feature_model): the EAGLE loss, the training loop,
the held-out agreement, the step cost; the model and the data are re-exported here, where callers import them."""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from bild_kernels.distill.feature_data import (PackedCorpus, _batch, executor_features, feature_stats,
                                              length_grouped_batches, teacher_features, vocab_map)
from bild_kernels.distill.feature_model import FeatureDraft, teacher_config

__all__ = ["FeatureDraft", "PackedCorpus", "executor_features", "feature_agreement", "feature_loss", "feature_stats",
           "length_grouped_batches", "matmul_tf32", "step_cost", "teacher_config", "teacher_features",
           "teacher_self_agreement", "train_feature_draft", "vocab_map"]


# ---------------------------------------------------------------------------------------- training

def feature_loss(draft, ids, f, n, tid, tp, *, depth: int = 1, noise: float = 0.0, w_reg: float = 1.0,
                 w_ce: float = 0.1, depth_decay: float = 0.8, detach: bool = False, target_feats=None):
    """EAGLE loss: smooth-L1 between predicted and true next features (in standardised units) plus
    cross-entropy to the teacher's (top-k) next-token distribution, averaged over valid positions;
    chain steps 2..depth weighted by depth_decay**(j-1). Returns (loss, dict of parts), the parts detached 0-d
    tensors: reading one waits for the device, so a training loop reads them only when it logs.
    target_feats: the features the predictions are compared with, where the draft's input `f` carries more than
    them (python/tools/feature_layers_ab.py: other layers' hidden states beside the last one's); default `f`."""
    B, T, _ = f.shape
    dev = f.device
    outs = draft.chains(f, ids, depth, noise=noise, detach=detach)
    ar = torch.arange(T, device=dev)
    total, parts = 0.0, {}
    tf = f if target_feats is None else target_feats
    for j, pred in enumerate(outs, start=1):
        valid = (ar[None, :] + j) < n[:, None]  # predicts f_{s+j}, needs x_{s+j}
        tgt = torch.cat([tf[:, j:], tf.new_zeros(B, j, tf.shape[2])], 1)
        tgt_id = torch.cat([tid[:, j:], tid.new_zeros(B, j, tid.shape[2])], 1)
        tgt_p = torch.cat([tp[:, j:], tp.new_zeros(B, j, tp.shape[2])], 1)
        m = valid.float()
        reg = F.smooth_l1_loss((pred - tgt) / draft.feat_std, torch.zeros_like(pred), reduction="none").mean(-1)
        logp = F.log_softmax(draft.logits(pred), -1)
        ce = -(tgt_p * logp.gather(-1, tgt_id)).sum(-1)
        reg_m, ce_m = (reg * m).sum() / m.sum(), (ce * m).sum() / m.sum()
        total = total + depth_decay ** (j - 1) * (w_reg * reg_m + w_ce * ce_m)
        parts[f"reg{j}"], parts[f"ce{j}"] = reg_m.detach(), ce_m.detach()
    return total, parts


@contextlib.contextmanager
def matmul_tf32(on: bool):
    """CUDA float32 matrix products on TF32 tensor cores (inputs rounded to a 10-bit mantissa, float32 sums) inside,
    or not; the setting before is back after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def train_feature_draft(draft, corpus, feats, targets, *, minutes: float, lr: float = 1e-3, batch_size: int = 8,
                        depth: int = 1, noise: float = 0.1, w_reg: float = 1.0, w_ce: float = 0.1,
                        warmup: int = 50, eval_fn=None, eval_every_s: float = 300.0, on_eval=None, log=print,
                        seed: int = 0, max_steps: int | None = None, detach: bool = False,
                        group_by_length: bool = False, tf32: bool = True):
    """Train for `minutes` of wall time (teacher-forced on the true features, `depth`-step unrolled).
    Train in float32: under bfloat16 autocast the draft, which works in the large model's raw residual
    space (a few dimensions in the thousands), does not learn at all (measured: held-out d1 stayed at the
    untrained 0.009 while float32 reached 0.42 in 3 minutes on the same 2,000 answers).
    tf32: on a GPU the products of training run on TF32 tensor cores (the held-out evaluations in float32). The
    outputs stay float32, only the products' inputs are rounded, which the draft does not mind: emulated on a CPU
    (both inputs of every forward and backward product rounded as cuBLAS does), 200 steps from scratch on 256
    answers logged a loss within 0.013 of float32's at every 20th step and reached held-out d1 0.291 against
    float32's 0.293 (bfloat16 autocast: 0.009).
    group_by_length: batches of similar lengths (`length_grouped_batches`) instead of uniform ones.
    eval_fn(draft) -> dict is called every eval_every_s (and at the end); on_eval(draft, history)
    after each evaluation (e.g. to save the best checkpoint). The draft trains where its parameters are (a
    CUDA device too); the corpus, features and targets stay on the CPU and go over batch by batch.
    Returns the eval history."""
    g = torch.Generator().manual_seed(seed)
    dev = draft.fc.weight.device
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    vmap = vocab_map(draft.vocab, draft.cfg["vocab_size"])
    # on a GPU the batches come from device-resident copies (on a CPU the host loop is as fast)
    packed = PackedCorpus(corpus, feats, targets, vmap, dev) if dev.type == "cuda" else None
    lengths = [len(c) for c in corpus]  # a step's tokens and padding from the host: no step waits for the device
    grouped = length_grouped_batches(lengths, batch_size, g) if group_by_length else None
    t0 = last_eval = time.perf_counter()
    step, seen, padded, history = 0, 0, 0, []
    budget = minutes * 60

    def run_eval():
        draft.eval()
        with matmul_tf32(False):
            res = eval_fn(draft)
        draft.train()
        el = time.perf_counter() - t0
        history.append({"minutes": round(el / 60, 2), "step": step, "tokens": seen, **res})
        log(f"eval @ {el / 60:.1f} min step {step}: " + " ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
        if on_eval is not None:
            on_eval(draft, history)

    draft.train()
    with matmul_tf32(tf32):  # the evaluations inside turn it off for themselves
        while time.perf_counter() - t0 < budget and (max_steps is None or step < max_steps):
            frac = min(1.0, (time.perf_counter() - t0) / budget)
            cur = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for grp in opt.param_groups:
                grp["lr"] = cur
            idxs = (next(grouped) if grouped is not None
                    else torch.randint(len(corpus), (batch_size,), generator=g).tolist())
            if packed is not None:
                ids, f, n, tid, tp = packed.batch(idxs)
            else:
                ids, f, n, tid, tp = _batch(corpus, feats, targets, idxs, vmap)
            loss, parts = feature_loss(draft, ids, f, n, tid, tp, depth=depth, noise=noise, w_reg=w_reg, w_ce=w_ce,
                                       detach=detach)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            lens = [lengths[i] for i in idxs]
            seen, padded = seen + sum(lens), padded + len(lens) * max(lens)
            if step % 20 == 0:
                el = time.perf_counter() - t0
                log(f"step {step} loss {loss.item():.4f} " + " ".join(f"{k} {float(v):.3f}" for k, v in parts.items())
                    + f" lr {cur:.2e} tokens {seen} ({seen / el:.0f} tok/s, {1 - seen / padded:.0%} padding) "
                    f"{el / 60:.1f} min")
            if eval_fn is not None and time.perf_counter() - last_eval > eval_every_s:
                run_eval()
                last_eval = time.perf_counter()
        if eval_fn is not None:
            run_eval()
    draft.eval()
    return history


# -------------------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def feature_agreement(draft, eval_feats: list[torch.Tensor], eval_corpus: list[tuple[list[int], int]],
                      depth: int = 4, max_k: int = 5) -> dict:
    """Held-out top-1 agreement of the draft with the large model's greedy text.

    eval_corpus: (ids, prompt_len) pairs of greedy continuations; eval_feats: the teacher's features
    on them. A chain starts at position s (true features f_0..f_s, token x_{s+1} known, as right after
    a verification whose last token is x_{s+1}); its j-th draft token predicts x_{s+j+1}, with the
    draft's own features fed back after the first step and the true tokens x_{s+2}.. fed in (they are
    the draft's own tokens wherever the chain is still being accepted).

    Returns: `d1` agreement at depth 1 over every response token x_m (m >= prompt_len, from start
    m-2); for starts whose targets x_{s+1+j}, j = 1..D (D = max(depth, max_k)) are all response tokens
    in the text and s >= prompt_len-1: `dj` the unconditional agreement at depth j, `cj` the agreement at depth j given
    depths 1..j-1 agreed, and `acc_k` = E[accepted draft tokens] under greedy verification of a
    chain of k (the verifier then adds one token of its own: tokens per pass = 1 + acc_k)."""
    D = max(depth, max_k)
    dev = draft.fc.weight.device
    d1_hit = d1_n = 0
    hits = []
    for (ids, plen), f in zip(eval_corpus, eval_feats):
        T = len(ids)
        x = torch.tensor([ids], device=dev)
        outs = draft.chains(f[None].to(dev, torch.float32), x, D)
        preds = [draft.to_ids(draft.logits(o[0]).argmax(-1)) for o in outs]  # preds[j-1][s] -> x_{s+j+1}
        # depth 1 over all response tokens
        m = torch.arange(max(plen, 2), T, device=dev)
        d1_hit += int((preds[0][m - 2] == x[0, m]).sum())
        d1_n += len(m)
        # chains: start s = plen-1 (the prefill's last position; x_plen is the large model's own
        # token) onwards, with s+D+1 <= T-1
        starts = torch.arange(max(plen - 1, 0), T - D - 1, device=dev)
        if len(starts) == 0:
            continue
        h = torch.stack([preds[j - 1][starts] == x[0, starts + j + 1] for j in range(1, D + 1)], 1)  # [S, D]
        hits.append(h)
    out = {"d1": d1_hit / max(d1_n, 1), "n_d1": d1_n}
    if hits:
        h = torch.cat(hits).float()
        prefix = torch.cumprod(h, 1)  # all of 1..j agreed
        out["n_chains"] = h.shape[0]
        for j in range(1, depth + 1):
            out[f"d{j}" if j > 1 else "d1_chain"] = float(h[:, j - 1].mean())
        for j in range(2, depth + 1):
            prev = prefix[:, j - 2]
            out[f"c{j}"] = float((prefix[:, j - 1].sum() / prev.sum().clamp(min=1)))
        for k in range(1, max_k + 1):
            out[f"acc_{k}"] = float(prefix[:, :k].sum(1).mean())
    return out


@torch.inference_mode()
def teacher_self_agreement(teacher, eval_feats, eval_corpus) -> float:
    """The ceiling: how often the teacher's own argmax (from the cached features) is the next token."""
    hit = n = 0
    norm, head = teacher.model.norm, teacher.get_output_embeddings()
    for (ids, plen), f in zip(eval_corpus, eval_feats):
        pred = head(norm(f.float())).argmax(-1)
        hit += int((pred[plen - 1:-1] == torch.tensor(ids[plen:])).sum())
        n += len(ids) - plen
    return hit / max(n, 1)


@torch.inference_mode()
def step_cost(draft, teacher, context: list[int], n: int = 64, warm: int = 8) -> dict:
    """Seconds per batch-1 decode step: the draft's `step` (fc + layers + head) vs the teacher's HF
    forward of one token with its KV cache, both after a prefill of `context`."""
    from transformers import DynamicCache
    ids = torch.tensor([context])
    cache = DynamicCache()
    cap = {}
    hook = teacher.model.norm.register_forward_pre_hook(lambda m, a: cap.__setitem__("f", a[0]))
    out = teacher(ids, past_key_values=cache, use_cache=True)
    hook.remove()
    feats = cap["f"][0]
    tok = int(out.logits[0, -1].argmax())
    times = []
    for i in range(n + warm):
        t = time.perf_counter()
        out = teacher(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        times.append(time.perf_counter() - t)
    t_teacher = sorted(times[warm:])[len(times[warm:]) // 2]
    dcache = [None] * len(draft.layers)
    for p in range(len(context) - 1):
        draft.step(feats[p], context[p + 1], p, dcache)
    f, pos, tok = feats[-1], len(context) - 1, context[-1]
    times = []
    for i in range(n + warm):
        t = time.perf_counter()
        f, lg = draft.step(f, tok, pos, dcache)
        tok = int(draft.to_ids(lg.argmax()))
        pos += 1
        times.append(time.perf_counter() - t)
    t_draft = sorted(times[warm:])[len(times[warm:]) // 2]
    return {"teacher_s": t_teacher, "draft_s": t_draft, "c": t_draft / t_teacher}

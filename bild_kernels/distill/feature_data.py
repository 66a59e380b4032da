"""The feature draft's training data: the teacher's features and top-k targets over a corpus (transformers' model or
bild's executor), their statistics, and the padded batches and length-grouped batch order training reads."""
from __future__ import annotations

import time

import torch


# ---------------------------------------------------------------------------------------- features

@torch.inference_mode()
def teacher_features(teacher, corpus: list[list[int]], batch_tokens: int = 4096, cache_path: str | None = None,
                     log=print) -> list[torch.Tensor]:
    """Per sequence: the teacher's last-layer hidden state (input of its final norm), fp16 [L, H].
    Loaded from / saved to `cache_path` if given (checked against the corpus lengths)."""
    if cache_path is not None:
        try:
            cached = torch.load(cache_path)
            if [len(s) for s in corpus] == [f.shape[0] for f in cached]:
                return cached
        except FileNotFoundError:
            pass
    cap = {}
    hook = teacher.model.norm.register_forward_pre_hook(lambda m, a: cap.__setitem__("f", a[0]))
    try:
        order = sorted(range(len(corpus)), key=lambda i: len(corpus[i]))
        res, i, t0, done = [None] * len(corpus), 0, time.perf_counter(), 0
        while i < len(order):
            group = [order[i]]
            while (i + len(group) < len(order)
                   and (len(group) + 1) * len(corpus[order[i + len(group)]]) <= batch_tokens):
                group.append(order[i + len(group)])
            width = max(len(corpus[g]) for g in group)
            dev = teacher.model.embed_tokens.weight.device
            ids = torch.tensor([corpus[g] + [0] * (width - len(corpus[g])) for g in group], device=dev)
            mask = torch.tensor([[1] * len(corpus[g]) + [0] * (width - len(corpus[g])) for g in group], device=dev)
            teacher.model(input_ids=ids, attention_mask=mask)
            for row, g in enumerate(group):
                res[g] = cap["f"][row, :len(corpus[g])].to("cpu", torch.float16).clone()
            done += sum(len(corpus[g]) for g in group)
            i += len(group)
            log(f"teacher features: {done} tokens, {done / (time.perf_counter() - t0):.0f} tok/s")
    finally:
        hook.remove()
    if cache_path is not None:
        torch.save(res, cache_path)
    return res


@torch.inference_mode()
def executor_features(executor, corpus: list[list[int]], batch_tokens: int = 8192, block_size: int = 16,
                      log=print, targets_k: int = 0, head_rows: int = 4096):
    """`teacher_features` computed by bild's own executor (`load_model(teacher, dtype=...)`): per sequence the
    last-layer hidden state before the final norm, fp16 [L, H]. In bfloat16 on a CPU with AMX this is ~10x
    faster than transformers' float32 forward of a dequantised GGUF model (measured: 2,760 tok/s on 2 threads,
    1.9% relative error).
    targets_k > 0: also `teacher_targets`' top-k next-token distribution of every position, from the same pass
    (the head over `head_rows` positions at a time): returns (features, targets). On an H100 the two passes took
    53 and 67 s for a GPU session's 12.5M tokens."""
    from bild_kernels.models import AttentionMetadata
    order = sorted(range(len(corpus)), key=lambda i: len(corpus[i]))
    res, caches, i, t0, done = [None] * len(corpus), None, 0, time.perf_counter(), 0
    targets = [None] * len(corpus)
    while i < len(order):
        group, tot = [order[i]], len(corpus[order[i]])
        while i + len(group) < len(order) and tot + len(corpus[order[i + len(group)]]) <= batch_tokens:
            tot += len(corpus[order[i + len(group)]])
            group.append(order[i + len(group)])
        lens = [len(corpus[g]) for g in group]
        nblk = [-(-n // block_size) for n in lens]
        if caches is None or caches[0][0].shape[0] < sum(nblk):
            caches = executor.allocate_kv_cache(max(sum(nblk), batch_tokens // block_size + len(group)), block_size)
        table = torch.zeros(len(group), max(nblk), dtype=torch.int32)
        first = 0
        for r, n in enumerate(nblk):
            table[r, :n] = torch.arange(first, first + n, dtype=torch.int32)
            first += n
        meta = AttentionMetadata.build(lens, lens, table.to(executor.device), block_size)
        ids = torch.tensor([t for g in group for t in corpus[g]], dtype=torch.int64, device=executor.device)
        _, hidden = executor.forward(ids, meta, caches, logits_indices=torch.zeros(0, dtype=torch.int64,
                                                                                   device=executor.device),
                                     return_hidden=True)
        for g, h in zip(group, hidden.split(lens)):
            res[g] = h.to("cpu", torch.float16).clone()
        if targets_k:
            idx, prob = _top_k_targets(executor, hidden, targets_k, head_rows)
            for g, t, q in zip(group, idx.split(lens), prob.split(lens)):
                targets[g] = (t.clone(), q.clone())
        done += sum(lens)
        i += len(group)
        log(f"teacher features{' and targets' if targets_k else ''}: {done} tokens, "
            f"{done / (time.perf_counter() - t0):.0f} tok/s")
    return (res, targets) if targets_k else res


@torch.inference_mode()
def _top_k_targets(executor, hidden: torch.Tensor, k: int, head_rows: int):
    """The executor's top-k next-token probabilities at every row of `hidden` (its stream before the final norm):
    (ids [T, k] int32, probs [T, k] fp16) on the CPU, as `teacher_targets` gives them; the head's logits exist for
    `head_rows` rows at a time."""
    ids, probs = [], []
    for h in hidden.split(head_rows):
        z = executor.head_logits(h).float()
        top, idx = z.topk(k, dim=-1)
        probs.append((top - torch.logsumexp(z, -1, keepdim=True)).exp().to("cpu", torch.float16))
        ids.append(idx.to("cpu", torch.int32))
    return torch.cat(ids), torch.cat(probs)


def feature_stats(feats: list[torch.Tensor], skip_first: bool = True):
    """Per-dimension mean and std of the features (the first position, BOS/attention-sink, skipped)."""
    x = torch.cat([f[1:] if skip_first else f for f in feats]).float()
    return x.mean(0), x.std(0).clamp(min=1e-3)


# ---------------------------------------------------------------------------------------- training

def _batch(corpus, feats, targets, idxs, vmap):
    width = max(len(corpus[i]) for i in idxs)
    B, H = len(idxs), feats[idxs[0]].shape[1]
    ids = torch.zeros(B, width, dtype=torch.long)
    f = torch.zeros(B, width, H)
    n = torch.zeros(B, dtype=torch.long)
    k = targets[idxs[0]][0].shape[1] if targets is not None else 1
    tid = torch.zeros(B, width, k, dtype=torch.long)
    tp = torch.zeros(B, width, k)
    for r, i in enumerate(idxs):
        L = len(corpus[i])
        ids[r, :L] = torch.tensor(corpus[i])
        f[r, :L] = feats[i].float()
        n[r] = L
        if targets is not None:
            tid[r, :L] = targets[i][0].long()
            tp[r, :L] = targets[i][1].float()
    if vmap is not None:
        mapped = vmap[tid]
        tp = torch.where(mapped >= 0, tp, torch.zeros_like(tp))
        tid = mapped.clamp(min=0)
    return ids, f, n, tid, tp


class PackedCorpus:
    """The corpus, features and targets as flat tensors on the training device, so that a step's batch is a
    few gathers there instead of a Python loop over sequences on the host and a copy per step (~10 ms of a
    ~42 ms step for 64 sequences on the GPU run of 2026-11-26b). `batch(idxs)` returns exactly what `_batch`
    does (zero padding included), on the device. Features stay float16 ([N, H]: 3.4 GB for 3M tokens of
    SmolLM2) and the top-k ids int32."""

    def __init__(self, corpus, feats, targets, vmap, device):
        dev = torch.device(device)
        self.host_lens = [len(c) for c in corpus]  # a batch's width and token count without reading the device
        lens = torch.tensor(self.host_lens, dtype=torch.long)
        self.lens = lens.to(dev)
        self.starts = (torch.cumsum(lens, 0) - lens).to(dev)
        self.ids = torch.tensor([t for c in corpus for t in c], dtype=torch.long, device=dev)
        self.feats = torch.cat([f.to(torch.float16) for f in feats]).to(dev)
        # _batch pads (and without targets fills) the ids with 0 before mapping them into the head's ids
        self.pad_id = 0 if vmap is None else max(int(vmap[0]), 0)
        if targets is None:
            self.tid = torch.full((len(self.ids), 1), self.pad_id, dtype=torch.int32, device=dev)
            self.tp = torch.zeros(len(self.ids), 1, dtype=torch.float16, device=dev)
        else:
            tid = torch.cat([t[0] for t in targets]).long()
            tp = torch.cat([t[1] for t in targets]).to(torch.float16)
            if vmap is not None:  # the head's own ids; tokens outside it carry no target mass
                mapped = vmap[tid]
                tp = torch.where(mapped >= 0, tp, torch.zeros_like(tp))
                tid = mapped.clamp(min=0)
            self.tid, self.tp = tid.to(torch.int32).to(dev), tp.to(dev)

    def batch(self, idxs):
        sel = torch.as_tensor(idxs, dtype=torch.long, device=self.lens.device)
        n = self.lens[sel]
        width = max(self.host_lens[i] for i in idxs)
        ar = torch.arange(width, device=sel.device)
        valid = ar[None, :] < n[:, None]  # [B, W]
        pos = torch.where(valid, self.starts[sel][:, None] + ar[None, :], 0)
        keep = valid[..., None]
        ids = torch.where(valid, self.ids[pos], 0)
        f = torch.where(keep, self.feats[pos].float(), 0.0)
        tid = torch.where(keep, self.tid[pos].long(), self.pad_id)
        tp = torch.where(keep, self.tp[pos].float(), 0.0)
        return ids, f, n, tid, tp


def vocab_map(vocab, vocab_size):
    if vocab is None:
        return None
    vmap = torch.full((vocab_size,), -1, dtype=torch.long)
    vmap[vocab] = torch.arange(len(vocab))
    return vmap


def length_grouped_batches(lens: list[int], batch_size: int, g: torch.Generator, pool: int = 16):
    """Endless batches of indices into `lens` that pad little: the indices come in random orders (one permutation
    of all of them after another), `pool` batches' worth at a time is sorted by length and cut into batches of
    neighbours, and those go out in random order (HF Trainer's `group_by_length`). A batch pads its sequences to
    its longest: on the CPU, batches of 8 from 256 answers of up to 64 tokens padded 7% of their tokens uniform and
    2% grouped, and 200 steps from scratch reached the same held-out agreement (0.292 and 0.290 grouped, 0.293 and
    0.290 uniform, two seeds each); a GPU run's batches of 64 pad more (its log says how much). A corpus of fewer
    than `pool` batches pools what it has."""
    pool = max(1, min(pool, len(lens) // batch_size))
    stream: list[int] = []
    while True:
        while len(stream) < batch_size * pool:
            stream += torch.randperm(len(lens), generator=g).tolist()
        window, stream = sorted(stream[:batch_size * pool], key=lens.__getitem__), stream[batch_size * pool:]
        chunks = [window[k:k + batch_size] for k in range(0, len(window), batch_size)]
        for c in torch.randperm(len(chunks), generator=g).tolist():
            yield chunks[c]

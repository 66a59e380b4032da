"""An EAGLE-style feature draft (Li et al. 2024) for a large Llama, trained offline by distillation.

The draft predicts the large model's top-layer feature sequence instead of its tokens. Feature f_t is
the large model's hidden state after its last decoder layer, before the final norm, at position t.
The draft's input at position t is concat(f_t, embed(x_{t+1})) -> Linear(2H -> H) -> decoder layer(s)
(causal attention over the draft's own earlier positions) -> predicted f'_{t+1}; its logits are
lm_head(final_norm(f'_{t+1})) with the large model's frozen embedding, final norm and head.

Inputs are standardised per feature dimension (SmolLM2's residual stream has a few dimensions in
the thousands); the decoder layer works in the large model's raw residual space so that it can start
as a copy of the large model's last layer, and fc starts as "f_t plus a little of the token".

Chaining: after a verification the draft has true features for every verified position; the first
draft token uses those only (depth 1), later ones feed the draft's own predicted features back in.
`_forward` evaluates all chains at once: chain step j for start s (position s+j-1) attends to the
base (true-feature) keys of positions <= s and to the keys of its own chain, nothing else. Training
can unroll the same chains (EAGLE-3's "training-time test"); evaluation always does.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------- model

class _RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class _Attn(nn.Module):
    def __init__(self, h, nh, nkv, hd):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(h, nh * hd, bias=False)
        self.k_proj = nn.Linear(h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, h, inter):
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    """A Llama decoder layer (same parameter names as transformers' LlamaDecoderLayer)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = _Attn(cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"])
        self.mlp = _MLP(cfg["hidden"], cfg["intermediate"])
        self.input_layernorm = _RMSNorm(cfg["hidden"], cfg["eps"])
        self.post_attention_layernorm = _RMSNorm(cfg["hidden"], cfg["eps"])


def _rope(x, cos, sin):  # x [B, h, S, d]; cos/sin [S, d] or [B, S, d] broadcastable
    d = x.shape[-1] // 2
    rot = torch.cat((-x[..., d:], x[..., :d]), -1)
    return x * cos + rot * sin


def teacher_config(teacher) -> dict:
    c = teacher.config
    rp = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    theta = rp.get("rope_theta", None) or getattr(c, "rope_theta", None) or 10000.0
    return dict(hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                intermediate=c.intermediate_size, eps=float(c.rms_norm_eps), rope_theta=float(theta),
                vocab_size=c.vocab_size)


class FeatureDraft(nn.Module):
    """fc(concat(standardised f_t, embed(x_{t+1}))) -> n_layers decoder layers -> f'_{t+1}.

    The embedding/final norm/head are the teacher's, frozen and not owned by this module's trainable
    state (they are registered as buffers `embed`, `norm_w`; the head is tied to `embed`, restricted
    to `vocab` rows if given)."""

    def __init__(self, cfg: dict, n_layers: int = 1, vocab: torch.Tensor | None = None):
        super().__init__()
        self.cfg = dict(cfg, n_layers=n_layers)
        h = cfg["hidden"]
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(n_layers))
        self.register_buffer("feat_mean", torch.zeros(h))
        self.register_buffer("feat_std", torch.ones(h))
        self.register_buffer("emb_scale", torch.ones(()))
        self.register_buffer("embed", torch.zeros(cfg["vocab_size"], h), persistent=False)
        self.register_buffer("norm_w", torch.ones(h), persistent=False)
        self.vocab = vocab
        hd = cfg["head_dim"]
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    # --- construction
    @classmethod
    def from_teacher(cls, teacher, n_layers: int = 1, vocab=None, feat_mean=None, feat_std=None, seed: int = 0):
        cfg = teacher_config(teacher)
        d = cls(cfg, n_layers, vocab)
        src = teacher.model
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            d.attach_teacher(teacher)
            for i, layer in enumerate(d.layers):  # the teacher's last n_layers layers
                j = len(src.layers) - n_layers + i
                layer.load_state_dict({k: v.float() for k, v in src.layers[j].state_dict().items()})
            if feat_mean is not None:
                d.feat_mean.copy_(feat_mean)
                d.feat_std.copy_(feat_std)
            d.emb_scale.copy_(d.embed.pow(2).mean().sqrt())
            h = cfg["hidden"]
            # start as f'_{t+1} = f_t + (a small random map of the next token), in raw feature space
            w = torch.zeros(h, 2 * h)
            w[:, :h] = torch.diag(d.feat_std)
            w[:, h:] = torch.randn(h, h, generator=g) * (d.feat_std.median() / math.sqrt(h))
            d.fc.weight.copy_(w)
            d.fc.bias.copy_(d.feat_mean)
        return d

    def attach_teacher(self, teacher):
        """Point the frozen embedding/head and final norm at the teacher's (after loading a state dict)."""
        with torch.no_grad():
            self.embed = teacher.model.embed_tokens.weight.detach().float()
            self.norm_w = teacher.model.norm.weight.detach().float()
            if not teacher.config.tie_word_embeddings:
                self.head_w = teacher.lm_head.weight.detach().float()
        return self

    def head_weight(self):
        w = getattr(self, "head_w", None)
        w = self.embed if w is None else w
        return w if self.vocab is None else w[self.vocab]

    def logits(self, feats):
        """The teacher's final norm + head on (predicted) features; over `vocab` if set."""
        x = feats * torch.rsqrt(feats.pow(2).mean(-1, keepdim=True) + self.cfg["eps"]) * self.norm_w
        return x @ self.head_weight().T

    def to_ids(self, idx):
        return idx if self.vocab is None else self.vocab.to(idx.device)[idx]

    # --- forward
    def _inp(self, feats, next_tokens, noise: float = 0.0):
        z = (feats.float() - self.feat_mean) / self.feat_std
        if noise > 0:
            z = z + (torch.rand_like(z) - 0.5) * (2 * noise)
        e = self.embed[next_tokens] / self.emb_scale
        return self.fc(torch.cat([z, e], -1))

    def _cs(self, pos):
        ang = pos.float()[..., None] * self.inv_freq
        ang = torch.cat([ang, ang], -1)
        return ang.cos(), ang.sin()

    def _forward(self, x, pos, base_kv, chain_kv):
        """One pass through the layers. x [B, S, H] at positions pos [S] (or [B, S]).
        base_kv None: this IS the base pass (causal over its own S positions); returns its per-layer
        (K, V). Otherwise query s attends to base keys p <= s and to chain_kv[layer] (a list of (K, V)
        [B, kvh, S, d], entry s belonging to the chain that started at s), plus itself."""
        cos, sin = self._cs(pos)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        new_kv = []
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            hN = layer.input_layernorm(x)
            B, S, _ = x.shape
            q = a.q_proj(hN).view(B, S, a.nh, a.hd).transpose(1, 2)
            k = a.k_proj(hN).view(B, S, a.nkv, a.hd).transpose(1, 2)
            v = a.v_proj(hN).view(B, S, a.nkv, a.hd).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            new_kv.append((k, v))
            rep = a.nh // a.nkv
            if base_kv is None:
                kb, vb, chain = k, v, []
            else:
                kb, vb = base_kv[li]
                chain = list(chain_kv[li]) + [(k, v)]
            kb, vb = kb.repeat_interleave(rep, 1), vb.repeat_interleave(rep, 1)
            scale = 1.0 / math.sqrt(a.hd)
            sb = (q @ kb.transpose(-1, -2)) * scale  # [B, h, S, T]
            T = kb.shape[2]
            causal = torch.arange(T, device=x.device)[None, :] <= torch.arange(S, device=x.device)[:, None]
            sb = sb.masked_fill(~causal, float("-inf"))
            sc = [((q * kc.repeat_interleave(rep, 1)).sum(-1, keepdim=True) * scale) for kc, _ in chain]
            p = torch.softmax(torch.cat([sb] + sc, -1), -1)
            o = p[..., :T] @ vb
            for i, (_, vc) in enumerate(chain):
                o = o + p[..., T + i:T + i + 1] * vc.repeat_interleave(rep, 1)
            o = o.transpose(1, 2).reshape(B, S, a.nh * a.hd)
            x = x + a.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, new_kv

    def chains(self, feats, tokens, depth: int, noise: float = 0.0, detach: bool = False):
        """Predicted features for every chain start and depth.

        feats [B, T, H] true features f_0..f_{T-1}; tokens [B, T] x_0..x_{T-1}. Returns a list of
        `depth` tensors [B, T, H]: out[j-1][:, s] is the draft's prediction of f_{s+j} after j steps
        from start s (true features up to s, tokens x_{s+1}..x_{s+j} fed in, its own features after
        the first step). Entries that would need tokens beyond T-1 are computed on padding: mask them."""
        B, T, _ = feats.shape
        pad = torch.zeros(B, depth, dtype=tokens.dtype, device=tokens.device)
        tk = torch.cat([tokens, pad], 1)
        pos = torch.arange(T, device=feats.device)
        x = self._inp(feats, tk[:, 1:T + 1], noise)
        out, base_kv = self._forward(x, pos, None, None)
        outs, chain = [out], [[] for _ in self.layers]
        for j in range(2, depth + 1):
            prev = outs[-1].detach() if detach else outs[-1]
            x = self._inp(prev, tk[:, j:T + j], 0.0)
            out, kv = self._forward(x, pos + (j - 1), base_kv, chain)
            for li in range(len(self.layers)):
                chain[li].append(kv[li])
            outs.append(out)
        return outs

    # --- incremental decoding (batch 1), what an engine would run per draft token
    @torch.inference_mode()
    def step(self, feat, next_token: int, pos: int, cache: list):
        """Append one position (feature f_pos, token x_{pos+1}) to the draft's KV cache `cache`
        (list per layer of [K, V] or None) and return (predicted f'_{pos+1} [H], logits)."""
        x = self._inp(feat.view(1, 1, -1), torch.tensor([[next_token]]))
        cos, sin = self._cs(torch.tensor([pos]))
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            hN = layer.input_layernorm(x)
            q = a.q_proj(hN).view(1, 1, a.nh, a.hd).transpose(1, 2)
            k = a.k_proj(hN).view(1, 1, a.nkv, a.hd).transpose(1, 2)
            v = a.v_proj(hN).view(1, 1, a.nkv, a.hd).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            if cache[li] is None:
                cache[li] = [k, v]
            else:
                cache[li] = [torch.cat([cache[li][0], k], 2), torch.cat([cache[li][1], v], 2)]
            K, V = cache[li]
            rep = a.nh // a.nkv
            o = F.scaled_dot_product_attention(q, K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1))
            x = x + a.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x[0, 0], self.logits(x[0, 0])

    def trainable_parameters(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def checkpoint(self):
        return {"state": {k: v for k, v in self.state_dict().items()}, "config": self.cfg, "vocab": self.vocab}

    def save_dir(self, path, base, *, base_name: str = "", card: str = "", policy: dict | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        """Write this draft as a draft directory (`bild_kernels.models.draft`, kind "feature") for the engine.
        base: the large model's executor (its embedding identifies the pair). Layers are stored in `dtype`,
        the input map and feature statistics in float32."""
        from bild_kernels.models.draft import save_draft
        state = {f"model.{k}": v for k, v in self.state_dict().items() if k.startswith("layers.")}
        state.update({"fc.weight": self.fc.weight, "fc.bias": self.fc.bias, "feat_mean": self.feat_mean,
                      "feat_std": self.feat_std, "emb_scale": self.emb_scale})
        n_base = base.config.num_layers
        return save_draft(path, state, base=base, init_layers=list(range(n_base - len(self.layers), n_base)),
                          draft_vocab=self.vocab, base_name=base_name, card=card, policy=policy, dtype=dtype,
                          kind="feature")

    @classmethod
    def from_dir(cls, path, teacher):
        """The feature draft a draft directory (kind "feature", written by `save_dir`) holds, attached to
        `teacher`, in float32 for more training: its layers, input map, feature statistics and head
        vocabulary. A directory that is not such a draft, or whose weights do not fit the teacher, is refused."""
        from pathlib import Path

        from safetensors.torch import load_file

        from bild_kernels.models.draft import read_manifest
        manifest = read_manifest(path)
        if manifest["kind"] != "feature":
            raise ValueError(f"{str(path)!r} is a {manifest['kind']} draft, not a feature draft")
        weights = load_file(str(Path(path) / "model.safetensors"))
        vocab = weights.pop("draft_vocab", None)
        d = cls(teacher_config(teacher), manifest["num_layers"], None if vocab is None else vocab.long())
        state = {(k[len("model."):] if k.startswith("model.") else k): v.float() for k, v in weights.items()}
        missing, unexpected = d.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise ValueError(f"{str(path)!r} does not fit a feature draft of its manifest for this large model "
                             f"(unexpected {unexpected}, missing {missing})")
        return d.attach_teacher(teacher)

    @classmethod
    def from_checkpoint(cls, ck, teacher):
        cfg = dict(ck["config"])
        n = cfg.pop("n_layers")
        d = cls(cfg, n, ck["vocab"])
        d.load_state_dict(ck["state"])
        return d.attach_teacher(teacher)


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

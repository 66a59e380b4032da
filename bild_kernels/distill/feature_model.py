"""An EAGLE-style feature draft (Li et al. 2024) for a large Llama-family model (Llama, Mistral, Qwen2, Qwen3), trained
offline by distillation.

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

import math

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
    def __init__(self, h, nh, nkv, hd, *, bias: bool = False, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(h, nh * hd, bias=bias)
        self.k_proj = nn.Linear(h, nkv * hd, bias=bias)
        self.v_proj = nn.Linear(h, nkv * hd, bias=bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        if qk_norm:  # Qwen3: every query / key head RMS-normalised before RoPE
            self.q_norm, self.k_norm = _RMSNorm(hd, eps), _RMSNorm(hd, eps)

    def qkv(self, hN, cos, sin):
        """Queries, keys (normed where the family norms them, then rotated) and values [B, heads, S, hd]."""
        B, S, _ = hN.shape
        q = self.q_proj(hN).view(B, S, self.nh, self.hd)
        k = self.k_proj(hN).view(B, S, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(hN).view(B, S, self.nkv, self.hd).transpose(1, 2)
        return _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v


class _MLP(nn.Module):
    def __init__(self, h, inter):
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    """A Llama decoder layer (same parameter names as transformers' LlamaDecoderLayer), with Qwen2's q/k/v biases
    or Qwen3's per-head q/k norms where the teacher's layers have them."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = _Attn(cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"],
                               bias=cfg.get("attn_bias", False), qk_norm=cfg.get("qk_norm", False), eps=cfg["eps"])
        self.mlp = _MLP(cfg["hidden"], cfg["intermediate"])
        self.input_layernorm = _RMSNorm(cfg["hidden"], cfg["eps"])
        self.post_attention_layernorm = _RMSNorm(cfg["hidden"], cfg["eps"])


def _rope(x, cos, sin):  # x [B, h, S, d]; cos/sin [S, d] or [B, S, d] broadcastable
    d = x.shape[-1] // 2
    rot = torch.cat((-x[..., d:], x[..., :d]), -1)
    return x * cos + rot * sin


def teacher_config(teacher, mc=None) -> dict:
    """The draft's shape and its layer's form from the teacher: q/k/v biases (Qwen2), per-head q/k norms (Qwen3),
    and the RoPE frequencies with their scaling (llama3 / linear / yarn) exactly as the engine's executor has them
    (`mc`: the teacher's ModelConfig, where the caller read it already)."""
    from bild_kernels.models.config import ModelConfig
    c = teacher.config
    mc = mc or ModelConfig.from_hf(c)  # refuses what the engine could not run either
    last = teacher.model.layers[-1].self_attn
    return dict(hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                head_dim=mc.head_dim, intermediate=c.intermediate_size, eps=float(c.rms_norm_eps),
                rope_theta=mc.rope_theta, vocab_size=c.vocab_size, attn_bias=last.q_proj.bias is not None,
                qk_norm=mc.qk_norm, inv_freq=mc.inv_freq.tolist(), rope_scaling=mc.attention_scaling)


def check_feature_teacher(teacher) -> None:
    """Refuses (ValueError, naming what) a teacher whose last layer a feature draft's layer cannot copy: Gemma's
    layer form ((1 + w) norms, sandwich norms, GeGLU), Granite's multipliers, or weights it does not have (an
    o_proj or MLP bias)."""
    from bild_kernels.models.config import ModelConfig
    mc = ModelConfig.from_hf(teacher.config)
    if mc.gemma or mc.activation != "silu" or (mc.embedding_multiplier, mc.residual_multiplier,
                                                mc.logits_scaling) != (1.0, 1.0, 1.0):
        raise ValueError(f"kind='feature' copies a Llama-form layer (SwiGLU, pre-norms); the large model's "
                         f"({mc.model_type}) has another form: distill a layers draft (kind='layers') for it")
    own = set(_Layer(teacher_config(teacher, mc)).state_dict())
    extra = sorted(k for k in teacher.model.layers[-1].state_dict() if k not in own)
    if extra:
        raise ValueError(f"kind='feature' copies the large model's last layer, whose weights "
                         f"{', '.join(extra[:4])} a feature draft's layer does not have: distill a layers draft "
                         "(kind='layers') for it")


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
        if cfg.get("inv_freq") is not None:  # the teacher's own (scaled) frequencies
            inv = torch.tensor(cfg["inv_freq"], dtype=torch.float32)
        else:  # (a checkpoint from before they were kept: plain RoPE)
            inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.rope_scaling = float(cfg.get("rope_scaling", 1.0))

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
        return ang.cos() * self.rope_scaling, ang.sin() * self.rope_scaling

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
            B, S, _ = x.shape
            q, k, v = a.qkv(layer.input_layernorm(x), cos, sin)
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
            q, k, v = a.qkv(layer.input_layernorm(x), cos, sin)
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

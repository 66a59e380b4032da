"""FeatureDraftExecutor: an EAGLE-style draft (Li et al. 2024) that reads the large model's own features.

The draft's input at position t is the large model's last hidden state f_t (after its last decoder
layer, before the final norm) together with the next token x_{t+1}:

    x_t = W_f z_t + W_e embed(x_{t+1}) / emb_scale + b,   z_t = (f_t - feat_mean) / feat_std

then its decoder layer(s) over its own paged KV cache (causal, position t), and the large model's final
norm and head (over the draft's reduced vocabulary) on the output, which is its prediction f'_{t+1} of
the next feature. Drafting k tokens after a verification: one extend over the positions whose true
features the verify pass produced, then k - 1 steps that feed the draft's own f' back in; those chain
positions are dropped from its cache once the run ends (their features were guesses). Training is
`bild_kernels.distill.feature_draft`; the directory format is `bild_kernels.models.draft`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from bild_kernels.models.config import ModelConfig
from bild_kernels.models.llama import CPU_LINEAR_MAX_ROWS, Int8Weight, LlamaExecutor
from bild_kernels.ops.cpu_feature_draft import DraftChain, chain_layer_norms, chain_result


class FeatureDraftExecutor(LlamaExecutor):
    """A LlamaExecutor whose layer-0 input is `input_embeds(features, next_ids)` instead of token embeddings.

    weights: the draft's layers plus the large model's `embed_tokens.weight` and `norm.weight` (and
    `lm_head.weight` if untied), and its own `fc.weight` [H, 2H], `fc.bias` [H], `feat_mean` [H],
    `feat_std` [H], `emb_scale` [] (any `model.` prefix is optional).
    """

    kind = "feature"

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *, backend: str | None = None,
                 head_vocab: torch.Tensor | None = None):
        w = {k[len("model."):] if k.startswith("model.") else k: v for k, v in weights.items()}
        H = config.hidden_size
        own = {}
        for name, shape in (("fc.weight", (H, 2 * H)), ("fc.bias", (H,)), ("feat_mean", (H,)), ("feat_std", (H,)),
                            ("emb_scale", ())):
            t = w.pop(name, None)
            if t is None:
                raise ValueError(f"feature draft checkpoint is missing {name!r}")
            if tuple(t.shape) != shape:
                raise ValueError(f"feature draft weight {name!r} has shape {list(t.shape)}, expected {list(shape)}")
            own[name] = t
        super().__init__(config, w, backend=backend, head_vocab=head_vocab)
        std = own["feat_std"].float()
        if not bool(torch.isfinite(std).all()) or float(std.min()) <= 0 or float(own["emb_scale"]) <= 0:
            raise ValueError("feature draft: feat_std and emb_scale must be positive")
        dt, dev = self.dtype, self.device
        self.fc = own["fc.weight"].to(dev, dt)
        self.fc_bias = own["fc.bias"].to(dev, dt)
        # z = f * inv_std - mean * inv_std, one fused multiply-add per feature
        self.inv_std = (1.0 / std).to(dev, dt)
        self.shift = (-own["feat_mean"].float() / std).to(dev, dt)
        self.inv_emb_scale = float(1.0 / own["emb_scale"].float())
        self._fc_linear = self._linear  # quantize_weights may swap in the packed int8 kernel
        # fc as the CPU extension's products take it where they compute what _fc_linear does (see _head_args)
        self._fc_args = self._native_args(self.fc, self.fc_bias)
        self._input_op, self._chain_op = self._cpu_op("cpu_feature_input"), self._cpu_op("cpu_feature_draft_chain")

    def input_embeds(self, features: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """The layer-0 input [T, H] for features [T, H] (any float dtype) and next tokens [T]."""
        T, H = features.shape[0], self.config.hidden_size
        if features.shape != (T, H):
            raise ValueError(f"features must be [T, {H}], got {list(features.shape)}")
        if next_ids.shape != (T,) or next_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"next_ids must be int [T={T}], got {next_ids.dtype} {list(next_ids.shape)}")
        if self._input_op is not None and self._fc_args is not None and T <= self._input_rows_max:
            # one call (csrc/cpu_feature_draft.cpp): the same arithmetic as a native draft run's steps
            return self._input_op(features.to(self.dtype).contiguous(), next_ids.to(torch.int64).contiguous(),
                                  self.shift, self.inv_std, self.embed, self.inv_emb_scale, *self._fc_args)
        z = torch.addcmul(self.shift, features.to(self.dtype), self.inv_std)
        e = F.embedding(next_ids, self.embed) * self.inv_emb_scale
        return self._fc_linear(torch.cat([z, e], -1), self.fc, self.fc_bias)

    @property
    def _input_rows_max(self) -> int:
        """The longest pass whose fc product the CPU extension's calls (cpu_feature_input, a draft run's steps)
        compute as `_fc_linear` does: any with packed blocks (the same tiled kernel at every length), else
        CPU_LINEAR_MAX_ROWS (beyond which a float32 fc takes another kernel)."""
        packed = self._fc_args is not None and self._fc_args[0].dim() == 5
        return self.fused_max_tokens if packed else CPU_LINEAR_MAX_ROWS

    def chain_ready(self, first_tokens: int) -> bool:
        """Whether `draft_chain` runs here with a first step of `first_tokens` positions: the CPU extension
        serves every piece of a step (the fused layer, the fc and the head's products) at float32. With packed
        int8 weights (the shipped draft on an AVX-512 VNNI CPU) that includes a request's first run, which
        feeds the whole prompt's features. Its layers may have Qwen3's per-head norms; a GeGLU one (Gemma's form,
        which no feature draft has) steps through `forward` instead."""
        return (self._chain_op is not None and self._fused is not None and self._fc_args is not None
                and all(w.activation == "silu" for w in self.layers)
                and self._head_args is not None and self.embed.is_contiguous()
                and 1 <= first_tokens <= min(self.fused_max_tokens, self._input_rows_max))

    def draft_chain(self, features: torch.Tensor, next_ids: list[int], counts: list[int], starts: list[int],
                    caps: list[int], kv_caches, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                    fallback_threshold: float, energy: bool, penalties: tuple | None = None) -> list[DraftChain]:
        """Greedy draft runs of B sequences in one call of the CPU extension (`ops.cpu_feature_draft_chain`, trusted
        inputs: the engine's own): sequence b feeds the features of its counts[b] verified positions starts[b] ..
        not yet fed (its rows of features [sum(counts), H], the token after each in next_ids), then chains up to
        caps[b] - 1 more steps. slot_mapping [sum(counts + caps - 1)]: each sequence's run of the slots reserved for
        every position it may feed; block_tables [B, M]. penalties: as `ops.cpu_feature_draft_chain`'s."""
        c = self.config
        cos, sin = self._rope_table_to(max(s + n + k - 1 for s, n, k in zip(starts, counts, caps)))
        args = [w.fused_args() for w in self.layers]
        flat = [a for w in args for a in w[:14]]
        norms = chain_layer_norms([w[14:] for w in args])  # (Qwen3's per-head norms, where the layers have them)
        i64 = dict(dtype=torch.int64)
        out = self._chain_op(
            features.to(self.dtype).contiguous(), torch.tensor(next_ids, **i64), self.shift, self.inv_std, self.embed,
            self.inv_emb_scale, *self._fc_args, flat, [kc for kc, _ in kv_caches], [vc for _, vc in kv_caches],
            self.norm, *self._head_args, self.head_vocab, cos.view(cos.shape[0], -1), sin.view(sin.shape[0], -1),
            slot_mapping, block_tables.contiguous(), torch.tensor(counts, **i64), torch.tensor(starts, **i64),
            torch.tensor(caps, **i64), c.num_heads, c.num_kv_heads, self.scale, [w or 0 for w in c.sliding_windows],
            c.rms_norm_eps, self.activation_bits, float(fallback_threshold), bool(energy), norms,
            *(penalties or (None,) * 6))
        return chain_result(*out)

    def quantize_weights(self, kind: str = "int8") -> "FeatureDraftExecutor":
        super().quantize_weights(kind)
        self.fc = Int8Weight.of(self.fc)  # input width 2H: a multiple of 16 whenever H is
        packed = self.head_blocks == "int8x16" and self.packs_int8(self.fc)  # the layers and head packed: fc too
        self._fc_linear = self._packed_product(self.fc) if packed else self._linear
        self._fc_args = ((*self._fc_linear.keywords["packed"], self.fc_bias) if packed
                         else self._native_args(self.fc, self.fc_bias))
        return self

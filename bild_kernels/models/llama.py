"""LlamaExecutor: the Llama-family forward (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 3, SmolLM2) over a paged KV cache.

One batched forward of ragged sequences serves prefill, one-token decode and multi-token extend: each
layer writes the new tokens' K/V to their cache slots (`slot_mapping`, -1 rows skipped), then the new
tokens attend over their sequence's cache, causally by position. Shallow-deep policies (FREE) run a
layer range: the first L_s layers with the final norm and head give the shallow draft's logits and
the residual stream, which a later call over layers L_s..N continues.

The math mirrors transformers' modeling_llama op for op (RMSNorm in fp32 cast back before the weight,
RoPE cos/sin computed in fp32, SwiGLU), so logits agree with the HF model to rounding. Q/K/V and
gate/up projections are fused into one matmul each; biases are used where the checkpoint has them
(Qwen2's q/k/v, Llama's attention_bias / mlp_bias); Qwen3's per-head RMSNorm of the queries and keys
(`q_norm` / `k_norm`, weights [head_dim]) runs between the projection and RoPE. Gemma 3 adds its own
layer form (`ModelConfig.gemma`): (1 + w) norms in float32, the attention's and the MLP's outputs normed before
their residual adds, a scaled embedding, GeGLU, and a second RoPE for its sliding layers (on a CPU in the
extension's one-call layer too).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from bild_kernels._backend import registered, resolve
from bild_kernels.models.attention import (AttentionMetadata, CpuAttentionPlan, cpu_attention_kernel,
                                           default_attention_backend, paged_attention)
from bild_kernels.models.config import ModelConfig
from bild_kernels.models.linear import (CPU_LINEAR_MAX_ROWS, Int8Weight, _linear, check_int8_kernel,
                                        int8_activation_dtype, int8_x16)
from bild_kernels.models.weight_formats import Q4_1_FUSED_MAX_TOKENS, Q4_1X16_FUSED_MAX_TOKENS, WeightFormats
from bild_kernels.ops.cpu_decoder_layer import LayerWeights, layer_args, layer_extras

# (the products' and weight formats' names, imported from here elsewhere)
__all__ = ["CPU_LINEAR_MAX_ROWS", "Int8Weight", "LlamaExecutor", "Q4_1_FUSED_MAX_TOKENS", "Q4_1X16_FUSED_MAX_TOKENS",
           "check_int8_kernel", "int8_activation_dtype", "int8_x16"]


@dataclasses.dataclass
class _LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, Hq * D]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None
    # GGUF Q4_1 blocks standing exactly for qkv / o / gate_up / down: name -> (q [N, K / 2] uint8, dm [N, K / 32, 2]),
    # or packed for int16 activations (reference.q4_1x16_pack) (LlamaExecutor.use_q4_1_layers); the fused CPU layer
    # reads them, every other path the float weights above
    blocks: dict | None = None
    q_norm: torch.Tensor | None = None  # [D] (Qwen3, Gemma 3), with k_norm
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # [hidden] (Gemma: the attention's output normed before its residual)
    mlp_out_norm: torch.Tensor | None = None  # [hidden] (Gemma: the MLP's output normed before its residual)
    activation: str = "silu"  # the gated MLP's ("gelu_tanh": Gemma's GeGLU)

    def __setattr__(self, name, value):  # a weight replaced: the fused layer's argument tuple is stale
        object.__setattr__(self, name, value)
        self.__dict__.pop("_fused_args", None)
        if name in ("qkv", "o", "gate_up", "down") and self.__dict__.get("blocks") is not None:
            object.__setattr__(self, "blocks", None)  # blocks of the old weights no longer stand for them

    def fused_args(self) -> tuple:
        """This layer's weights as cpu_decoder_layer's 14 positional arguments, then, for Qwen3's or Gemma's form,
        the op's arguments after activation_bits (`layer_extras`) (built once, until a weight is replaced): a
        projection is (weight, None, bias), (int8 weight, scale, bias), or (Q4_1 q, dm, bias) when the layer has
        blocks."""
        args = self.__dict__.get("_fused_args")
        if args is None:
            def proj(name, b):
                w = getattr(self, name)
                if self.blocks is not None:
                    return (*self.blocks[name], b)
                return (w.q, w.scale.float(), b) if isinstance(w, Int8Weight) else (w.contiguous(), None, b)
            weights = LayerWeights(self.input_norm, proj("qkv", self.qkv_bias), proj("o", self.o_bias),
                                   self.post_norm, proj("gate_up", self.gate_up_bias), proj("down", self.down_bias),
                                   self.q_norm, self.k_norm, self.attn_out_norm, self.mlp_out_norm)
            args = layer_args(weights) + layer_extras(weights, self.activation)  # (Qwen3's / Gemma's after 14)
            self.__dict__["_fused_args"] = args
        return args


class LlamaExecutor(WeightFormats):
    """The model math over a paged KV cache. Build it with `bild_kernels.models.load_model`.

    weights: a transformers-style state dict (`model.layers.{i}.self_attn.q_proj.weight`, ...; the
    `model.` prefix is optional), already in the dtype and on the device to run in.
    backend: kernel backend for the cache writes and attention ("triton", "ref", or None: the default
    for the device; float64 always uses the reference).
    head_vocab: optional sorted token ids [n] that the head scores (a draft model's reduced vocabulary:
    the head's cost drops by V/n); logits stay [*, V], with -inf for every other token.
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *, backend: str | None = None,
                 head_vocab: torch.Tensor | None = None):
        self.config = config
        w = {k[len("model."):] if k.startswith("model.") else k: v for k, v in weights.items()}
        take = _Taker(w)
        c = config
        self.embed = take("embed_tokens.weight", (c.vocab_size, c.hidden_size))
        self.dtype, self.device = self.embed.dtype, self.embed.device
        # Gemma's norms scale by (1 + w), computed in float32 whatever the model's dtype: kept so, as float32
        norm_w = (lambda t: 1.0 + t.float()) if c.gemma else (lambda t: t)
        self.norm = norm_w(take("norm.weight", (c.hidden_size,)))
        self.embed_scale = (None if c.embed_scale == 1.0
                            else torch.tensor(c.embed_scale, dtype=torch.float32).to(self.device, self.dtype))
        if c.tie_word_embeddings:
            self.lm_head = self.embed
        else:
            self.lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))
        self.head_vocab = None
        if head_vocab is not None:
            self.head_vocab = _check_head_vocab(head_vocab, c.vocab_size).to(self.device)
            self.lm_head = self.lm_head[self.head_vocab]  # a copy of n rows; the embedding stays shared
        H, Hq, Hkv, D, I = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        self.layers = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            qkv_shapes = ((Hq * D, H), (Hkv * D, H), (Hkv * D, H))
            qkv = [take(f"{a}{n}_proj.weight", s) for n, s in zip("qkv", qkv_shapes)]
            qkv_b = [take.optional(f"{a}{n}_proj.bias", (s[0],)) for n, s in zip("qkv", qkv_shapes)]
            gate_up_b = [take.optional(f"{m}{n}_proj.bias", (I,)) for n in ("gate", "up")]
            self.layers.append(_LayerWeights(
                input_norm=norm_w(take(p + "input_layernorm.weight", (H,))),
                qkv=torch.cat(qkv), qkv_bias=_cat_optional(qkv_b, qkv_shapes, self.embed),
                o=take(a + "o_proj.weight", (H, Hq * D)), o_bias=take.optional(a + "o_proj.bias", (H,)),
                post_norm=norm_w(take(p + ("pre_feedforward_layernorm.weight" if c.gemma
                                           else "post_attention_layernorm.weight"), (H,))),
                gate_up=torch.cat([take(f"{m}{n}_proj.weight", (I, H)) for n in ("gate", "up")]),
                gate_up_bias=_cat_optional(gate_up_b, ((I, H), (I, H)), self.embed),
                down=take(m + "down_proj.weight", (H, I)), down_bias=take.optional(m + "down_proj.bias", (H,)),
                q_norm=norm_w(take(a + "q_norm.weight", (D,))) if c.qk_norm else None,
                k_norm=norm_w(take(a + "k_norm.weight", (D,))) if c.qk_norm else None,
                attn_out_norm=norm_w(take(p + "post_attention_layernorm.weight", (H,))) if c.gemma else None,
                mlp_out_norm=norm_w(take(p + "post_feedforward_layernorm.weight", (H,))) if c.gemma else None,
                activation=c.activation))
        take.check_all_used()
        self.inv_freq = c.inv_freq.to(self.device, torch.float32)
        # the sliding layers' own RoPE (Gemma 3): (inv_freq, attention scaling), or None
        self.local_rope = (None if c.local_inv_freq is None
                           else (c.local_inv_freq.to(self.device, torch.float32), c.local_attention_scaling))
        self.scale = c.attn_scale if c.attn_scale is not None else c.head_dim ** -0.5
        self._rope_tables = {False: None, True: None}  # the CPU's cos / sin tables by position (_rope_table_to)
        # float64 runs only on the reference kernels (exactness tests).
        self.backend = "ref" if self.dtype == torch.float64 else backend
        self.attn_backend = {"cuda": None}.get(self.backend, self.backend)  # no CUDA attention kernel: Triton
        self.weight_format = str(self.dtype).removeprefix("torch.")  # "int8" after quantize_weights
        self._linear = functools.partial(_linear, native=self._native_linear())
        self._fused = self._fused_layer()  # the CPU extension's one-call layer, or None
        self._head_linear = self._linear  # the head's product (use_q8_0_head swaps its small-M kernel)
        # the head as the CPU extension's products take it (weight, scale, bias) where they compute what
        # _head_linear does at a few rows (a draft run in C++ reads it: cpu_feature_draft_chain), else None
        self._head_args = self._native_args(self.lm_head, None)
        # RMSNorm in one call of the CPU extension (float32 on a CPU): ~5 PyTorch ops' dispatches saved a call
        self._norm_op = self._cpu_op("cpu_rms_norm")
        self.head_blocks = None  # "q8_0" / "q8_0x16" / "q8_0x16i8" once use_q8_0_head took a GGUF's blocks
        # the head's product with its rows' statistics (use_q8_0_head's integer-activation blocks:
        # cpu_linear_q8_0x16_stats), and (logits, [max, lse, argmax, finite]) of the last head_logits that took them
        self._head_stats = None
        self.last_head_stats = None
        # how the fused CPU layer's packed (5-D) weights round the activations (cpu_decoder_layer's activation_bits)
        self.activation_bits = 16

    def match_vocab(self, n: int) -> "LlamaExecutor":
        """Give this model (a draft) a vocabulary of n ids, in place: a pair's checkpoints may pad the embedding of
        one shared tokenizer to different sizes (Qwen2.5 0.5B-3B: 151,936 rows, 7B and up: 152,064). Ids this model
        lacks embed as zeros and are never scored (-inf); ids beyond n are dropped. Its head then runs as a
        reduced one (`head_vocab`), its products on plain float weights (call before quantising)."""
        c = self.config
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"match_vocab: n must be a positive int, got {n!r}")
        if n == c.vocab_size:
            return self
        if self.head_vocab is not None or self.weight_format == "int8":
            raise ValueError("match_vocab: this model's head is already reduced or quantised")
        keep = min(n, c.vocab_size)
        old_embed = self.embed
        if n > c.vocab_size:
            self.embed = torch.cat((old_embed, old_embed.new_zeros(n - c.vocab_size, c.hidden_size)))
        else:
            self.embed = old_embed[:n]
        tied = self.lm_head is old_embed
        self.lm_head = (self.embed if tied else self.lm_head)[:keep]  # a view: no second copy of the head
        self.head_vocab = torch.arange(keep, device=self.device) if keep < n else None
        self.config = dataclasses.replace(c, vocab_size=n)
        self._head_linear, self.head_blocks, self._head_stats = self._linear, None, None
        self._head_args = self._native_args(self.lm_head, None)
        return self

    def _cpu_op(self, op: str):
        """The CPU extension's implementation of `op` where it serves this model (float32 on a CPU, the backend
        not forced to "ref"), else None."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or self.backend not in (None, "cpu"):
            return None
        fn = resolve(op, self.device, None)
        return fn if fn is registered(op, "cpu") else None

    def _native_args(self, w, bias):
        """(weight, scale, bias) of a projection as the CPU extension's products take it, when this executor's
        `_linear` runs it on the extension's own float32 or int8 kernel at a few rows; else None."""
        kw = self._linear.keywords
        if isinstance(w, Int8Weight):
            int8 = kw.get("int8_fp32")
            return (w.q, w.scale.float(), bias) if int8 is not None and int8 is registered("cpu_linear_int8",
                                                                                            "cpu") else None
        return (w, None, bias) if kw.get("native") is not None and w.is_contiguous() else None

    def _native_linear(self):
        """The CPU extension's small-M matmul where it serves this model (float32 on a CPU with AVX2/FMA,
        the backend not forced to "ref"), else None: F.linear. Its weights must be contiguous."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        fn = resolve("cpu_linear", self.device, "ref" if self.backend == "ref" else None)
        if fn is not registered("cpu_linear", "cpu"):  # the reference: F.linear does it
            return None
        self.lm_head = self.lm_head.contiguous()
        for w in self.layers:
            w.qkv, w.o, w.gate_up, w.down = (t.contiguous() for t in (w.qkv, w.o, w.gate_up, w.down))
        return fn

    def _fused_layer(self):
        """The op of csrc/cpu_decoder_layer.cpp where it serves this model: float32 on a CPU whose extension
        runs the layer's matmuls (float32 weights through cpu_linear, int8 ones through cpu_linear_int8) and its
        attention; else None (the layer runs as PyTorch ops)."""
        op = self._cpu_op("cpu_decoder_layer")
        if op is None or not self.config.plain_layers:  # (Granite's scaled residual branches: PyTorch ops)
            return None
        kind = "cpu_linear_int8" if self.weight_format == "int8" else "cpu_linear"
        if resolve(kind, self.device, None) is not registered(kind, "cpu"):
            return None
        if default_attention_backend(self.device, self.dtype) != "cpu":
            return None
        return op


    # ----------------------------------------------------------------------------------------------
    # KV cache
    # ----------------------------------------------------------------------------------------------
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        """Bytes one cache block of `block_size` tokens takes over all layers, keys and values."""
        c = self.config
        return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * self.embed.element_size()

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key_cache, value_cache), each [num_blocks, block_size, H_kv, D], zero-filled so that
        slots never written hold finite values: views of one [layers, 2, num_blocks, block_size, H_kv, D] tensor,
        so that a run of slots moves in every layer at once (`ModelRunner.read_kv`, prefix caching)."""
        for name, val in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        c = self.config
        pool = torch.zeros((c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim), dtype=self.dtype,
                           device=self.device)
        return [(pool[i, 0], pool[i, 1]) for i in range(c.num_layers)]

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None, meta: AttentionMetadata, kv_caches, *,
                hidden_states: torch.Tensor | None = None, layers: slice | tuple[int, int] | None = None,
                logits_indices: torch.Tensor | None = None, return_hidden: bool = False, full_vocab: bool = True):
        """Run layers [start, end) over T new tokens; write their K/V; return logits (and the residual stream).

        input_ids [T] int (only when start == 0) or hidden_states [T, hidden]: the residual stream entering
        layer `start`, as returned by an earlier call with return_hidden=True (at layer 0: input embeddings,
        as a feature draft computes them).
        kv_caches: per layer of the whole model, (key_cache, value_cache) [num_blocks, block_size, H_kv, D].
        logits_indices [n]: the token rows to compute logits for (None: all T; empty: none).
        Returns logits [n, V] in the model dtype (final norm + head applied after layer end - 1), or
        (logits, hidden [T, hidden]) with return_hidden=True, hidden being the stream before the final norm.
        full_vocab=False with a reduced head (`head_vocab`): logits [n, len(head_vocab)] over the head's own
        ids, column j scoring token head_vocab[j], instead of a [n, V] tensor that is -inf elsewhere.
        """
        start, end = self._layer_range(layers)
        if not isinstance(meta, AttentionMetadata):
            raise TypeError(f"meta must be an AttentionMetadata, got {type(meta).__name__}")
        meta.validate(self.device)
        if len(kv_caches) != self.config.num_layers:
            raise ValueError(f"kv_caches must hold {self.config.num_layers} layers, got {len(kv_caches)}")
        T = meta.num_tokens
        if (input_ids is None) == (hidden_states is None):
            raise ValueError("forward takes input_ids or hidden_states, exactly one of them")
        if input_ids is not None:
            if start != 0:
                raise ValueError(f"a forward from layer {start} takes hidden_states (the stream entering it)")
            if input_ids.shape != (T,) or input_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"input_ids must be int [T={T}], got {input_ids.dtype} {list(input_ids.shape)}")
            if input_ids.device != self.device:
                raise ValueError(f"input_ids are on {input_ids.device}, the model on {self.device}")
            x = F.embedding(input_ids, self.embed)
            if self.embed_scale is not None:  # Gemma: sqrt(hidden), in the model's dtype as HF rounds it
                x = x * self.embed_scale
            if self.config.embedding_multiplier != 1.0:  # Granite's (a Python float, as HF multiplies)
                x = x * self.config.embedding_multiplier
        else:  # the stream entering layer `start` (at 0: input embeddings computed by the caller)
            if hidden_states.shape != (T, self.config.hidden_size):
                raise ValueError(f"hidden_states must be [T={T}, {self.config.hidden_size}], "
                                 f"got {list(hidden_states.shape)}")
            if hidden_states.device != self.device:
                raise ValueError(f"hidden_states are on {hidden_states.device}, the model on {self.device}")
            x = hidden_states.to(self.dtype)
        cos, sin = self._rope_cos_sin(meta.positions)
        if self.local_rope is not None:  # the sliding layers' rotary rows beside the full layers'
            local_cos, local_sin = self._rope_cos_sin(meta.positions, local=True)
            cos, sin = (cos, local_cos), (sin, local_sin)
        slot_mapping = meta.slot_mapping.to(torch.int64)
        # The attention backend is chosen once per forward.
        attn_backend = self.attn_backend or default_attention_backend(self.device, self.dtype)
        if self._fused is not None and attn_backend == "cpu" and T <= self.fused_max_tokens:
            x = self._fused_layers(x, cos, sin, meta, kv_caches, slot_mapping, start, end)
        else:
            x = self._op_layers(x, cos, sin, meta, kv_caches, slot_mapping, start, end, attn_backend)
        logits = self.head_logits(x if logits_indices is None else x[logits_indices], full_vocab=full_vocab)
        return (logits, x) if return_hidden else logits

    __call__ = forward

    def head_logits(self, hidden: torch.Tensor, *, full_vocab: bool = True) -> torch.Tensor:
        """The logits of rows of the stream before the final norm (forward's `hidden`): the final norm, then the
        head (over the whole vocabulary, -inf outside a reduced head's, unless full_vocab=False)."""
        x = self._rms_norm(hidden, self.norm)
        self.last_head_stats = None
        if self._head_stats is not None and x.dim() == 2 and 1 <= x.shape[0] <= CPU_LINEAR_MAX_ROWS \
                and x.dtype == torch.float32 and self.config.logits_scaling == 1.0:
            # (the rows _head_linear's blocks serve; head_vocab is None here)
            logits, *stats = self._head_stats(x.contiguous())
            self.last_head_stats = (logits, stats)
            return logits
        logits = self._head_linear(x, self.lm_head)
        if self.config.logits_scaling != 1.0:  # Granite divides its logits
            logits = logits / self.config.logits_scaling
        if self.head_vocab is not None and full_vocab:
            full = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
            logits = full.index_copy_(1, self.head_vocab, logits)
        return logits

    def _fused_layers(self, x, cos, sin, meta, kv_caches, slot_mapping, start, end):
        """Layers [start, end), each in one call of the CPU extension (csrc/cpu_decoder_layer.cpp)."""
        op, c, T = self._fused, self.config, x.shape[0]
        if self.local_rope is None:
            cos2, sin2 = cos.view(T, -1), sin.view(T, -1)
        else:  # Gemma 3: (full, local) tables, a sliding layer takes the local one
            rope_tables = [(cs.view(T, -1), sn.view(T, -1)) for cs, sn in zip(cos, sin)]
        qsl, pos, tables, lens = (meta.query_start_loc, meta.positions, meta.block_tables.contiguous(),
                                  meta.context_lens)
        x = x.contiguous()
        for i in range(start, end):
            kc, vc = kv_caches[i]
            if self.local_rope is not None:
                cos2, sin2 = rope_tables[1 if c.sliding_windows[i] else 0]
            args = self.layers[i].fused_args()
            x = op(x, cos2, sin2, *args[:14], kc, vc, slot_mapping, qsl, pos, tables, lens, c.num_heads,
                   c.num_kv_heads, self.scale, c.sliding_windows[i] or 0, c.rms_norm_eps, self.activation_bits,
                   *args[14:])
        return x

    def _op_layers(self, x, cos, sin, meta, kv_caches, slot_mapping, start, end, attn_backend):
        """Layers [start, end) as PyTorch ops around the kernels (`_layer`)."""
        write_kv = resolve("write_paged_kv", self.device, self.backend)
        if self.device.type == "cpu" and write_kv is resolve("write_paged_kv", self.device, "ref"):
            write_kv = _CpuKVWriter(slot_mapping)  # the same writes, slots filtered once per forward
        # On the CPU reference the per-sequence blocks and masks are read once per forward, not once per layer.
        if attn_backend == "ref" and self.device.type == "cpu":
            plan = CpuAttentionPlan.of(meta, kv_caches[start][0].shape[1])
            attend = lambda q, kc, vc, window: plan.attend(q, kc, vc, self.scale, window)  # noqa: E731
        elif attn_backend == "cpu" and self.device.type == "cpu" and self.dtype == torch.float32:
            # bild_kernels._cpu's kernel, bound once per forward (its per-layer call then costs ~5 us of overhead)
            op, qsl, pos, tables, lens = (cpu_attention_kernel(), meta.query_start_loc, meta.positions,
                                          meta.block_tables.contiguous(), meta.context_lens)
            attend = lambda q, kc, vc, window: op(q.contiguous(), kc, vc, qsl, pos, tables, lens,  # noqa: E731
                                                  self.scale, window)
        else:
            attend = lambda q, kc, vc, window: paged_attention(  # noqa: E731
                q, kc, vc, meta, scale=self.scale, sliding_window=window, backend=attn_backend)
        for i in range(start, end):
            cs = (cos, sin)
            if self.local_rope is not None:  # (full, local) pairs: a sliding layer takes the local rows
                k = 1 if self.config.sliding_windows[i] else 0
                cs = (cos[k], sin[k])
            x = self._layer(i, x, *cs, kv_caches[i], write_kv, slot_mapping, attend)
        return x

    def _layer(self, i, x, cos, sin, cache, write_kv, slot_mapping, attend):
        c, w = self.config, self.layers[i]
        T, Hq, Hkv, D = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        qkv = self._linear(self._rms_norm(x, w.input_norm), w.qkv, w.qkv_bias)
        qk = qkv[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D)
        if w.q_norm is not None:  # Qwen3: each head RMS-normalised before RoPE
            qk = torch.cat((self._rms_norm(qk[:, :Hq].reshape(T * Hq, D), w.q_norm).view(T, Hq, D),
                            self._rms_norm(qk[:, Hq:].reshape(T * Hkv, D), w.k_norm).view(T, Hkv, D)), dim=1)
        qk = _rotate(qk, cos, sin)  # q and k rotated in one go
        q, k = qk[:, :Hq], qk[:, Hq:]
        v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
        key_cache, value_cache = cache
        write_kv(k.contiguous(), v.contiguous(), key_cache, value_cache, slot_mapping)
        attn = attend(q, key_cache, value_cache, c.sliding_windows[i] or 0)
        o = self._linear(attn.reshape(T, Hq * D), w.o, w.o_bias)
        r = c.residual_multiplier  # (Granite's; 1 elsewhere)
        o = o if w.attn_out_norm is None else self._rms_norm(o, w.attn_out_norm)
        x = x + (o if r == 1.0 else o * r)
        gate, up = self._linear(self._rms_norm(x, w.post_norm), w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
        act = F.silu(gate) if c.activation == "silu" else F.gelu(gate, approximate="tanh")
        m = self._linear(act * up, w.down, w.down_bias)
        m = m if w.mlp_out_norm is None else self._rms_norm(m, w.mlp_out_norm)
        return x + (m if r == 1.0 else m * r)

    def _rms_norm(self, x, weight):
        if self._norm_op is not None and x.dtype == torch.float32:  # csrc: the fused layer's own RMSNorm
            return self._norm_op(x.contiguous(), weight, self.config.rms_norm_eps)
        # HF normalises in fp32 (even for float64 models), casts back, then scales (Gemma: scales by its float32
        # (1 + w), then casts back).
        if x.dtype == torch.float32:  # the same ops without the no-op casts (each costs a dispatch)
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps))
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        if self.config.gemma:
            return (normed * weight).to(x.dtype)
        return weight * normed.to(x.dtype)

    def _rope_cos_sin(self, positions, local: bool = False):
        """cos / sin rows [T, 1, D] of the positions (local: the sliding layers' own RoPE, Gemma 3)."""
        if self.device.type == "cpu":  # rows of a table of every position so far: one index_select a step
            cos, sin = self._rope_table_to(int(positions.max()) + 1 if positions.numel() else 0, local)
            return cos.index_select(0, positions), sin.index_select(0, positions)
        return self._rope_rows_of(positions, local)

    def _rope_table_to(self, n: int, local: bool = False):
        """The CPU table of cos / sin rows [P, 1, D] by position (local: the sliding layers' RoPE), grown to cover
        positions below n."""
        table = self._rope_tables[local]
        rows = 0 if table is None else table[0].shape[0]
        if n > rows:
            table = self._rope_tables[local] = self._rope_rows_of(torch.arange(max(n, 2 * rows, 256)), local)
        return table

    def _rope_rows_of(self, positions, local: bool = False):
        # Elementwise in the position. On a CPU its rows come from one table (above), so a position reads the
        # same cos/sin in every pass, whatever the other positions of the pass.
        inv_freq, scaling = self.local_rope if local else (self.inv_freq, self.config.attention_scaling)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2], fp32 as in HF
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(self.dtype)[:, None, :], (emb.sin() * scaling).to(self.dtype)[:, None, :]

    def _layer_range(self, layers) -> tuple[int, int]:
        n = self.config.num_layers
        if layers is None:
            return 0, n
        if isinstance(layers, slice):
            if layers.step not in (None, 1):
                raise ValueError(f"layers: a slice with step {layers.step} is not a layer range")
            start, end, _ = layers.indices(n)
        elif isinstance(layers, tuple) and len(layers) == 2 and all(isinstance(v, int) for v in layers):
            start, end = layers
        else:
            raise TypeError(f"layers must be a slice or a (start, end) tuple, got {layers!r}")
        if not 0 <= start < end <= n:
            raise ValueError(f"layers: need 0 <= start < end <= {n}, got ({start}, {end})")
        return start, end


def _check_head_vocab(ids, vocab_size: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("head_vocab must be a 1-D int tensor of token ids")
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"head_vocab must hold token ids in [0, {vocab_size}), got {ids.numel()} ids")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("head_vocab must be sorted and free of duplicates")
    return ids.to(torch.int64)


class _CpuKVWriter:
    """write_paged_kv_ref for every layer of one CPU forward: the padding rows (slot -1) are found once
    per forward instead of once per layer, and each layer's K/V land with one index_copy_ per cache."""

    def __init__(self, slot_mapping: torch.Tensor):
        keep = slot_mapping >= 0
        self.rows = None if bool(keep.all()) else keep.nonzero().flatten()
        self.slots = slot_mapping if self.rows is None else slot_mapping[self.rows]

    def __call__(self, key, value, key_cache, value_cache, _slot_mapping) -> None:
        if self.rows is not None:
            key, value = key[self.rows], value[self.rows]
        for src, cache in ((key, key_cache), (value, value_cache)):
            flat = cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])
            flat.index_copy_(0, self.slots, src.to(cache.dtype))


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _cat_optional(biases, shapes, like):
    """One fused bias from per-projection biases; missing ones are zeros, all missing gives None."""
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else like.new_zeros(s[0]) for b, s in zip(biases, shapes)])


class _Taker:
    """Pops weights by name with a shape check, so that a wrong or partial checkpoint fails clearly."""

    def __init__(self, weights: dict):
        self.weights = dict(weights)

    def __call__(self, name, shape):
        if name not in self.weights:
            raise ValueError(f"checkpoint is missing weight {name!r}")
        return self.optional(name, shape)

    def optional(self, name, shape):
        t = self.weights.pop(name, None)
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"weight {name!r} has shape {list(t.shape)}, the config implies {list(shape)}")
        return t

    def check_all_used(self):
        # Rotary buffers and a tied head's copy are expected leftovers; anything else means a different model.
        rest = [k for k in self.weights if not (k.endswith("rotary_emb.inv_freq") or k == "lm_head.weight")]
        if rest:
            raise ValueError(f"checkpoint has weights the executor does not use (not a plain Llama-family "
                             f"model?): {sorted(rest)[:5]}{' ...' if len(rest) > 5 else ''}")

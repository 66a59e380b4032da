"""How a LlamaExecutor's weights are stored and multiplied on a CPU: a GGUF's Q8_0 head and Q4_1 layer blocks (as
they are, or packed for integer activations), int8 weights per output channel, and what follows from the format
(which passes take the fused layer; whether each row's results are independent of its pass)."""
from __future__ import annotations

import functools

import torch

from bild_kernels._backend import registered, resolve
from bild_kernels.models.attention import default_attention_backend
from bild_kernels.models.linear import (_ACTIVATION_BITS, CPU_LINEAR_MAX_ROWS, INT8_K_MULTIPLE, Int8Weight,
                                        _check_activations, _linear, _packed_linear, check_int8_kernel, int8_x16)

# Tokens up to which a pass takes the fused CPU layer when it reads Q4_1 blocks (float32 weights: up to
# CPU_LINEAR_MAX_ROWS, beyond which MKL's float32 product is faster). A prefill of the default large model on 2 cores
# of the AMD EPYC (2026-11-27), fused from the blocks (float activations) against F.linear on the float32 weights:
# 17 tokens 31 against 67 ms, 32 52 against 81, 64 102 against 144, 128 205 against 214, 256 441 against 402.
Q4_1_FUSED_MAX_TOKENS = 96
# The same blocks packed for integer activations (q4_1x16, q4_1x16i8) are the faster at every length measured: at rev
# f1779cf + tiled products, 17 tokens 16 against 64 ms, 64 49 against 124, 128 97 against 207, 256 209 against 381, 512
# 475 against 770 (2 threads); so every pass but a very long prompt's takes them. So do int8 weights packed as Q8_0
# blocks (int8x16: the shipped draft's layer, fc and head), whose products are the same tiled kernels.
Q4_1X16_FUSED_MAX_TOKENS = 8192


class WeightFormats:
    """LlamaExecutor's weight formats (a mixin: the executor holds the weights and its products)."""

    def use_q8_0_head(self, qweight: torch.Tensor, block_scale: torch.Tensor, activations: str = "float32") -> bool:
        """Score the head from a Q8_0 copy of it (qweight [V, K] int8, block_scale [V, K / 32] float32: the GGUF's
        blocks) where that is exactly lm_head (every weight == q * d) and the float32 small-M kernel would run:
        cpu_linear_q8_0 then gives the same logits, bit for bit, from a quarter of the bytes. Returns whether it
        took it (False: a float32 CPU kernel does not serve this model, a reduced or int8 head, or weights that
        differ). activations="int16": the blocks repacked (`reference.q8_0x16_pack`) for cpu_linear_q8_0x16
        (activations rounded to int16 per run of 32, integer products; logits within ~3e-5 relative), only
        where that kernel runs (AVX-512 VNNI) and V is a multiple of 16; "int8": the same kernel rounding them to
        int8 (~1e-2 relative, as llama.cpp multiplies these blocks)."""
        _check_activations(activations)
        if self._linear.keywords.get("native") is None or self.head_vocab is not None \
                or not isinstance(self.lm_head, torch.Tensor) or self.lm_head.dtype != torch.float32:
            return False
        V, K = self.lm_head.shape
        if qweight.dtype != torch.int8 or tuple(qweight.shape) != (V, K) or K % 32 \
                or tuple(block_scale.shape) != (V, K // 32) or block_scale.dtype != torch.float32 \
                or (activations != "float32" and V % 16):
            return False
        op = "cpu_linear_q8_0x16" if activations != "float32" else "cpu_linear_q8_0"
        fn = resolve(op, self.device, None)
        if fn is not registered(op, "cpu"):
            return False
        q, d = qweight.contiguous(), block_scale.contiguous()
        for i in range(0, V, 4096):  # in slices: the check's float32 copy stays small
            if not torch.equal(q[i:i + 4096].float() * d[i:i + 4096].repeat_interleave(32, dim=1),
                               self.lm_head[i:i + 4096]):
                return False
        if activations != "float32":
            from bild_kernels.reference import q8_0x16_pack
            q, d = q8_0x16_pack(q, d)
            bits = _ACTIVATION_BITS[activations]
            stats = resolve("cpu_linear_q8_0x16_stats", self.device, None)
            if stats is registered("cpu_linear_q8_0x16_stats", "cpu"):
                self._head_stats = lambda x: stats(x, q, d, None, bits)  # noqa: E731
            # Every number of rows from the blocks (the kernel tiles them, as the packed layers' products do): each
            # row's logits then come out the same bits whatever else its pass holds (rows_independent), where
            # F.linear on the float32 head beyond CPU_LINEAR_MAX_ROWS rows rounded them otherwise (a prompt's
            # log-probabilities, a verify pass of a large batch).
            self._head_linear = functools.partial(_packed_linear, packed=(q, d), linear=self._linear,
                                                  activation_bits=bits)
        else:
            native = lambda x, w, bias: fn(x, q, d, bias)  # noqa: E731
            # _linear's own rule picks the small-M kernel; for the head that kernel reads the blocks, not lm_head.
            self._head_linear = functools.partial(_linear, native=native)
        self._head_args = None  # (a large model's head: no draft run reads it)
        self.head_blocks = {"float32": "q8_0", "int16": "q8_0x16", "int8": "q8_0x16i8"}[activations]
        return True

    def use_q4_1_layers(self, blocks: list[dict], activations: str = "float32") -> bool:
        """Run the fused CPU layer's products from Q4_1 copies of the projections (blocks[i][name] = (q [N, K / 2]
        uint8, dm [N, K / 32, 2] float32) for name in qkv, o, gate_up, down: a GGUF's blocks, see
        `reference.q4_1_dequantize`) where they are exactly the float32 weights (every weight == d * q + m) and that
        layer runs: cpu_linear_q4_1 then gives the same bits from 0.75 bytes a weight instead of 4, and passes of
        up to Q4_1_FUSED_MAX_TOKENS tokens take that layer (Q4_1X16_FUSED_MAX_TOKENS packed for integer activations;
        longer prefills keep F.linear on the float32 weights,
        faster there). Returns whether it took
        them (False: no fused float32 CPU layer here, int8 weights, or blocks that differ; nothing changes).

        activations="int16": the blocks repacked (`reference.q4_1x16_pack`) for cpu_linear_q4_1x16, which rounds
        each product's activations to int16 per run of 32 and multiplies in integers: ~2x faster at 1 and 4
        tokens on an AMD EPYC, its outputs within ~3e-5 (relative) of the float ones instead of the same bits.
        Only where that kernel runs (AVX-512 VNNI) and every output width is a multiple of 16, else False.
        "int8": the same packing, the activations rounded to int8 (as llama.cpp multiplies Q4_1 blocks; outputs
        within ~1e-2): a verify pass over 4 tokens ~20% faster than int16 on the AMD EPYC, one token alike."""
        from bild_kernels.reference import q4_1_dequantize, q4_1x16_pack
        _check_activations(activations)
        if self._fused is None or self.weight_format != "float32" or len(blocks) != len(self.layers):
            return False
        op = "cpu_linear_q4_1x16" if activations != "float32" else "cpu_linear_q4_1"
        if resolve(op, self.device, None) is not registered(op, "cpu"):
            return False
        taken = []
        for w, given in zip(self.layers, blocks):
            layer = {}
            for name in ("qkv", "o", "gate_up", "down"):
                ref = getattr(w, name)
                q, dm = given.get(name, (None, None))
                N, K = ref.shape
                if not isinstance(q, torch.Tensor) or not isinstance(dm, torch.Tensor) or K % 32 \
                        or q.dtype != torch.uint8 or tuple(q.shape) != (N, K // 2) \
                        or dm.dtype != torch.float32 or tuple(dm.shape) != (N, K // 32, 2):
                    return False
                if activations != "float32" and N % 16:  # 16 output rows a register
                    return False
                q, dm = q.contiguous(), dm.contiguous()
                if not torch.equal(q4_1_dequantize(q, dm), ref):
                    return False
                layer[name] = q4_1x16_pack(q, dm) if activations != "float32" else (q, dm)
            taken.append(layer)
        for w, layer in zip(self.layers, taken):
            w.blocks = layer
        self.activation_bits = _ACTIVATION_BITS.get(activations, 16)
        return True

    @property
    def layer_blocks(self) -> str | None:
        """"q4_1" when the fused CPU layer reads every layer's products from Q4_1 blocks (use_q4_1_layers),
        "q4_1x16" when from those blocks packed for int16 activations, "q4_1x16i8" for int8 ones, else None."""
        if not self.layers or any(w.blocks is None for w in self.layers):
            return None
        if self.layers[0].blocks["qkv"][0].dtype == torch.int8:  # int8 weights packed (quantize_weights)
            return "int8x16"
        if self.layers[0].blocks["qkv"][0].dim() != 5:
            return "q4_1"
        return "q4_1x16" if self.activation_bits == 16 else "q4_1x16i8"

    @property
    def rows_independent(self) -> bool:
        """Whether each token's keys, values and logits come out the same bits whatever else its pass holds (for
        passes of up to fused_max_tokens): the fused CPU layers and the head on GGUF blocks packed for integer
        activations, or on int8 weights packed alike (`quantize_weights`), which round and multiply each row on its
        own (tests/engine/test_int16_activations.py). Where it holds, a prompt prefix copied from the prefix cache
        changes nothing but the time."""
        attn = self.attn_backend or default_attention_backend(self.device, self.dtype)
        gguf = self.layer_blocks in ("q4_1x16", "q4_1x16i8") and self.head_blocks in ("q8_0x16", "q8_0x16i8")
        int8 = self.layer_blocks == "int8x16" and self.head_blocks == "int8x16"
        return self.device.type == "cpu" and self._fused is not None and attn == "cpu" and (gguf or int8)

    @property
    def fused_max_tokens(self) -> int:
        """The longest pass (tokens) that takes the fused CPU layer; longer ones run as ops on F.linear."""
        kind = self.layer_blocks or ""
        if kind.startswith("q4_1x16") or kind == "int8x16":
            return Q4_1X16_FUSED_MAX_TOKENS
        return Q4_1_FUSED_MAX_TOKENS if kind == "q4_1" else CPU_LINEAR_MAX_ROWS

    def quantize_weights(self, kind: str = "int8") -> "WeightFormats":
        """Store every projection and the head as int8 per output channel (weight-only; w ~= q * scale),
        in place. The matrix products read a quarter of the float32 bytes, which is what a small model's
        decode step costs on a CPU; activations stay in the executor's dtype: float32 (the CPU extension's
        cpu_linear_int8, or its reference where the extension is missing) or bfloat16 / float16 (torch's
        int8 weight kernel). The embedding stays as it was (lookups, and the large model it may be shared
        with). Where the CPU has AVX-512 VNNI the projections and head are also packed for cpu_linear_q8_0x16
        (`_pack_int8`: int16 activations, ~2x faster products at a draft step's sizes)."""
        if kind != "int8":
            raise ValueError(f"quantize_weights: kind must be 'int8', got {kind!r}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"int8 weights run with float32, bfloat16 or float16 activations; this model is "
                             f"{self.dtype}")
        check_int8_kernel(self.device, self.dtype)
        c = self.config
        widths = {"hidden_size": c.hidden_size, "num_heads * head_dim": c.num_heads * c.head_dim,
                  "intermediate_size": c.intermediate_size}
        odd = {k: v for k, v in widths.items() if v % INT8_K_MULTIPLE and self.dtype != torch.float32}
        if odd:  # torch's CPU kernel assumes it (other widths crash it rather than raise)
            raise ValueError(f"int8 weights need every projection's input width divisible by {INT8_K_MULTIPLE}; "
                             f"this model has {', '.join(f'{k}={v}' for k, v in odd.items())}")
        self.lm_head = Int8Weight.of(self.lm_head)
        for w in self.layers:
            w.qkv, w.o, w.gate_up, w.down = (Int8Weight.of(t) for t in (w.qkv, w.o, w.gate_up, w.down))
            w.blocks = None
        self.weight_format = "int8"
        int8_fp32 = None
        if self.dtype == torch.float32:
            int8_fp32 = resolve("cpu_linear_int8", self.device, "ref" if self.backend == "ref" else None)
        self._linear = functools.partial(_linear, native=None, int8_fp32=int8_fp32)
        self._head_linear, self.head_blocks, self._head_stats = self._linear, None, None
        self._head_args = self._native_args(self.lm_head, None)
        self._fused = self._fused_layer()
        self.activation_bits = 16  # what the packed int8 weights take (not a GGUF option's int8)
        self._pack_int8()
        return self

    def packs_int8(self, *weights: Int8Weight) -> bool:
        """Whether int8 weights of this model run as packed blocks on cpu_linear_q8_0x16 (see `_pack_int8`)."""
        return (self.dtype == torch.float32 and self.device.type == "cpu" and self.backend in (None, "cpu")
                and resolve("cpu_linear_q8_0x16", self.device, None) is registered("cpu_linear_q8_0x16", "cpu")
                and all(w.q.shape[0] % 16 == 0 and w.q.shape[1] % 32 == 0 for w in weights))

    def _pack_int8(self) -> None:
        """Where the CPU has AVX-512 VNNI, the int8 projections and head also as blocks for cpu_linear_q8_0x16
        (each row's scale as every block's: the same weights), which rounds the activations to int16 per run of
        32 and multiplies in integers: a draft step's products from ~2x fewer instructions than cpu_linear_int8's
        float ones, its outputs within ~3e-5 (relative). Passes of every length take them (a prompt's too: the
        products tile their rows)."""
        projections = [getattr(w, n) for w in self.layers for n in ("qkv", "o", "gate_up", "down")]
        if not self.packs_int8(self.lm_head, *projections):
            return
        for w in self.layers:
            w.blocks = {n: int8_x16(getattr(w, n)) for n in ("qkv", "o", "gate_up", "down")}
        self._head_linear, self._head_stats = self._packed_product(self.lm_head), None
        self._head_args = (*self._head_linear.keywords["packed"], None)
        self.head_blocks = "int8x16"

    def _packed_product(self, w: Int8Weight):
        """x @ w.T (+ bias) from w's packed blocks (`int8_x16`) for float32 passes, else this executor's int8
        product."""
        return functools.partial(_packed_linear, packed=int8_x16(w), linear=self._linear)

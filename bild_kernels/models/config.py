"""ModelConfig: the few numbers the Llama-family executor needs, read from a Hugging Face config.

RoPE frequencies are computed once here, by transformers' own initialisers for scaled variants, so that
the executor's rotary embedding is bit-identical to the HF model's (llama3, linear and yarn scaling
included). Scalings that change with the sequence length (dynamic NTK, longrope) are refused rather
than silently approximated.
"""
from __future__ import annotations

import dataclasses
import math

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "granite")
# families whose attention normalises each query and key head (an RMSNorm over head_dim) before RoPE
QK_NORM_MODEL_TYPES = ("qwen3", "gemma3_text")
# Gemma's layer: RMSNorms scale by (1 + w) in float32, the attention's and the MLP's outputs are normed too before
# their residual adds, the embedding is scaled by sqrt(hidden), GELU (tanh) gates the MLP, sliding layers rotate
# with a RoPE of their own, and the attention scales by query_pre_attn_scalar ** -0.5
GEMMA_MODEL_TYPES = ("gemma3_text",)
# image-text models whose language model the executor runs alone (text in, text out): model_type -> the text
# model's config attribute, and the prefixes their checkpoints give its weights (in memory / on disk) -> ours
MULTIMODAL_TEXT = {"gemma3": "text_config", "mistral3": "text_config"}
MULTIMODAL_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                       "language_model.lm_head.": "lm_head."}
MULTIMODAL_DROPPED = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")
# activations of the gated MLP: the config's name -> the executor's
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# rope types whose frequencies do not depend on the current sequence length
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    inv_freq: torch.Tensor  # [head_dim // 2] float32, scaling already applied
    attention_scaling: float  # multiplies cos/sin (yarn's mscale; 1 otherwise)
    tie_word_embeddings: bool
    sliding_windows: tuple  # per layer: window size in tokens, or None for full attention
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm of every query and key head (weights [head_dim]) before RoPE
    activation: str = "silu"  # the gated MLP's: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    gemma: bool = False  # Gemma's (1 + w) float32 norms, sandwich norms and embedding scale (GEMMA_MODEL_TYPES)
    embed_scale: float = 1.0  # the input embedding's multiplier (Gemma: sqrt(hidden), rounded to float32)
    attn_scale: float | None = None  # the attention's score scale (None: head_dim ** -0.5)
    local_inv_freq: torch.Tensor | None = None  # the sliding layers' own RoPE frequencies (Gemma 3), else None
    local_attention_scaling: float = 1.0
    # Granite's multipliers: the input embedding's, each residual branch's (attention and MLP outputs), and the
    # divisor of the logits (1.0 elsewhere; the attention's own is attn_scale)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @property
    def plain_layers(self) -> bool:
        """Whether the layers are Llama's form up to what the CPU extension's one-call layer takes (q/k norms,
        Gemma's norms and GeGLU): not Granite's scaled residual branches."""
        return self.residual_multiplier == 1.0

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @staticmethod
    def text_weights(hf_config, weights: dict) -> dict:
        """An image-text model's checkpoint (MULTIMODAL_TEXT) as its language model's weights under the executor's
        names (the vision tower and projector dropped); any other model's as they are."""
        if getattr(hf_config, "model_type", None) not in MULTIMODAL_TEXT:
            return weights
        out = {}
        for k, v in weights.items():
            if k.startswith(MULTIMODAL_DROPPED):
                continue
            prefix = next((p for p in MULTIMODAL_PREFIXES if k.startswith(p)), None)
            out[MULTIMODAL_PREFIXES[prefix] + k[len(prefix):] if prefix else k] = v
        return out

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        """From a transformers PretrainedConfig; raises ValueError for what the executor cannot run. An image-text
        model's (Gemma 3 4B and up, Mistral Small 3.x) is its language model's: the executor runs it on text (the
        outer config says whether its head is tied, as transformers ties it)."""
        model_type, outer = getattr(hf_config, "model_type", None), hf_config
        if model_type in MULTIMODAL_TEXT and getattr(hf_config, MULTIMODAL_TEXT[model_type], None) is not None:
            hf_config = getattr(hf_config, MULTIMODAL_TEXT[model_type])
            model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = getattr(hf_config, "architectures", None)
            raise ValueError(f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
                             f"the executor runs {', '.join(SUPPORTED_MODEL_TYPES)} (and the language model of "
                             f"{', '.join(MULTIMODAL_TEXT)})")
        gemma = model_type in GEMMA_MODEL_TYPES
        act = (getattr(hf_config, "hidden_activation", None) if gemma else None) or getattr(hf_config, "hidden_act",
                                                                                           "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}: the executor's gated MLP takes {', '.join(ACTIVATIONS)}")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(hf_config, name, None) is not None:
                raise ValueError(f"unsupported {name}={getattr(hf_config, name)}: the executor does not soft-cap")
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError("unsupported use_bidirectional_attention=True: the executor's attention is causal")
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        local = None
        if gemma:  # one RoPE for the full-attention layers, another for the sliding ones
            inv_freq, attention_scaling, rope_type, theta = _rope(hf_config, head_dim, "full_attention")
            local = _rope(hf_config, head_dim, "sliding_attention")
        else:
            inv_freq, attention_scaling, rope_type, theta = _rope(hf_config, head_dim)
        granite = _granite(hf_config, model_type)
        attn_scale = granite.pop("attn_scale", float(hf_config.query_pre_attn_scalar) ** -0.5 if gemma else None)
        eos = getattr(outer, "eos_token_id", None)  # (an image-text model's own, where it names one)
        eos = eos if eos is not None else getattr(hf_config, "eos_token_id", None)
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            model_type=model_type, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, intermediate_size=hf_config.intermediate_size, rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=theta, rope_type=rope_type, inv_freq=inv_freq, attention_scaling=attention_scaling,
            tie_word_embeddings=bool(getattr(outer, "tie_word_embeddings", None) if outer is not hf_config
                                     and getattr(outer, "tie_word_embeddings", None) is not None
                                     else getattr(hf_config, "tie_word_embeddings", False)),
            sliding_windows=_sliding_windows(hf_config, model_type),
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", 0) or 0,
            bos_token_id=getattr(hf_config, "bos_token_id", None), eos_token_ids=eos,
            qk_norm=model_type in QK_NORM_MODEL_TYPES, activation=ACTIVATIONS[act], gemma=gemma,
            embed_scale=float(torch.tensor(hf_config.hidden_size ** 0.5)) if gemma else 1.0,
            attn_scale=attn_scale,
            local_inv_freq=None if local is None else local[0],
            local_attention_scaling=1.0 if local is None else local[1], **granite)


def _granite(hf_config, model_type: str) -> dict:
    """Granite's multipliers (ModelConfig's fields), its attention's scale among them; {} for other families."""
    if model_type != "granite":
        return {}
    values = {k: float(getattr(hf_config, k)) for k in ("embedding_multiplier", "residual_multiplier",
                                                         "attention_multiplier", "logits_scaling")}
    bad = [f"{k}={v}" for k, v in values.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"Granite's multipliers must be finite and > 0, got {', '.join(bad)}")
    return dict(embedding_multiplier=values["embedding_multiplier"], residual_multiplier=values["residual_multiplier"],
                logits_scaling=values["logits_scaling"], attn_scale=values["attention_multiplier"])


def _rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    # transformers 5 keeps theta and scaling together in `rope_parameters` (Gemma 3: one such dict per layer
    # type); older configs split them.
    params = getattr(hf_config, "rope_parameters", None)
    if layer_type is not None:
        params = (params or {}).get(layer_type)
        if params is None:
            raise ValueError(f"the config has no rope_parameters for its {layer_type} layers")
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if "rope_type" not in params:
        params = {**params, "rope_type": params.get("type", "default")}
    return params


def _rope(hf_config, head_dim: int, layer_type: str | None = None):
    params = _rope_parameters(hf_config, layer_type)
    rope_type = params["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling {rope_type!r}: the executor supports {STATIC_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("unsupported partial_rotary_factor != 1")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        kw = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kw)
    inv_freq = inv_freq.to(torch.float32)
    if inv_freq.shape != (head_dim // 2,) or not math.isfinite(float(scaling)):
        raise ValueError(f"rope initialiser for {rope_type!r} gave inv_freq {tuple(inv_freq.shape)}, "
                         f"scaling {scaling}; expected ({head_dim // 2},)")
    return inv_freq, float(scaling), rope_type, theta


def _sliding_windows(hf_config, model_type: str) -> tuple:
    n = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    if model_type == "llama" or not window:
        return (None,) * n
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:  # Mistral: every layer slides when a window is set
        return (int(window),) * n
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)

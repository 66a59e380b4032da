"""Llama-family executor over the paged KV cache, its per-step metadata, and weight loading."""
from bild_kernels.models.attention import AttentionMetadata, paged_attention, paged_attention_ref
from bild_kernels.models.config import ModelConfig
from bild_kernels.models.llama import LlamaExecutor
from bild_kernels.models.loader import load_model

__all__ = ["AttentionMetadata", "paged_attention", "paged_attention_ref", "ModelConfig", "LlamaExecutor",
           "load_model"]

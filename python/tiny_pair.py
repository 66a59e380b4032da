"""A tiny random Llama pair and a word-level tokenizer, for the load test and the soak (no download).

The large model has 3 layers with a weak last one; the small one is a noisy copy of its first two, so
drafts are often but not always accepted (fallbacks and rollbacks both happen), as in the test suite.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 97


def _llama(seed: int, layers: int, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)  # sharp, stable argmaxes
    return model


def tiny_models(dtype=torch.float64):
    """(large, small) in-memory HF models."""
    large = _llama(1, 3, dtype)
    with torch.no_grad():
        large.model.layers[2].self_attn.o_proj.weight.mul_(0.3)
        large.model.layers[2].mlp.down_proj.weight.mul_(0.3)
    small = _llama(2, 2, dtype)
    small.load_state_dict(large.state_dict(), strict=False)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in small.model.layers.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    return large, small


def tokenizer():
    """Words w0 ... w95 and <unk> (id 96), split on whitespace; a chat template in those words (CHAT_TEMPLATE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# A chat template in the tiny vocabulary's words: w90 opens a turn, w91 / w92 / w93 name its role, w94 closes it.
CHAT_TEMPLATE = ("{% for m in messages %}w90 {{ {'system': 'w91', 'user': 'w92', 'assistant': 'w93'}[m['role']] }} "
                 "{{ m['content'] }} w94 {% endfor %}{% if add_generation_prompt %}w90 w93{% endif %}")


def save_tiny_pair(root, dtype=torch.float64) -> tuple[Path, Path]:
    """Save the pair with the tokenizer under root/large and root/small; return the two directories."""
    root = Path(root)
    tok = tokenizer()
    for name, model in zip(("large", "small"), tiny_models(dtype)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "large", root / "small"

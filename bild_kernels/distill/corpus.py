"""The training corpus: what the large model itself writes for many prompts (on-policy text).

A draft is judged by how often it predicts the large model's next token on the large model's own
continuations, so it is trained on exactly those, with the large model's full distributions as
targets (computed again at training time, never stored: 49152 floats per token would not fit).
"""
from __future__ import annotations

import time

import torch


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat prompt with the generation prompt appended."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    return tokenizer(prompt)["input_ids"]


@torch.inference_mode()
def generate_corpus(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 96, temperature: float = 0.7,
                    batch_size: int = 16, seed: int = 0, log=print) -> list[list[int]]:
    """prompt + response token ids for every prompt, sampled from `model` (left-padded batches)."""
    torch.manual_seed(seed)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None))
    stops = {tokenizer.pad_token_id, tokenizer.eos_token_id} - {None}  # generate() pads finished rows with these
    out, t0, n_tok = [], time.perf_counter(), 0
    for i in range(0, len(prompts), batch_size):
        ids = [chat_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
        width = max(len(x) for x in ids)
        inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        gen = model.generate(inp, attention_mask=mask, do_sample=temperature > 0, temperature=temperature or None,
                             top_p=None, top_k=None, max_new_tokens=max_new_tokens, pad_token_id=pad)
        for x, row in zip(ids, gen[:, width:].tolist()):
            resp = []
            for t in row:
                resp.append(t)
                if t in stops:
                    break
            out.append(x + resp)
            n_tok += len(resp)
        rate = n_tok / (time.perf_counter() - t0)
        log(f"corpus: {min(i + batch_size, len(prompts))}/{len(prompts)} prompts, {n_tok} tokens, {rate:.0f} tok/s")
    return out

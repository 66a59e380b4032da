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


def model_device(model, device=None) -> torch.device:
    """Where `model` runs: `device` when given (the model is moved there, in place, as `Module.to` does),
    else the device of its parameters."""
    if device is not None:
        model.to(device)
        return torch.device(device)
    return next(model.parameters()).device


@torch.inference_mode()
def generate_corpus(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 96, temperature: float = 0.7,
                    batch_size: int = 16, seed: int = 0, samples: int = 1, max_seconds: float | None = None,
                    device=None, log=print) -> list[list[int]]:
    """prompt + response token ids for every prompt, sampled from `model` (left-padded batches).

    samples > 1: every prompt is answered that many times, in passes over all prompts, pass s seeded
    with seed + s (pass 0 is the samples=1 corpus). The answers come pass by pass, so a budget that
    ends early keeps as many distinct prompts as it can.
    max_seconds: stop at the first batch boundary after that much wall time and return what there is
    (at least one batch).
    device: where the model runs (see `model_device`); the returned ids are plain Python lists."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds!r}")
    dev = model_device(model, device)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None))
    stops = {tokenizer.pad_token_id, tokenizer.eos_token_id} - {None}  # generate() pads finished rows with these
    prompt_ids = [chat_ids(tokenizer, p) for p in prompts]  # once, however many passes
    planned = samples * len(prompts)
    out, t0, n_tok = [], time.perf_counter(), 0
    for s in range(samples):
        torch.manual_seed(seed + s)  # the CPU's and every CUDA device's generator
        for i in range(0, len(prompts), batch_size):
            ids = prompt_ids[i:i + batch_size]
            width = max(len(x) for x in ids)
            inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=dev)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=dev)
            gen = model.generate(inp, attention_mask=mask, do_sample=temperature > 0,
                                 temperature=temperature or None, top_p=None, top_k=None,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
            for x, row in zip(ids, gen[:, width:].cpu().tolist()):
                resp = []
                for t in row:
                    resp.append(t)
                    if t in stops:
                        break
                out.append(x + resp)
                n_tok += len(resp)
            elapsed = time.perf_counter() - t0
            rate = n_tok / elapsed
            done = min(i + batch_size, len(prompts))
            log(f"corpus: {done}/{len(prompts)} prompts{f' (pass {s + 1}/{samples})' if samples > 1 else ''}, "
                f"{n_tok} tokens, {rate:.0f} tok/s")
            if max_seconds is not None and elapsed >= max_seconds and len(out) < planned:
                log(f"corpus: time budget of {max_seconds:g} s spent after {elapsed:.0f} s: {len(out)} of "
                    f"{planned} answers, {n_tok} response tokens")
                return out
    return out

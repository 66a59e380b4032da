"""The training corpus: what the large model itself writes for many prompts (on-policy text).

A draft is judged by how often it predicts the large model's next token on the large model's own
continuations, so it is trained on exactly those, with the large model's full distributions as
targets (computed again at training time, never stored: 49152 floats per token would not fit).
"""
from __future__ import annotations

import time

import torch

from bild_kernels.engine.bulk import BatchGenerator, until_stop
from bild_kernels.engine.tokenizer import template_ids


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat prompt with the generation prompt appended."""
    if getattr(tokenizer, "chat_template", None):
        return template_ids(tokenizer, [{"role": "user", "content": prompt}])
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
                    device=None, backend: str = "auto", info: dict | None = None, log=print) -> list[list[int]]:
    """prompt + response token ids for every prompt, sampled from `model` (left-padded batches).

    samples > 1: every prompt is answered that many times, in passes over all prompts, pass s seeded
    with seed + s (pass 0 is the samples=1 corpus). The answers come pass by pass, so a budget that
    ends early keeps as many distinct prompts as it can.
    max_seconds: stop at the first batch boundary after that much wall time and return what there is
    (at least one batch).
    device: where the model runs (see `model_device`); the returned ids are plain Python lists.
    backend: "hf" (transformers' `generate`, seeded by torch's generator), "bild" (`BatchGenerator`: a
    host-free decode loop, CUDA graphs on a GPU; row i of pass s seeded with (seed + s) * 2**32 + i) or
    "auto" (bild on CUDA, hf elsewhere: on a CPU both run at the same speed; should bild fail to build or to
    write the first batch, it says so and hf writes the corpus). Both sample the same distribution, not the
    same answers. info: a dict that gets "backend", the one that wrote the corpus."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds!r}")
    dev = model_device(model, device)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None))
    stops = {tokenizer.pad_token_id, tokenizer.eos_token_id} - {None}  # generate() pads finished rows with these
    prompt_ids = [chat_ids(tokenizer, p) for p in prompts]  # once, however many passes
    write = _Writer(backend, model, dev, batch_size, max(map(len, prompt_ids)) + max_new_tokens, log)
    info = {} if info is None else info
    planned = samples * len(prompts)
    out, t0, n_tok = [], time.perf_counter(), 0
    for s in range(samples):
        torch.manual_seed(seed + s)  # the CPU's and every CUDA device's generator
        for i in range(0, len(prompts), batch_size):
            ids = prompt_ids[i:i + batch_size]
            answers = write(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, pad=pad,
                            stops=stops, seeds=[(seed + s) * 2**32 + i + j for j in range(len(ids))])
            info["backend"] = "bild" if write.bulk is not None else "hf"
            for x, resp in zip(ids, answers):
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


def _backend(backend: str, dev: torch.device) -> str:
    if backend not in ("auto", "hf", "bild"):
        raise ValueError(f"backend must be 'auto', 'hf' or 'bild', got {backend!r}")
    return backend if backend != "auto" else ("bild" if dev.type == "cuda" else "hf")


def _batch_generator(model, dev: torch.device, batch_size: int, max_len: int):
    dtype = next(model.parameters()).dtype
    return BatchGenerator(model, device=dev, dtype=dtype, max_batch_size=batch_size, max_model_len=max_len)


class _Writer:
    """Answers to batches of prompts (token ids) with the chosen backend (see `generate_corpus`). With "auto",
    a BatchGenerator that fails to build or to write its first batch is logged and replaced by HF `generate`
    (a failure after that is raised: half a corpus from each backend is not what was asked for)."""

    def __init__(self, backend: str, model, dev: torch.device, batch_size: int, max_len: int, log):
        self.model, self.log, self.auto = model, log, backend == "auto"
        self.bulk, self.batches = None, 0
        if _backend(backend, dev) == "bild":
            try:
                self.bulk = _batch_generator(model, dev, batch_size, max_len)
            except Exception as exc:  # noqa: BLE001 — "auto" promises a corpus either way
                self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        if not self.auto:
            raise exc
        self.log(f"corpus: BatchGenerator failed ({type(exc).__name__}: {exc}); HF generate writes the corpus")
        self.bulk = None

    def __call__(self, ids, *, max_new_tokens, temperature, top_p, pad, stops, seeds,
                 stop_early: bool = False) -> list[list[int]]:
        self.batches += 1
        if self.bulk is not None:
            try:
                return self.bulk.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          seeds=seeds, stop_ids=stops)
            except Exception as exc:  # noqa: BLE001
                if self.batches > 1:
                    raise
                self._fall_back(exc)
        return hf_answers(self.model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          pad=pad, stops=stops, stop_early=stop_early)


@torch.inference_mode()
def hf_answers(model, ids: list[list[int]], *, max_new_tokens: int, temperature: float, pad: int,
               stops, top_p: float = 1.0, stop_early: bool = False) -> list[list[int]]:
    """transformers' `generate` over one left-padded batch of prompts (token ids; sampled from torch's global
    generator): each answer up to and including its first id in `stops`. stop_early: `stops` also end the
    generation (else the model's own EOS does; the answers are the same)."""
    dev = next(model.parameters()).device
    width = max(len(x) for x in ids)
    inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=dev)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=dev)
    gen = model.generate(inp, attention_mask=mask, do_sample=temperature > 0, temperature=temperature or None,
                         top_p=top_p if top_p < 1.0 else None, top_k=None, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, **({"eos_token_id": sorted(stops)} if stop_early else {}))
    return [until_stop(row, stops) for row in gen[:, width:].cpu().tolist()]


def _user_turn(tokenizer) -> tuple[list[int], set[int]]:
    """What a user turn starts with and which token ids end it: the chat template's text before a user
    message's content, and the first token after it (ChatML's <|im_end|>) or EOS; without a chat template,
    BOS (or EOS) starts a text that EOS ends."""
    eos = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        mark = "\u2063BILD-USER-TURN\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                             add_generation_prompt=False)
        if text.count(mark) != 1:
            raise ValueError("self-written prompts: the chat template does not show a user message's content once")
        before, after = text.split(mark)
        prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
        closing = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        stops = set(closing) | ({eos} if eos is not None else set())
        if prefix and stops:
            return prefix, stops
    if eos is None:
        raise ValueError("self-written prompts need a tokenizer with a chat template or an EOS token")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return [start], {eos}


@torch.inference_mode()
def generate_self_prompts(model, tokenizer, n: int, *, seed: int = 0, temperature: float = 1.0, top_p: float = 0.95,
                          max_new_tokens: int = 64, batch_size: int = 16, exclude=(), device=None,
                          backend: str = "auto", log=print) -> list[str]:
    """Up to n user prompts the large model writes itself (Magpie, Xu et al. 2024): sampled from its chat
    template's user-turn header alone, so they follow what the model learnt users ask, far beyond our
    templates. Only complete turns (the model closed them within max_new_tokens) that are new (not in
    `exclude`, e.g. the held-out prompts, nor seen before) and not blank are kept; at most 4n are sampled, so
    a model that rarely closes a turn gives fewer. Deterministic for a seed on one device and backend
    (see `generate_corpus`; with "bild", sampled row k is seeded with seed * 2**32 + k)."""
    for name, val in (("n", n), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature!r}, {top_p!r}")
    prefix, stops = _user_turn(tokenizer)
    dev = model_device(model, device)
    write = _Writer(backend, model, dev, batch_size, len(prefix) + max_new_tokens, log)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None))
    seen, out, tried, t0 = set(exclude), [], 0, time.perf_counter()
    torch.manual_seed(seed)
    while len(out) < n and tried < 4 * n:
        rows = min(batch_size, 4 * n - tried)
        gen = write([prefix] * rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, pad=pad,
                    stops=stops, seeds=[seed * 2**32 + tried + k for k in range(rows)], stop_early=True)
        tried += rows
        for row in gen:
            end = next((i for i, t in enumerate(row) if t in stops), None)
            if end is None:  # never closed: cut off mid-sentence, or rambling
                continue
            text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            if text and text not in seen and len(out) < n:
                seen.add(text)
                out.append(text)
        log(f"self-written prompts: {len(out)}/{n} kept of {tried} sampled "
            f"({time.perf_counter() - t0:.0f} s)")
    return out

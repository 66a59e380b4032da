"""Hugging Face twins of the engine's models, for the baselines (HF generate, HF assisted generation)."""
from __future__ import annotations

import time
from pathlib import Path

import torch


def hf_model(source, dtype=torch.float32):
    """A transformers causal LM from a model directory or a .gguf file. A GGUF's model remembers the file
    (`bild_gguf_source`), so that bild's executor built from it later (`load_model(model)`: a BatchGenerator
    writing a distillation corpus) can run from the file's own quantised blocks on a CPU."""
    from transformers import AutoModelForCausalLM
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
        model.bild_gguf_source = str(path.resolve())
        return model
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def check_assistant(small) -> None:
    """Refuse, before any model loads, a small model that transformers' assisted generation cannot run: a
    feature draft directory (it reads the large model's hidden states)."""
    from bild_kernels.models.draft import is_draft_dir, read_manifest
    if small is not None and is_draft_dir(small) and read_manifest(small)["kind"] == "feature":
        raise ValueError(f"draft {small} is a feature draft (it reads the large model's hidden states): "
                         "transformers' assisted generation cannot run it; give a standalone draft")


def hf_draft(draft_dir, large) -> torch.nn.Module:
    """A LlamaForCausalLM made of a draft directory's layers and `large`'s embedding and head. Its head
    scores the whole vocabulary (transformers has no reduced-vocabulary head), so its proposals may
    include tokens the engine's draft never proposes."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from bild_kernels.models.draft import read_manifest
    check_assistant(draft_dir)
    manifest = read_manifest(draft_dir)
    cfg = LlamaConfig.from_dict(large.config.to_dict())
    cfg.num_hidden_layers = manifest["num_layers"]
    cfg.layer_types = None
    draft = LlamaForCausalLM(cfg).to(large.dtype).eval()
    weights = load_file(str(Path(draft_dir) / "model.safetensors"))
    weights.pop("draft_vocab", None)
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(large.model.embed_tokens.weight)
        if not cfg.tie_word_embeddings:
            draft.lm_head.weight.copy_(large.lm_head.weight)
        missing, unexpected = draft.load_state_dict({k: v.to(large.dtype) for k, v in weights.items()}, strict=False)
    if unexpected or any(not (k.endswith("embed_tokens.weight") or k == "lm_head.weight") for k in missing):
        raise ValueError(f"draft {draft_dir}: weights do not fit a Llama of its manifest ({unexpected or missing})")
    return draft


def hf_pair(large=None, small=None):
    """(large, small) transformers models for the engine's pair; None/None is the default pair, with its
    standalone draft (`default_standalone_draft`)."""
    from bild_kernels.models.default import default_large, default_standalone_draft
    from bild_kernels.models.draft import is_draft_dir
    if large is None:  # the default pair's standalone draft: transformers cannot run its feature draft
        large, small = default_large(), default_standalone_draft()
    large_model = hf_model(large)
    if small is None:
        return large_model, None
    return large_model, hf_draft(small, large_model) if is_draft_dir(small) else hf_model(small)


def hf_generate(model, prompts, max_tokens: int, *, assistant=None, confidence: float | None = None, lookup: int = 0,
                min_tokens: int = 0) -> tuple[list[list[int]], float]:
    """transformers' greedy `generate` over `prompts` (lists of token ids), one at a time as its assisted generation
    requires: plain, with `assistant` (HF assisted generation, 5 draft tokens a round, `confidence` its
    assistant_confidence_threshold) or with `lookup` (prompt lookup decoding, that many tokens). Stops at the model's
    end of sequence unless `min_tokens` asks for more. Returns (each prompt's new token ids, the wall time in
    seconds)."""
    outs = []
    eos = model.generation_config.eos_token_id
    kw = {}
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = 5
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = confidence or 0.0
        kw["assistant_model"] = assistant
    if lookup:
        kw["prompt_lookup_num_tokens"] = lookup
    if min_tokens:
        kw["min_new_tokens"] = min_tokens
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                                 pad_token_id=eos if isinstance(eos, int) else 0, **kw)
        outs.append(out[0, len(p):].tolist())
    return outs, time.perf_counter() - t0

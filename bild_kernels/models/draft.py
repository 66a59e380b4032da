"""The draft-model directory: a few transformer layers that borrow a large model's embedding and head.

A distilled draft shares the large model's frozen token embedding and LM head (tied or not), so its
directory holds only what is its own, and is small enough to ship inside the package:

    bild_draft.json     format, the base model it belongs to (shape + a probe of its embedding),
                        the large-model layers it was initialised from, a recommended policy
    model.safetensors   model.layers.{i}.*, model.norm.weight, and `draft_vocab` (int64 [n]: the
                        token ids its head scores; absent = the whole vocabulary)
    README.md           the card: how it was trained, on what, its agreement with the base model

A *feature* draft (manifest "kind": "feature", see `bild_kernels.models.feature_draft`) reads the large
model's last hidden state as well as the next token: its safetensors hold `fc.weight`, `fc.bias`,
`feat_mean`, `feat_std`, `emb_scale` beside its layers, and it uses the large model's final norm.

`load_draft` builds the draft's executor on top of an already loaded base executor, whose embedding
tensor it shares (no copy); it refuses a base model that is not the one the draft was trained for.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from bild_kernels.models.llama import LlamaExecutor

MANIFEST = "bild_draft.json"
FORMAT = "bild-draft/1"
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
KINDS = ("layers", "feature")
_FEATURE_KEYS = ("fc.weight", "fc.bias", "feat_mean", "feat_std", "emb_scale")
_PROBE = 8  # the base embedding's [:8, :8] corner identifies it (up to dtype rounding)


def is_draft_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def save_draft(path, state_dict: dict, *, base: LlamaExecutor, init_layers: list[int],
               draft_vocab: torch.Tensor | None = None, base_name: str = "", card: str = "",
               policy: dict | None = None, dtype: torch.dtype = torch.bfloat16, kind: str = "layers") -> Path:
    """Write a draft directory from a transformers-style state dict of the draft (its own layers and
    final norm are kept; embedding and head are dropped: they come from `base` at load time).
    kind="feature": a feature draft's state dict (its layers, `fc.*` and the feature statistics; the
    final norm is the base's)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    own = {}
    for k, v in state_dict.items():
        name = k if k.startswith("model.") else f"model.{k}"
        if name.startswith("model.layers.") or (name == "model.norm.weight" and kind == "layers"):
            own[name] = v.detach().to("cpu", dtype).contiguous()
        elif kind == "feature" and k in _FEATURE_KEYS:  # statistics and input map stay float32
            own[k] = v.detach().to("cpu", torch.float32).contiguous()
    missing = [k for k in _FEATURE_KEYS if kind == "feature" and k not in own]
    if missing:
        raise ValueError(f"a feature draft's state dict needs {missing}")
    if draft_vocab is not None:
        own["draft_vocab"] = draft_vocab.detach().to("cpu", torch.int64).contiguous()
    save_file(own, str(path / "model.safetensors"))
    c = base.config
    manifest = {
        "format": FORMAT, "kind": kind,
        "base": {"name": base_name, "num_layers": c.num_layers, **{k: getattr(c, k) for k in _SHAPE_KEYS},
                 "embedding_probe": base.embed[:_PROBE, :_PROBE].float().cpu().tolist()},
        "num_layers": len(init_layers), "init_layers": list(init_layers),
        "draft_vocab_size": None if draft_vocab is None else int(draft_vocab.numel()),
        "policy": policy or {},
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if card:
        (path / "README.md").write_text(card)
    return path


def read_manifest(path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable draft manifest {path / MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    manifest.setdefault("kind", "layers")
    if manifest["kind"] not in KINDS:
        raise ValueError(f"{path / MANIFEST}: unknown draft kind {manifest['kind']!r} (expected one of {KINDS})")
    return manifest


def load_draft(path, base: LlamaExecutor | None, *, dtype=None, device=None, backend=None,
               who: str = "small model") -> LlamaExecutor:
    """The draft's executor, sharing `base`'s embedding (and head rows, restricted to the draft vocabulary)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if base is None:
        raise ValueError(f"{who}: {str(path)!r} is a draft that borrows a large model's embedding and head; "
                         "load it together with that model (Engine(large=..., small=...))")
    manifest = read_manifest(path)
    b, c = manifest["base"], base.config
    mismatch = [k for k in _SHAPE_KEYS if b.get(k) != getattr(c, k)]
    if mismatch:
        raise ValueError(f"{who}: this draft was made for a different large model "
                         f"({', '.join(f'{k}={b.get(k)} vs {getattr(c, k)}' for k in mismatch)})")
    probe = torch.tensor(b["embedding_probe"], dtype=torch.float32)
    if not torch.allclose(base.embed[:_PROBE, :_PROBE].float().cpu(), probe, rtol=2e-2, atol=2e-2):
        raise ValueError(f"{who}: this draft was made for {b.get('name') or 'another model'}; the large model's "
                         "embedding differs (same shapes, other weights)")
    try:
        weights = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{who}: cannot read {path / 'model.safetensors'}: {exc}") from None
    vocab = weights.pop("draft_vocab", None)
    dtype = dtype or base.dtype
    device = torch.device(device) if device is not None else base.device
    n, init = manifest["num_layers"], manifest["init_layers"]
    config = dataclasses.replace(c, num_layers=n,
                                 sliding_windows=tuple(c.sliding_windows[j] for j in init))
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    # The base's tensors are used as they are when dtype and device agree: no second copy.
    weights["model.embed_tokens.weight"] = base.embed.to(device=device, dtype=dtype)
    if not c.tie_word_embeddings:
        weights["lm_head.weight"] = base.lm_head.to(device=device, dtype=dtype)
    cls = LlamaExecutor
    if manifest["kind"] == "feature":
        from bild_kernels.models.feature_draft import FeatureDraftExecutor
        cls = FeatureDraftExecutor
        weights["model.norm.weight"] = base.norm.to(device=device, dtype=dtype)
    try:
        return cls(config, weights, backend=backend, head_vocab=vocab)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None

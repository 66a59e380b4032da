"""cpu_decoder_layer (one decoder layer in one call of the CPU extension) against its reference twin: outputs and
cache writes for decode, verify and ragged batches with padding, GQA, biases, int8 weights, a sliding
window and Qwen3's per-head q/k norms; batch invariance (bit for bit); the executor using it; bad input."""
import pytest
import torch

from bild_kernels import reference as R
from bild_kernels._backend import cpu_extension
from bild_kernels.models.attention import AttentionMetadata
from bild_kernels.models.llama import Int8Weight
from bild_kernels.ops.cpu_decoder_layer import LayerWeights, cpu_decoder_layer

needs_ext = pytest.mark.skipif(cpu_extension() is None,
                               reason="bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")

DECODE = [(1, 33), (1, 5), (1, 1)]
VERIFY = [(3, 40)]
PADDED = [(1, 0), (5, 21), (1, 0), (2, 2)]  # context 0: padding rows (slot -1), no key to attend
MIXED = [(4, 13), (1, 30), (3, 12)]


def _weights(H, Hq, Hkv, D, inter, *, bias, int8, gen, qk_norm=False, gemma=False):
    def w(n, k):
        t = torch.randn(n, k, generator=gen) * k ** -0.5
        return (*Int8Weight.of(t), None) if int8 else (t, None, None)

    def with_bias(p, n):
        return (p[0], p[1], torch.randn(n, generator=gen) * 0.1) if bias else p
    qkv_n = (Hq + 2 * Hkv) * D
    norms = (0.5 + torch.rand(D, generator=gen), 0.5 + torch.rand(D, generator=gen)) if qk_norm else (None, None)
    outs = (0.5 + torch.rand(H, generator=gen), 0.5 + torch.rand(H, generator=gen)) if gemma else (None, None)
    return LayerWeights(input_norm=1 + 0.1 * torch.randn(H, generator=gen), qkv=with_bias(w(qkv_n, H), qkv_n),
                        o=with_bias(w(H, Hq * D), H), post_norm=1 + 0.1 * torch.randn(H, generator=gen),
                        gate_up=with_bias(w(2 * inter, H), 2 * inter), down=with_bias(w(H, inter), H), q_norm=norms[0],
                        k_norm=norms[1], attn_out_norm=outs[0], mlp_out_norm=outs[1])


def _case(seqs, *, H=48, Hq=4, Hkv=2, D=16, inter=40, block_size=4, bias=False, int8=False, seed=0, qk_norm=False,
          gemma=False):
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // block_size) for _, c in seqs) + 1
    num_blocks = len(seqs) * max_blocks + 2
    tables = torch.randperm(num_blocks, generator=gen)[:len(seqs) * max_blocks].view(len(seqs), max_blocks)
    meta = AttentionMetadata.build([q for q, _ in seqs], [c for _, c in seqs], tables.int(), block_size)
    shape = (num_blocks, block_size, Hkv, D)
    caches = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    T = meta.num_tokens
    x = torch.randn(T, H, generator=gen)
    angle = meta.positions.float()[:, None] * (10000.0 ** (-torch.arange(0, D // 2) / (D // 2)))[None]
    emb = torch.cat((angle, angle), dim=-1)
    weights = _weights(H, Hq, Hkv, D, inter, bias=bias, int8=int8, gen=gen, qk_norm=qk_norm or gemma, gemma=gemma)
    return x, emb.cos(), emb.sin(), weights, caches, meta, Hq, Hkv


def _run(case, backend, window=0, caches=None, bits=16, activation="silu"):
    x, cos, sin, weights, (kc, vc), meta, Hq, Hkv = case
    kc, vc = (kc.clone(), vc.clone()) if caches is None else caches
    out = cpu_decoder_layer(x, cos, sin, weights, kc, vc, meta.slot_mapping, meta.query_start_loc, meta.positions,
                            meta.block_tables, meta.context_lens, num_heads=Hq, num_kv_heads=Hkv,
                            scale=kc.shape[3] ** -0.5, sliding_window=window, eps=1e-5, activation_bits=bits,
                            activation=activation, backend=backend)
    return out, kc, vc


@needs_ext
@pytest.mark.parametrize("seqs", [DECODE, VERIFY, PADDED, MIXED], ids=["decode", "verify", "padded", "mixed"])
@pytest.mark.parametrize("bias, int8", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("window", [0, 3])
def test_cpu_decoder_layer_matches_reference(seqs, bias, int8, window):
    case = _case(seqs, bias=bias, int8=int8)
    want, want_k, want_v = _run(case, "ref", window)
    got, got_k, got_v = _run(case, "cpu", window)
    assert got.dtype == torch.float32 and got.shape == case[0].shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)  # the rotated keys, at the same slots
    torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-5)
    kc0 = case[4][0]
    untouched = torch.ones(kc0.shape[0] * kc0.shape[1], dtype=torch.bool)
    untouched[case[5].slot_mapping[case[5].slot_mapping >= 0]] = False
    assert torch.equal(got_k.flatten(0, 1)[untouched], kc0.flatten(0, 1)[untouched])


@needs_ext
@pytest.mark.parametrize("seqs", [DECODE, VERIFY, PADDED, MIXED], ids=["decode", "verify", "padded", "mixed"])
@pytest.mark.parametrize("int8", [False, True])
def test_cpu_decoder_layer_qk_norm_matches_reference(seqs, int8):
    """Qwen3's layer: every query and key head RMS-normalised before RoPE (the keys in the cache are normed)."""
    case = _case(seqs, int8=int8, qk_norm=True, D=24, seed=3)
    want, want_k, want_v = _run(case, "ref", 3)
    got, got_k, got_v = _run(case, "cpu", 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-5)
    plain, plain_k, _ = _run(case[:3] + (case[3]._replace(q_norm=None, k_norm=None),) + case[4:], "cpu", 3)
    assert not torch.allclose(plain, got, atol=1e-3) and not torch.allclose(plain_k, got_k, atol=1e-3)


@needs_ext
@pytest.mark.parametrize("seqs", [DECODE, VERIFY, PADDED, MIXED], ids=["decode", "verify", "padded", "mixed"])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_cpu_decoder_layer_gemma_form_matches_reference(seqs, int8, activation):
    """Gemma's layer: q/k norms, the attention's and the MLP's outputs normed before their residual adds, GeGLU."""
    case = _case(seqs, int8=int8, gemma=True, D=24, seed=4)
    want, want_k, want_v = _run(case, "ref", 3, activation=activation)
    got, got_k, got_v = _run(case, "cpu", 3, activation=activation)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-5)
    for change in (dict(attn_out_norm=None), dict(mlp_out_norm=None)):  # each piece matters
        other = _run(case[:3] + (case[3]._replace(**change),) + case[4:], "cpu", 3, activation=activation)[0]
        assert not torch.allclose(other, got, atol=1e-3)
    if activation == "gelu_tanh":
        assert not torch.allclose(_run(case, "cpu", 3)[0], got, atol=1e-3)


@needs_ext
def test_cpu_decoder_layer_gelu_tanh_at_large_and_tiny_gates():
    """GeGLU's gate at |g| up to 1e4 and near 0 (the sigmoid form: no inf / inf), against PyTorch's tanh form."""
    case = _case(DECODE, gemma=True, D=24, seed=5)
    x, cos, sin, weights, caches, meta, Hq, Hkv = case
    w, s, b = weights.gate_up
    scaled = weights._replace(gate_up=(w * torch.logspace(-6, 4, w.shape[0])[:, None], s, b))
    case = (x, cos, sin, scaled, caches, meta, Hq, Hkv)
    got, want = (_run(case, be, activation="gelu_tanh")[0] for be in ("cpu", "ref"))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@needs_ext
def test_cpu_decoder_layer_shapes_of_the_default_pair():
    # SmolLM2-135M's layer: hidden 576, 9 query heads over 3 kv heads of 64, intermediate 1536
    case = _case(VERIFY, H=576, Hq=9, Hkv=3, D=64, inter=1536, block_size=16)
    torch.testing.assert_close(_run(case, "cpu")[0], _run(case, "ref")[0], atol=1e-4, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("form", ["llama", "qwen3", "gemma"])
def test_cpu_decoder_layer_is_batch_invariant(form):
    """A sequence's rows get the same bits whatever else is in the pass (a verified token gets its decode
    logits: Greedy equals LargeOnly token for token)."""
    case = _case(MIXED, bias=True, qk_norm=form == "qwen3", gemma=form == "gemma")
    act = "gelu_tanh" if form == "gemma" else "silu"
    x, cos, sin, weights, (kc, vc), meta, Hq, Hkv = case
    full, _, _ = _run(case, "cpu", activation=act)
    for b, (q, c) in enumerate(MIXED):
        s = int(meta.query_start_loc[b])
        one = AttentionMetadata.build([q], [c], meta.block_tables[b:b + 1], kc.shape[1])
        alone, _, _ = _run((x[s:s + q], cos[s:s + q], sin[s:s + q], weights, (kc, vc), one, Hq, Hkv), "cpu",
                           activation=act)
        assert torch.equal(alone, full[s:s + q])


@needs_ext
@pytest.mark.parametrize("int8", [False, True])
def test_cpu_decoder_layer_is_thread_invariant(int8):
    """The same bits on one thread or two: each output is computed by one thread alone, in a fixed order."""
    case = _case(MIXED, bias=True, int8=int8, H=96, inter=200)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(case, "cpu")
        torch.set_num_threads(2)
        two = _run(case, "cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def _q4_1_of(w: torch.Tensor):
    """Q4_1 blocks (q [N, K / 2] uint8, dm [N, K / 32, 2]) near w, and the float32 weights they stand for."""
    from bild_kernels.reference import q4_1_dequantize, q4_1_quantize
    q, dm = q4_1_quantize(w)
    return q, dm, q4_1_dequantize(q, dm)


def _q4_1_case(seqs, pack=lambda q, dm: (q, dm)):
    """A layer case whose projections are Q4_1 weights: (case with the blocks, as `pack` gives them, as the
    projections; the same case with the float32 weights they stand for)."""
    x, cos, sin, weights, caches, meta, Hq, Hkv = _case(seqs, H=64, Hq=4, Hkv=2, D=16, inter=96, bias=True)
    blocks, floats = {}, {}
    for name in ("qkv", "o", "gate_up", "down"):
        w, _, b = getattr(weights, name)
        q, dm, wf = _q4_1_of(w)
        blocks[name], floats[name] = (*pack(q, dm), b), (wf, None, b)
    return ((x, cos, sin, weights._replace(**blocks), caches, meta, Hq, Hkv),
            (x, cos, sin, weights._replace(**floats), caches, meta, Hq, Hkv))


@needs_ext
@pytest.mark.parametrize("seqs", [DECODE, VERIFY, MIXED], ids=["decode", "verify", "mixed"])
def test_cpu_decoder_layer_q4_1_blocks_give_the_float32_bits(seqs):
    """Projections given as Q4_1 blocks (uint8 weight, dm as the scale) give the layer's output and cache writes on
    their float32 weights, bit for bit; the reference twin agrees."""
    as_q4, as_f32 = _q4_1_case(seqs)
    got = _run(as_q4, "cpu")
    want = _run(as_f32, "cpu")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ref = _run(as_q4, "ref")
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)


needs_vnni = pytest.mark.skipif(cpu_extension() is None or not torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported(),
                                reason="this CPU lacks AVX-512 VNNI (cpu_linear_q4_1x16)")


@needs_vnni
@pytest.mark.parametrize("seqs", [DECODE, VERIFY, MIXED], ids=["decode", "verify", "mixed"])
@pytest.mark.parametrize("bits, rounding", [(16, 2e-3), (8, 8e-2)])
def test_cpu_decoder_layer_packed_q4_1_blocks_match_the_reference(seqs, bits, rounding):
    """Projections given as Q4_1 blocks packed for integer activations (reference.q4_1x16_pack): the reference
    twin's output and cache writes (its products are cpu_linear_q4_1x16_ref at the same activation_bits), and
    within the activation rounding of the float32 weights' layer."""
    from bild_kernels.reference import q4_1x16_pack
    as_x16, as_f32 = _q4_1_case(seqs, q4_1x16_pack)
    got = _run(as_x16, "cpu", bits=bits)
    ref = _run(as_x16, "ref", bits=bits)
    f32 = _run(as_f32, "cpu")
    for a, b, c in zip(got, ref, f32):  # the twins' float steps differ in order: an activation may round the other way
        torch.testing.assert_close(a, b, atol=5e-4 * float(b.abs().max()) * (1 if bits == 16 else 20), rtol=0)
        torch.testing.assert_close(a, c, atol=rounding * float(c.abs().max()), rtol=0)


@needs_vnni
@pytest.mark.parametrize("seqs", [DECODE, VERIFY, MIXED], ids=["decode", "verify", "mixed"])
@pytest.mark.parametrize("bits", [16, 8])
def test_cpu_decoder_layer_packed_int8_weights_match_the_reference(seqs, bits):
    """int8 weights packed as Q8_0 blocks (models.llama.int8_x16: the row's scale as every block's; the draft's
    layers on a CPU with VNNI): the reference twin's output and cache writes, and within the activation rounding
    of the same int8 weights against float activations (cpu_linear_int8)."""
    from bild_kernels.models.llama import int8_x16
    x, cos, sin, weights, caches, meta, Hq, Hkv = _case(seqs, H=64, Hq=4, Hkv=2, D=16, inter=96, bias=True, int8=True)
    packed = weights._replace(**{n: (*int8_x16(Int8Weight(*getattr(weights, n)[:2])), getattr(weights, n)[2])
                                 for n in ("qkv", "o", "gate_up", "down")})
    as_x16 = (x, cos, sin, packed, caches, meta, Hq, Hkv)
    got = _run(as_x16, "cpu", bits=bits)
    ref = _run(as_x16, "ref", bits=bits)
    float_acts = _run((x, cos, sin, weights, caches, meta, Hq, Hkv), "cpu")
    for a, b, c in zip(got, ref, float_acts):
        torch.testing.assert_close(a, b, atol=5e-4 * float(b.abs().max()) * (1 if bits == 16 else 20), rtol=0)
        torch.testing.assert_close(a, c, atol=(2e-3 if bits == 16 else 8e-2) * float(c.abs().max()), rtol=0)


@needs_ext
def test_cpu_decoder_layer_q4_1_bad_input():
    case = _case(DECODE, H=64, Hq=4, Hkv=2, D=16, inter=96)
    x, cos, sin, weights, caches, meta, Hq, Hkv = case
    q, dm, _ = _q4_1_of(weights.o[0])
    for bad, match in (((q, dm[:, :1].contiguous(), None), r"o scale must have shape \[64, 2, 2\]"),
                       ((q[:, :16].contiguous(), dm, None), r"o weight must have shape \[64, 32\]"),
                       ((q, None, None), r"o weight must have dtype in \[.torch.float32.\], got torch.uint8")):
        with pytest.raises((ValueError, TypeError), match=match):
            _run((x, cos, sin, weights._replace(o=bad), caches, meta, Hq, Hkv), "cpu")


def _hf(family, **kw):
    """A tiny random Llama or Qwen3 (per-head q/k norms, not all ones) of `kw`'s shape."""
    import transformers
    cls = {"qwen3": transformers.Qwen3Config, "gemma3": transformers.Gemma3TextConfig}.get(family,
                                                                                           transformers.LlamaConfig)
    if family == "gemma3":  # a sliding layer (its own RoPE) after a full one
        kw = dict(kw, sliding_window=4, layer_types=["full_attention", "sliding_attention"][:kw["num_hidden_layers"]],
                  query_pre_attn_scalar=12)
    hf = transformers.AutoModelForCausalLM.from_config(cls(**kw))
    if family == "gemma3":
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(-0.5, 0.5)
    if family == "qwen3":
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return hf


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_cpu_decoder_layer_ref_is_the_executors_layer(family):
    """The reference twin is the executor's own PyTorch layer (LlamaExecutor._layer), op for op."""
    from bild_kernels.models import load_model
    torch.manual_seed(0)
    hf = _hf(family, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
    ex, _ = load_model(hf, dtype=torch.float32, device=torch.device("cpu"), role="large", backend="ref")
    assert ex._fused is None  # backend "ref": F.linear and the reference ops
    w = ex.layers[0]
    meta = AttentionMetadata.build([3], [7], torch.tensor([[0, 1]], dtype=torch.int32), 4)
    caches = ex.allocate_kv_cache(2, 4)
    x = torch.randn(3, 32)
    cos, sin = ex._rope_cos_sin(meta.positions)
    kc1, vc1 = caches[0][0].clone(), caches[0][1].clone()
    from bild_kernels.models.attention import paged_attention
    want = ex._layer(0, x, cos, sin, (kc1, vc1), lambda k, v, kc, vc, s: R.write_paged_kv_ref(k, v, kc, vc, s),
                     meta.slot_mapping, lambda q, kc, vc, win: paged_attention(q, kc, vc, meta, scale=ex.scale,
                                                                               backend="ref"))
    weights = LayerWeights(w.input_norm, (w.qkv, None, w.qkv_bias), (w.o, None, w.o_bias), w.post_norm,
                           (w.gate_up, None, w.gate_up_bias), (w.down, None, w.down_bias), w.q_norm, w.k_norm,
                           w.attn_out_norm, w.mlp_out_norm)
    assert (w.q_norm is not None) == (family != "llama") and (w.mlp_out_norm is not None) == (family == "gemma3")
    kc2, vc2 = caches[0][0].clone(), caches[0][1].clone()
    got = cpu_decoder_layer(x, cos.view(3, -1), sin.view(3, -1), weights, kc2, vc2, meta.slot_mapping,
                            meta.query_start_loc, meta.positions, meta.block_tables, meta.context_lens,
                            num_heads=4, num_kv_heads=2, scale=ex.scale, eps=ex.config.rms_norm_eps,
                            activation=w.activation, backend="ref")
    assert torch.equal(got, want) and torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


@needs_ext
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_executor_takes_the_fused_layer_for_short_float32_passes(family):
    """A float32 CPU executor runs passes of up to 16 tokens through the fused layer (int8 weights too) and
    longer ones (prefill) through PyTorch ops; both agree with the unfused executor."""
    from bild_kernels.models import load_model
    torch.manual_seed(1)
    hf = _hf(family, vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, head_dim=16)
    for int8 in (False, True):
        ex, _ = load_model(hf, dtype=torch.float32, device=torch.device("cpu"), role="large")
        if int8:
            ex.quantize_weights("int8")
        assert ex._fused is not None
        for T, c in ((1, 20), (3, 40), (16, 16), (17, 17)):
            meta = AttentionMetadata.build([T], [c], torch.arange(12, dtype=torch.int32)[None], 4)
            ids = torch.randint(0, 96, (T,))
            caches = [(kc.normal_(), vc.normal_()) for kc, vc in ex.allocate_kv_cache(12, 4)]
            copy = [(kc.clone(), vc.clone()) for kc, vc in caches]
            fused = ex.forward(ids, meta, caches)
            saved, ex._fused = ex._fused, None
            plain = ex.forward(ids, meta, copy)
            ex._fused = saved
            torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
            for (k1, v1), (k2, v2) in zip(caches, copy):
                torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    # a weight replaced after construction (as tests and tools do) reaches the fused layer too
    ex.layers[0].o = Int8Weight.of(torch.zeros_like(ex.layers[0].o.dequantize()))
    meta = AttentionMetadata.build([2], [5], torch.arange(12, dtype=torch.int32)[None], 4)
    outs = []
    for fused in (ex._fused, None):
        ex._fused = fused
        outs.append(ex.forward(torch.tensor([3, 4]), meta, ex.allocate_kv_cache(12, 4)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    ex64, _ = load_model(hf, dtype=torch.float64, device=torch.device("cpu"), role="large")
    assert ex64._fused is None  # float64 (exactness tests) stays on the reference ops


@needs_ext
@pytest.mark.parametrize("change, exc, match", [
    (dict(x=lambda c: c[0].double()), TypeError, "x must have dtype"),
    (dict(cos=lambda c: c[1][:, :-2]), ValueError, r"cos must have shape"),
    (dict(slot=lambda c: c[5].slot_mapping.int()), TypeError, "slot_mapping must have dtype"),
    (dict(qkv=lambda c: (c[3].qkv[0][:-1], None, None)), ValueError, r"qkv weight must have shape"),
    (dict(down=lambda c: (c[3].down[0].to(torch.int8), None, None)), TypeError, "down weight must have dtype"),
    (dict(heads=3), ValueError, "num_heads"),
    (dict(bits=12), ValueError, "activation_bits must be 8 or 16, got 12"),
    (dict(norms=lambda c: (torch.ones(16), None)), ValueError, "q_norm and k_norm come together.*only q_norm"),
    (dict(norms=lambda c: (torch.ones(16), torch.ones(15))), ValueError, r"k_norm must have shape \[16\], got \[15\]"),
    (dict(norms=lambda c: (torch.ones(16, dtype=torch.float64),) * 2), TypeError, "q_norm must have dtype"),
    (dict(outs=lambda c: (torch.ones(47), None)), ValueError, r"attn_out_norm must have shape \[48\], got \[47\]"),
    (dict(act="gelu"), ValueError, r"activation must be one of \('silu', 'gelu_tanh'\), got 'gelu'"),
])
def test_cpu_decoder_layer_bad_input(change, exc, match):
    case = _case(DECODE)
    x, cos, sin, weights, (kc, vc), meta, Hq, Hkv = case
    slot = meta.slot_mapping
    if "x" in change:
        x = change["x"](case)
    if "cos" in change:
        cos = change["cos"](case)
    if "slot" in change:
        slot = change["slot"](case)
    for name in ("qkv", "down"):
        if name in change:
            weights = weights._replace(**{name: change[name](case)})
    if "norms" in change:
        q_norm, k_norm = change["norms"](case)
        weights = weights._replace(q_norm=q_norm, k_norm=k_norm)
    if "outs" in change:
        attn_out_norm, mlp_out_norm = change["outs"](case)
        weights = weights._replace(attn_out_norm=attn_out_norm, mlp_out_norm=mlp_out_norm)
    Hq = change.get("heads", Hq)
    before = kc.clone()
    with pytest.raises(exc, match=match):
        cpu_decoder_layer(x, cos, sin, weights, kc, vc, slot, meta.query_start_loc, meta.positions,
                          meta.block_tables, meta.context_lens, num_heads=Hq, num_kv_heads=Hkv, scale=0.25, eps=1e-5,
                          activation_bits=change.get("bits", 16), activation=change.get("act", "silu"))
    assert torch.equal(kc, before)  # nothing written


@needs_ext
@pytest.mark.parametrize("form", ["llama", "qwen3", "gemma"])
def test_cpu_decoder_layer_fake_impl(form):
    case = _case(DECODE, qk_norm=form == "qwen3", gemma=form == "gemma")
    x, cos, sin, weights, (kc, vc), meta, Hq, Hkv = case
    from bild_kernels.ops.cpu_decoder_layer import layer_args, layer_extras
    args = (x, cos, sin, *layer_args(weights), kc, vc, meta.slot_mapping, meta.query_start_loc, meta.positions,
            meta.block_tables, meta.context_lens, Hq, Hkv, 0.25, 0, 1e-5, 16,
            *layer_extras(weights, "gelu_tanh" if form == "gemma" else "silu"))
    torch.library.opcheck(torch.ops.bild_kernels_cpu.cpu_decoder_layer, args,
                          test_utils=("test_schema", "test_faketensor"))

"""Triton paged attention against paged_attention_ref: prefill / extend / decode mixes, GQA, odd sizes, padding."""
import pytest
import torch

from bild_kernels.models.attention import AttentionMetadata, paged_attention, paged_attention_ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (query_len, context_len) per sequence; context includes the new tokens; (1, 0) is a padding row.
PREFILL = [(7, 7), (1, 1), (20, 20)]
DECODE = [(1, 33), (1, 5), (1, 17), (1, 1)]
EXTEND = [(4, 40), (1, 9), (6, 6), (3, 19)]
PADDED = [(1, 0), (5, 21), (1, 0), (1, 2)]
MIXED = [(13, 13), (1, 30), (5, 12), (1, 0)]


def _case(seqs, block_size, num_kv_heads, group, head_dim, dtype, device):
    max_blocks = max(-(-c // block_size) for _, c in seqs) + 1
    num_blocks = len(seqs) * max_blocks + 3
    # Blocks scattered over the pool in random order, so that table lookups really matter.
    block_tables = torch.randperm(num_blocks, device=device)[:len(seqs) * max_blocks].view(len(seqs), max_blocks)
    meta = AttentionMetadata.build([q for q, _ in seqs], [c for _, c in seqs], block_tables.int(), block_size)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device=device).to(dtype)
    value_cache = torch.randn(shape, device=device).to(dtype)
    query = torch.randn(meta.num_tokens, num_kv_heads * group, head_dim, device=device).to(dtype)
    return query, key_cache, value_cache, meta


def _poisoned(cache, meta):
    """A copy with NaN in every slot outside the sequences' contexts: the kernel must never read them."""
    bs = cache.shape[1]
    keep = torch.zeros(cache.shape[0] * bs, dtype=torch.bool, device=cache.device)
    for row, ctx in zip(meta.block_tables.tolist(), meta.context_lens.tolist()):
        for p in range(ctx):
            keep[row[p // bs] * bs + p % bs] = True
    out = cache.clone().view(-1, *cache.shape[2:])
    out[~keep] = float("nan")
    return out.view(cache.shape)


@pytest.mark.parametrize("seqs", [PREFILL, DECODE, EXTEND, PADDED, MIXED],
                         ids=["prefill", "decode", "extend", "padded", "mixed"])
@pytest.mark.parametrize("block_size, num_kv_heads, group, head_dim", [
    (16, 2, 1, 64), (16, 1, 4, 128), (1, 2, 4, 64), (16, 3, 3, 64), (5, 1, 1, 128),
])
@pytest.mark.parametrize("dtype, atol, rtol", [(F32, 2e-5, 1e-5), (F16, 2e-3, 2e-3), (BF16, 1.6e-2, 1.6e-2)])
def test_paged_attention(backend_device, seqs, block_size, num_kv_heads, group, head_dim, dtype, atol, rtol):
    backend, device = backend_device
    if backend == "cuda":
        pytest.skip("paged attention has no CUDA-extension kernel: Triton serves the GPU")
    if dtype != F32 and (block_size, group) not in ((16, 1), (1, 4)):
        pytest.skip("16-bit dtypes on two shapes only (interpreter time)")
    query, key_cache, value_cache, meta = _case(seqs, block_size, num_kv_heads, group, head_dim, dtype, device)
    scale = head_dim ** -0.5
    want = paged_attention_ref(query, key_cache, value_cache, meta.query_start_loc, meta.positions,
                               meta.block_tables, meta.context_lens, scale)
    got = paged_attention(query, _poisoned(key_cache, meta), _poisoned(value_cache, meta), meta, scale=scale,
                          backend="triton")
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    pad = torch.tensor([c == 0 for q, c in seqs for _ in range(q)], device=device)
    assert torch.equal(got[pad], torch.zeros_like(got[pad]))  # a row with no key gives zeros


@pytest.mark.parametrize("window", [1, 4, 9])
def test_paged_attention_sliding_window(backend_device, window):
    backend, device = backend_device
    if backend == "cuda":
        pytest.skip("paged attention has no CUDA-extension kernel: Triton serves the GPU")
    query, key_cache, value_cache, meta = _case(MIXED, 4, 2, 2, 64, F32, device)
    want = paged_attention_ref(query, key_cache, value_cache, meta.query_start_loc, meta.positions,
                               meta.block_tables, meta.context_lens, 0.125, window)
    got = paged_attention(query, key_cache, value_cache, meta, scale=0.125, sliding_window=window, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_paged_attention_ref_matches_dense_causal():
    """The reference itself against plain causal attention on one contiguous sequence (block size 1 pool)."""
    T, Hkv, G, D = 9, 2, 3, 16
    query, key_cache, value_cache, meta = _case([(T, T)], 1, Hkv, G, D, torch.float64, "cpu")
    slots = meta.slot_mapping
    k = key_cache.view(-1, Hkv, D)[slots].repeat_interleave(G, dim=1)  # [T, Hq, D]
    v = value_cache.view(-1, Hkv, D)[slots].repeat_interleave(G, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(query.transpose(0, 1), k.transpose(0, 1),
                                                            v.transpose(0, 1), is_causal=True).transpose(0, 1)
    got = paged_attention_ref(query, key_cache, value_cache, meta.query_start_loc, meta.positions,
                              meta.block_tables, meta.context_lens, D ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


ONE_DECODE = [(1, 33)]  # batch-1 decode and verify: the CPU path returns the one sequence's output directly
ONE_EXTEND = [(3, 40)]


@pytest.mark.parametrize("seqs", [PREFILL, DECODE, EXTEND, PADDED, MIXED, ONE_DECODE, ONE_EXTEND])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float64, BF16])
def test_reference_cpu_path_equals_the_gather_path(seqs, window, dtype):
    """On CPU tensors the reference indexes each row's blocks and calls SDPA; the dense-gather path (the one
    that runs on a GPU stream) is the same function of its inputs."""
    from bild_kernels.models.attention import _paged_attention_cpu, _paged_attention_gather
    query, key_cache, value_cache, meta = _case(seqs, 4, 2, 3, 32, dtype, "cpu")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = (query, key_cache, value_cache, meta.query_start_loc, meta.positions, meta.block_tables,
            meta.context_lens, 32 ** -0.5, window, acc)
    fast, dense = _paged_attention_cpu(*args), _paged_attention_gather(*args)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(fast, dense, atol=tol, rtol=tol)
    pad = torch.tensor([c == 0 for q, c in seqs for _ in range(q)])
    assert torch.equal(fast[pad], torch.zeros_like(fast[pad]))


@pytest.mark.parametrize("seqs", [MIXED, ONE_EXTEND])
def test_cpu_attention_plan_is_shared_by_layers_with_different_windows(seqs):
    """One plan per forward serves every layer: alternating sliding windows (as Mistral/Qwen2 layers do)
    must each get their own masks, not the first layer's."""
    from bild_kernels.models.attention import CpuAttentionPlan, _paged_attention_gather
    query, key_cache, value_cache, meta = _case(seqs, 4, 2, 3, 32, torch.float64, "cpu")
    plan = CpuAttentionPlan.of(meta, 4)
    for window in (0, 3, 0, 5, 3):
        want = _paged_attention_gather(query, key_cache, value_cache, meta.query_start_loc, meta.positions,
                                       meta.block_tables, meta.context_lens, 0.2, window, torch.float64)
        torch.testing.assert_close(plan.attend(query, key_cache, value_cache, 0.2, window), want,
                                   atol=1e-12, rtol=1e-12)


def _cpu_kernel_ok():
    from bild_kernels._backend import cpu_extension
    return cpu_extension() is not None


requires_cpu_kernel = pytest.mark.skipif(not _cpu_kernel_ok(), reason="bild_kernels._cpu not built, or no AVX2/FMA")


@requires_cpu_kernel
@pytest.mark.parametrize("seqs", [PREFILL, DECODE, EXTEND, PADDED, MIXED, ONE_DECODE, ONE_EXTEND],
                         ids=["prefill", "decode", "extend", "padded", "mixed", "one-decode", "one-extend"])
@pytest.mark.parametrize("block_size, num_kv_heads, group, head_dim", [
    (16, 2, 1, 64), (16, 1, 4, 128), (1, 2, 4, 64), (16, 3, 3, 64), (5, 1, 1, 128), (4, 2, 3, 36),
])
@pytest.mark.parametrize("window", [0, 3])
def test_cpu_paged_attention_matches_reference(seqs, block_size, num_kv_heads, group, head_dim, window):
    """bild_kernels._cpu's kernel (keys and values read in place through the table) against the reference;
    slots outside every context hold NaN, so a stray read shows; rows with no key give zeros."""
    query, key_cache, value_cache, meta = _case(seqs, block_size, num_kv_heads, group, head_dim, F32, "cpu")
    scale = head_dim ** -0.5
    want = paged_attention_ref(query, key_cache, value_cache, meta.query_start_loc, meta.positions,
                               meta.block_tables, meta.context_lens, scale, window)
    got = paged_attention(query, _poisoned(key_cache, meta), _poisoned(value_cache, meta), meta, scale=scale,
                          sliding_window=window, backend="cpu")
    assert got.dtype == F32 and got.shape == query.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    pad = torch.tensor([c == 0 for q, c in seqs for _ in range(q)])
    assert torch.equal(got[pad], torch.zeros_like(got[pad]))


@requires_cpu_kernel
def test_cpu_paged_attention_is_batch_invariant_and_the_cpu_default():
    """A token's output has the same bits alone or in a batch (the verifier's tokens get what decode gets),
    and float32 CPU tensors take this kernel by default (float64 the reference)."""
    from bild_kernels.models.attention import default_attention_backend
    query, key_cache, value_cache, meta = _case(MIXED, 4, 2, 3, 64, F32, "cpu")
    full = paged_attention(query, key_cache, value_cache, meta, scale=0.125, backend="cpu")
    for b, (q, c) in enumerate(MIXED):
        s = int(meta.query_start_loc[b])
        one = AttentionMetadata.build([q], [c], meta.block_tables[b:b + 1], 4)
        alone = paged_attention(query[s:s + q], key_cache, value_cache, one, scale=0.125, backend="cpu")
        assert torch.equal(alone, full[s:s + q])
    assert default_attention_backend(torch.device("cpu"), F32) in ("cpu", "ref", "triton")
    if not __import__("os").environ.get("BILD_BACKEND"):
        assert default_attention_backend(torch.device("cpu"), F32) == "cpu"
    assert default_attention_backend(torch.device("cpu"), torch.float64) == "ref"


@requires_cpu_kernel
def test_cpu_paged_attention_is_thread_invariant():
    query, key_cache, value_cache, meta = _case(MIXED, 4, 2, 3, 64, F32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention(query, key_cache, value_cache, meta, scale=0.125, backend="cpu")
        torch.set_num_threads(2)
        two = paged_attention(query, key_cache, value_cache, meta, scale=0.125, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@requires_cpu_kernel
def test_cpu_paged_attention_bad_input():
    query, key_cache, value_cache, meta = _case(DECODE, 16, 2, 1, 64, F32, "cpu")
    with pytest.raises(ValueError, match="float32 CPU"):
        paged_attention(query.double(), key_cache.double(), value_cache.double(), meta, scale=1.0, backend="cpu")
    bad = AttentionMetadata(meta.query_start_loc, meta.positions, meta.slot_mapping,
                            meta.block_tables.clone().fill_(10**6), meta.context_lens, 1)
    with pytest.raises(RuntimeError, match="holds block"):  # a table entry outside the pool: refused, not read
        paged_attention(query, key_cache, value_cache, bad, scale=1.0, backend="cpu")
    with pytest.raises(RuntimeError, match="kv heads"):
        paged_attention(query[:, :1], key_cache, value_cache, meta, scale=1.0, backend="cpu")


def test_paged_attention_bad_input():
    query, key_cache, value_cache, meta = _case(DECODE, 16, 2, 1, 64, F32, "cpu")
    with pytest.raises(ValueError, match="backend"):
        paged_attention(query, key_cache, value_cache, meta, scale=1.0, backend="cuda")
    with pytest.raises(ValueError, match="block_tables"):
        AttentionMetadata(meta.query_start_loc, meta.positions, meta.slot_mapping, meta.block_tables.long(),
                          meta.context_lens, 1).validate()
    with pytest.raises(ValueError, match="slot_mapping"):
        AttentionMetadata(meta.query_start_loc, meta.positions, meta.slot_mapping[:-1], meta.block_tables,
                          meta.context_lens, 1).validate()

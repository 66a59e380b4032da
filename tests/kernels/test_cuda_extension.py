"""The CUDA extension bild_kernels._C: its op schemas, clear errors off the GPU, and (on a GPU) the
CUDA-specific checks the per-op tests do not make: every op against the reference at odd sizes and
dtypes called directly through torch.ops.bild_kernels_C, CUDA-graph capture, opcheck, and the native
C++ test binary (tests/native) built with nvcc."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bild_kernels import reference as R
from bild_kernels._backend import cuda_extension
from tests.conftest import HAS_GPU, requires_gpu

pytestmark = pytest.mark.skipif(cuda_extension() is None, reason="bild_kernels._C was not built")
C = torch.ops.bild_kernels_C if cuda_extension() is not None else None
SCHEMAS = {
    "write_paged_kv": "(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping)"
                      " -> ()",
    "reserve_paged_kv": "(Tensor(a!) block_tables, Tensor(b!) context_lens, Tensor num_new, Tensor(c!) free_blocks, "
                        "Tensor(d!) num_free, int block_size) -> ()",
    "rollback_paged_kv": "(Tensor(a!) block_tables, Tensor(b!) context_lens, Tensor num_rejected, "
                         "Tensor(c!) free_blocks, Tensor(d!) num_free, int block_size) -> ()",
    "gather_paged_kv": "(Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor context_lens) "
                       "-> (Tensor, Tensor)",
    "sample_draft": "(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, "
                    "Tensor fallback_threshold, Tensor? min_p=None, int rows=7) -> (Tensor, Tensor, Tensor, Tensor, "
                    "Tensor)",
    "verify_draft": "(Tensor draft_ids, Tensor target_logits, int mode, Tensor rollback_threshold, "
                    "Tensor? draft_probs, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, "
                    "Tensor offset, Tensor? min_p=None, int rows=7) -> (Tensor, Tensor, Tensor, Tensor)",
    "apply_penalties": "(Tensor logits, Tensor token_ids, Tensor prompt_lens, Tensor draft_ids, "
                       "Tensor repetition_penalty, Tensor presence_penalty, Tensor frequency_penalty, "
                       "Tensor min_tokens, Tensor banned_ids, Tensor bias_ids, Tensor bias_values) -> Tensor",
    "apply_token_bitmask": "(Tensor logits, Tensor bitmask) -> Tensor",
}
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-5, 1e-4), (torch.bfloat16, 1e-5, 1e-4)]


def row_params(B, V, device, seed0=0, greedy_every=3, filters=True):
    """Per-row sampling parameters with greedy rows, top-k 1, top-p 1.0 and exact top-p cut-offs mixed."""
    g = torch.Generator().manual_seed(seed0 + B + V)
    temperature = torch.rand(B, generator=g) * 1.5 + 0.2
    temperature[::greedy_every] = 0.0
    top_k = torch.zeros(B, dtype=torch.int32)
    top_p = torch.ones(B)
    if filters:
        top_k = torch.where(torch.rand(B, generator=g) < 0.4, torch.randint(1, min(V, 40) + 1, (B,), generator=g), 0)
        top_k[1::5] = 1
        top_k = top_k.int()
        top_p = torch.where(torch.rand(B, generator=g) < 0.4, -1.0, 1.0)  # -1: set per row by exact_top_p
    seed = torch.randint(-2**62, 2**62, (B,), generator=g)
    offset = torch.randint(0, 2**40, (B,), generator=g)
    return [x.to(device) for x in (temperature, top_k, top_p, seed, offset)]


def spaced_logits(rows, V, dtype, seed):
    """Rows that permute one spaced grid whose lowest 5% are -inf: no near-ties for summation order to
    flip, and every row has the same sorted probabilities, so one exact top-p holds at all of a row's
    positions."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-8.0, 8.0, V)
    grid[: V // 20] = float("-inf")
    return torch.stack([grid[torch.randperm(V, generator=g)] for _ in range(rows)]).to(dtype)


def exact_top_p(z, temperature, top_p, rank=5):
    """Replace top_p = -1 by a value halfway between two cumulative steps (float64): the kept set is then
    the top rank+1 tokens whatever the kernel's summation order."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).double().unsqueeze(1)
    p = torch.softmax(z.double() / t, dim=1).sort(dim=1, descending=True).values.cumsum(1)
    mid = ((p[:, rank - 1] + p[:, rank]) / 2).float()
    return torch.where(top_p < 0, mid, top_p)


def _penalty_args(B, P, V, L, E, dtype, device, seed=0):
    """apply_penalties' positional arguments: histories with repeats and pads, drafts repeating them, per-row
    penalties (every third row neutral), min_tokens around each row's output length, banned ids with pads."""
    g = torch.Generator().manual_seed(seed + B + P + V)
    z = (torch.randn(B, P, V, generator=g) * 4).to(dtype)
    token_ids = torch.randint(-1, min(V, 40), (B, L), generator=g)
    prompt_lens = torch.randint(0, L + 1, (B,), generator=g).int()
    draft_ids = torch.randint(-1, min(V, 40), (B, P - 1), generator=g)
    rep = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    pres, freq = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    rep[::3], pres[::3], freq[::3] = 1.0, 0.0, 0.0
    min_tokens = torch.randint(0, L + P + 1, (B,), generator=g).int()
    banned_ids = torch.randint(-1, V, (B, E), generator=g)
    bias_ids = torch.stack([torch.randperm(V, generator=g)[:2] for _ in range(B)])  # distinct ids a row
    bias_ids[::4] = -1
    bias_values = torch.randn(B, 2, generator=g, dtype=torch.float64) * 3
    return [x.to(device) for x in (z, token_ids, prompt_lens, draft_ids, rep, pres, freq, min_tokens, banned_ids,
                                   bias_ids, bias_values)]


def _bitmask_args(shape, dtype, device, seed=0):
    """apply_token_bitmask's positional arguments: logits [..., V] with some -inf, and random words with every fifth row
    all set (the bits past V too) and every fifth all clear."""
    g = torch.Generator().manual_seed(seed + sum(shape))
    z = torch.randn(*shape, generator=g) * 4
    z[torch.rand(*shape, generator=g) < 0.01] = float("-inf")
    words = torch.randint(-2**31, 2**31, (*shape[:-1], (shape[-1] + 31) // 32), generator=g).to(torch.int32)
    rows = words.view(-1, words.shape[-1])
    rows[1::5], rows[2::5] = -1, 0
    return z.to(dtype).to(device), words.to(device)


def test_every_schema_is_registered():
    for op, schema in SCHEMAS.items():
        assert str(getattr(C, op).default._schema) == f"bild_kernels_C::{op}{schema}"


def test_cpu_tensors_raise_a_clear_error():
    B, V = 2, 7
    row = lambda dt=torch.float32: torch.zeros(B, dtype=dt)  # noqa: E731
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only.*logits is on cpu"):
        C.sample_draft(torch.randn(B, V), row(), row(torch.int32), row() + 1, row(torch.int64), row(torch.int64), row())
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        C.verify_draft(torch.zeros(B, 1, dtype=torch.int64), torch.randn(B, 2, V), 0, row(), None, row(),
                       row(torch.int32), row() + 1, row(torch.int64), row(torch.int64))
    tables = torch.full((B, 3), -1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        C.reserve_paged_kv(tables, torch.zeros(B, dtype=torch.int32), torch.ones(B, dtype=torch.int32),
                           torch.arange(4, dtype=torch.int32), torch.tensor([4], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only.*logits is on cpu"):
        C.apply_penalties(*_penalty_args(B, 3, V, 4, 2, torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only.*logits is on cpu"):
        C.apply_token_bitmask(*_bitmask_args((B, 3, V), torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        C.write_paged_kv(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.zeros(2, 4, 2, 4), torch.zeros(2, 4, 2, 4),
                         torch.zeros(1, dtype=torch.int64))


@requires_gpu
def test_a_rows_hint_out_of_range_raises():
    B, V = 2, 7
    row = lambda dt=torch.float32: torch.zeros(B, dtype=dt, device="cuda")  # noqa: E731
    with pytest.raises(RuntimeError, match="rows must be in"):
        C.sample_draft(torch.randn(B, V, device="cuda"), row(), row(torch.int32), row() + 1, row(torch.int64),
                       row(torch.int64), row(), 8)
    with pytest.raises(RuntimeError, match="rows must be in"):
        C.verify_draft(torch.zeros(B, 1, dtype=torch.int64, device="cuda"), torch.randn(B, 2, V, device="cuda"), 0,
                       row(), None, row(), row(torch.int32), row() + 1, row(torch.int64), row(torch.int64), -1)


@requires_gpu
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, V", [(1, 111), (7, 32000), (99, 111), (7, 151936), (5, 20001)])  # 20001: rows split
def test_sample_draft_matches_reference(B, V, dtype, atol, rtol):
    z = spaced_logits(B, V, dtype, seed=B + V).cuda()
    temperature, top_k, top_p, seed, offset = row_params(B, V, "cuda")
    top_p = exact_top_p(z.float(), temperature, top_p)
    thr = torch.rand(B, device="cuda")
    got = C.sample_draft(z, temperature, top_k, top_p, seed, offset, thr)
    want = R.sample_draft_ref(z, temperature, top_k, top_p, seed, offset, thr)
    assert torch.equal(got[0], want[0]) and torch.equal(got[4], want[4])
    for g, w in zip(got[1:4], want[1:4]):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@requires_gpu
@pytest.mark.parametrize("mode", [R.MODE_GREEDY, R.MODE_BILD, R.MODE_SAMPLE])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, K, V", [(1, 1, 111), (7, 4, 32000), (99, 8, 111), (5, 0, 111), (3, 4, 151936),
                                     (6, 3, 20001)])  # odd V: unaligned rows split into chunks with a tail
def test_verify_draft_matches_reference(B, K, V, mode, dtype, atol, rtol):
    z = spaced_logits(B * (K + 1), V, dtype, seed=B + K + V).reshape(B, K + 1, V).cuda()
    amax = z.float().argmax(2)
    g = torch.Generator().manual_seed(B * K + V)
    n = torch.randint(0, K + 1, (B,), generator=g)
    n[0] = K  # a full draft; with the agreeing tokens below, some rows accept everything and some nothing
    draft_ids = torch.where(torch.rand(B, K, generator=g) < 0.7, amax[:, :K].cpu(), torch.randint(0, V, (B, K),
                                                                                                  generator=g))
    draft_ids[1::4] = amax[1::4, :K].cpu()
    draft_ids[2::4] = (amax[2::4, :K].cpu() + 1) % V
    draft_ids[torch.arange(K).unsqueeze(0) >= n.unsqueeze(1)] = -1
    draft_ids = draft_ids.cuda()
    temperature, top_k, top_p, seed, offset = row_params(B, V, "cuda", greedy_every=2)
    top_p = exact_top_p(z[:, 0].float(), temperature, top_p)
    thr = torch.rand(B, device="cuda") * 6
    probs = torch.softmax(torch.randn(B, K, V, generator=g) * 2, 2).cuda() if mode == R.MODE_SAMPLE else None
    args = (draft_ids, z, mode, thr, probs, temperature, top_k, top_p, seed, offset)
    got = C.verify_draft(*args)
    want = R.verify_draft_ref(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], atol=atol * 10, rtol=rtol)
    torch.testing.assert_close(got[3], want[3], atol=atol, rtol=rtol)


@requires_gpu
@pytest.mark.parametrize("key_dtype, cache_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                    (torch.float64, torch.float16), (torch.float16, torch.float64)])
def test_write_and_gather_paged_kv(key_dtype, cache_dtype):
    T, H, D, nb, bs = 37, 3, 40, 29, 16
    key = torch.randn(T, 2 * H, D, device="cuda", dtype=key_dtype)[:, ::2]  # strided heads
    value = torch.randn(T, H, D, device="cuda", dtype=key_dtype)
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    slots[::5] = -1
    kc, vc = (torch.zeros(nb, bs, H, D, device="cuda", dtype=cache_dtype) for _ in range(2))
    kr, vr = kc.clone(), vc.clone()
    C.write_paged_kv(key, value, kc, vc, slots)
    R.write_paged_kv_ref(key, value, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    tables = torch.randperm(nb, device="cuda")[:4 * 7].reshape(4, 7).int()
    lens = torch.tensor([0, 1, 112, 45], dtype=torch.int32, device="cuda")
    for got, want in zip(C.gather_paged_kv(kc, vc, tables, lens), R.gather_paged_kv_ref(kc, vc, tables, lens)):
        assert torch.equal(got, want)


def _tables(B, M, N, device):
    g = torch.Generator().manual_seed(B * M + N)
    lens = torch.randint(0, 3 * 16, (B,), generator=g).int()
    lens[::7] = -1  # inactive rows
    tables = torch.full((B, M), -1, dtype=torch.int32)
    perm = torch.randperm(N, generator=g).int()
    used = 0
    for b in range(B):
        k = (max(int(lens[b]), 0) + 15) // 16 + int(torch.randint(0, 2, (1,), generator=g))  # some reserved extra
        tables[b, :k] = perm[used:used + k]
        used += k
    free = torch.zeros(N, dtype=torch.int32)
    free[:N - used] = perm[used:]
    num_free = torch.tensor([N - used], dtype=torch.int32)
    return [x.to(device) for x in (tables, lens, free, num_free)]


@requires_gpu
@pytest.mark.parametrize("B", [1, 7, 99, 1500])
def test_reserve_and_rollback_match_reference(B):
    M, bs = 12, 16
    N = B * M
    tables, lens, free, num_free = _tables(B, M, N, "cuda")
    g = torch.Generator().manual_seed(B)
    num_new = torch.randint(0, 5 * bs, (B,), generator=g).int().cuda()
    num_new = torch.minimum(num_new, (M * bs - lens.clamp(min=0)).int())
    for op, ref, counts in ((C.reserve_paged_kv, R.reserve_paged_kv_ref, num_new),
                            (C.rollback_paged_kv, R.rollback_paged_kv_ref, (num_new // 2).int())):
        got = [x.clone() for x in (tables, lens, free, num_free)]
        want = [x.clone() for x in (tables, lens, free, num_free)]
        op(got[0], got[1], counts, got[2], got[3], bs)
        ref(want[0], want[1], counts, want[2], want[3], bs)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
        tables, lens, free, num_free = got
    # a shortfall changes nothing but num_free (B = 1: the one row is inactive, so there is none)
    before = [x.clone() for x in (tables, lens, free, num_free)]
    want = [x.clone() for x in before]
    huge = torch.full_like(lens, 100 * M * bs)
    C.reserve_paged_kv(tables, lens, huge, free, num_free, bs)
    R.reserve_paged_kv_ref(want[0], want[1], huge, want[2], want[3], bs)
    assert all(torch.equal(x, y) for x, y in zip(want, (tables, lens, free, num_free)))
    assert all(torch.equal(x, y) for x, y in zip(before[:3], (tables, lens, free)))
    assert (int(num_free) < 0) == bool((lens >= 0).any())


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_do_not_depend_on_the_batch(dtype):
    """A row's results, floats included, are the same bits alone (a fresh copy) and inside a batch: the pass over
    V is split by V and the dtype only and merged in a fixed order (rows of 16-byte multiples, as real vocabularies
    have: where a row starts off that alignment, its unaligned head shifts the chunks' contents)."""
    B, K, V = 9, 4, 50000
    z = torch.randn(B, K + 1, V, device="cuda").to(dtype)
    draft_ids = z[:, :K].float().argmax(2)
    draft_ids[::2, 1] = 3
    temperature, top_k, top_p, seed, offset = row_params(B, V, "cuda", greedy_every=2)
    thr, fb = torch.full((B,), 2.0, device="cuda"), torch.full((B,), 0.5, device="cuda")
    for mode in (R.MODE_BILD, R.MODE_SAMPLE):
        probs = torch.softmax(torch.randn(B, K, V, device="cuda"), 2) if mode == R.MODE_SAMPLE else None
        whole = C.verify_draft(draft_ids, z, mode, thr, probs, temperature, top_k, top_p, seed, offset)
        for b in (0, 5, 8):
            one = C.verify_draft(draft_ids[b:b + 1], z[b:b + 1].clone(), mode, thr[b:b + 1],
                                 None if probs is None else probs[b:b + 1], temperature[b:b + 1], top_k[b:b + 1],
                                 top_p[b:b + 1], seed[b:b + 1], offset[b:b + 1])
            for w, o in zip(whole, one):
                assert torch.equal(w[b:b + 1], o)
    logits = z[:, 0].contiguous()
    whole = C.sample_draft(logits, temperature, top_k, top_p, seed, offset, fb)
    for b in (0, 5, 8):
        one = C.sample_draft(logits[b:b + 1].clone(), temperature[b:b + 1], top_k[b:b + 1], top_p[b:b + 1], seed[b:b + 1],
                             offset[b:b + 1], fb[b:b + 1])
        for w, o in zip(whole, one):
            assert torch.equal(w[b:b + 1], o)


@requires_gpu
def test_ops_capture_in_a_cuda_graph():
    B, K, V = 4, 3, 32000
    z = torch.randn(B, K + 1, V, device="cuda")
    draft_ids = z[:, :K].argmax(2)
    temperature, top_k, top_p, seed, offset = row_params(B, V, "cuda", filters=False)
    top_k[0] = 7
    rollback, fallback = torch.full((B,), 2.0, device="cuda"), torch.full((B,), 0.5, device="cuda")
    logits = z[:, 0].contiguous()

    def run():
        return (C.verify_draft(draft_ids, z, R.MODE_BILD, rollback, None, temperature, top_k, top_p, seed, offset),
                C.sample_draft(logits, temperature, top_k, top_p, seed, offset, fallback))

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    offset += 1  # the graph reads the new offset from the same buffer
    graph.replay()
    eager = run()
    for g, w in zip(out[0] + out[1], eager[0] + eager[1]):
        assert torch.equal(g, w)


@requires_gpu
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES + [(torch.float64, 1e-12, 1e-12)])
@pytest.mark.parametrize("B, P, V, L, E", [(1, 1, 111, 0, 0), (7, 5, 32000, 300, 3), (99, 3, 111, 50, 2),
                                           (3, 9, 151936, 1024, 1), (5, 4, 20001, 64, 4)])  # 20001: scalar kernel
def test_apply_penalties_matches_reference(B, P, V, L, E, dtype, atol, rtol):
    args = _penalty_args(B, P, V, L, E, dtype, "cuda")
    got, want = C.apply_penalties(*args), R.apply_penalties_ref(*args)
    assert got.dtype == dtype and torch.equal(torch.isneginf(got), torch.isneginf(want))
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    z = args[0]
    neutral = torch.arange(B, device="cuda") % 3 == 0  # and min_tokens: those rows' banned ids may be -inf
    keep = neutral[:, None, None] & ~torch.isneginf(got)
    assert torch.equal(got[keep], z[keep])


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 111), (7, 32000), (99, 111), (3, 9, 151936), (5, 20001), (70000, 40)])
def test_apply_token_bitmask_matches_reference(shape, dtype):
    # 20001: the scalar kernel (rows off 16-byte alignment); 70000 rows: more than grid.y's 65535
    logits, bitmask = _bitmask_args(shape, dtype, "cuda")
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[logits.element_size()]
    got, want = C.apply_token_bitmask(logits, bitmask), R.apply_token_bitmask_ref(logits, bitmask)
    assert got.dtype == dtype and torch.equal(got.view(bits), want.view(bits))
    unaligned = torch.empty(logits.numel() + 1, dtype=dtype, device="cuda")[1:].view(shape)  # the scalar kernel
    unaligned.copy_(logits)
    assert torch.equal(C.apply_token_bitmask(unaligned, bitmask).view(bits), want.view(bits))


@requires_gpu
def test_opcheck_cuda_ops():
    B, V = 5, 53
    f = lambda x: torch.full((B,), x, device="cuda")  # noqa: E731
    args = (torch.randn(B, V, device="cuda"), f(0.8), torch.full((B,), 7, dtype=torch.int32, device="cuda"), f(0.95),
            torch.arange(B, device="cuda"), torch.arange(B, device="cuda") * 3, f(0.2))
    torch.library.opcheck(C.sample_draft.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(C.apply_penalties.default, _penalty_args(3, 4, 29, 6, 2, torch.bfloat16, "cuda"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(C.apply_token_bitmask.default, _bitmask_args((3, 4, 77), torch.bfloat16, "cuda"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_native_kernel_binary(tmp_path):
    """The native test binary (tests/native, as ctest runs it): its host checks (the Philox words and uniforms
    of the reference, golden values) run everywhere; its kernel checks against the CPU twins need a GPU, and
    without one it exits 77 (skipped) after the host checks pass."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    exe = tmp_path / "test_kernels"
    arch = "sm_%d%d" % torch.cuda.get_device_capability() if HAS_GPU else "sm_90"
    subprocess.run(["nvcc", "-std=c++17", "-O2", f"-arch={arch}", "-I", os.path.join(root, "csrc"), "-I",
                    os.path.join(root, "tests", "native"), os.path.join(root, "tests", "native", "test_kernels.cu"),
                    "-o", str(exe)], check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == (0 if HAS_GPU else 77), res.stdout + res.stderr
    assert ("all native kernel tests passed" if HAS_GPU else "host Philox check: passed") in res.stdout


def test_cuda_cut_search_setting():
    """The process-wide choice of the top-k / top-p cut-off search (the per-op tests run the CUDA ops under "split"
    as "cuda-split")."""
    from bild_kernels import cuda_cut_search
    assert cuda_cut_search() == "auto"  # the default: per launch (test_resolve_cut_search)
    assert cuda_cut_search("split") == "auto"
    try:
        assert cuda_cut_search() == "split"
        with pytest.raises(ValueError, match="kind must be one of"):
            cuda_cut_search("fast")
        assert cuda_cut_search() == "split"  # a refused value changes nothing
        assert cuda_cut_search("block") == "split"
        assert cuda_cut_search() == "block"
    finally:
        assert cuda_cut_search("auto") == "block"


def test_cuda_fused_tail_setting():
    """The process-wide choice of how the two ops end after their first pass (the per-op tests run the CUDA ops
    under "fused" as "cuda-fused")."""
    from bild_kernels import cuda_fused_tail
    assert cuda_fused_tail() == "auto"  # the default: the launches until the fused tails are timed
    assert cuda_fused_tail("fused") == "auto"
    try:
        assert cuda_fused_tail() == "fused"
        with pytest.raises(ValueError, match="kind must be one of"):
            cuda_fused_tail("merged")
        assert cuda_fused_tail() == "fused"  # a refused value changes nothing
        assert cuda_fused_tail("launches") == "fused"
    finally:
        assert cuda_fused_tail("auto") == "launches"


@pytest.mark.parametrize("kind", ["launches", "fused", "auto"])
def test_resolve_fused_tail(kind):
    """The fused tail runs only where it is set, the first pass is the chunked (0), stream (3) or long (4) one, and
    the rows hint allows: verify_draft without sampling rows (0 or 2), sample_draft without sampling or top-k / top-p
    rows (0); the launches everywhere else."""
    from bild_kernels import cuda_fused_tail
    ext = cuda_extension()
    old = cuda_fused_tail(kind)
    try:
        for rows, first_pass, verify, fused in [(0, 3, True, 1), (0, 4, True, 1), (0, 0, True, 1), (2, 3, True, 1),
                                                (1, 3, True, 0), (3, 3, True, 0), (3, 4, True, 0), (0, 1, True, 0),
                                                (0, 0, False, 1), (0, 3, False, 1), (0, 4, False, 1),
                                                (2, 0, False, 0), (1, 0, False, 0), (3, 3, False, 0), (0, 1, False, 0),
                                                (6, 3, True, 1), (7, 3, True, 0), (7, 0, False, 0)]:
            want = fused if kind == "fused" else 0
            assert ext.resolve_fused_tail(rows, first_pass, verify) == want, (rows, first_pass, verify)
        for bad in [(-1, 3, True), (8, 3, True), (0, 2, False), (0, 5, True), (0, -1, False)]:
            assert ext.resolve_fused_tail(*bad) == -1, bad
    finally:
        cuda_fused_tail(old)


@pytest.mark.parametrize("kind", ["block", "split", "auto"])
def test_resolve_cut_search(kind):
    """What each setting runs: block and split as set; auto the split search for a sample_draft launch of at most
    64 rows whose rows hint knows that some row filters (2 or 3; not 6 or 7, where that is a guess), the block search
    otherwise and for every verify_draft launch (the H100's timings of 2026-11-27c, csrc/common.cuh use_cut_split)."""
    from bild_kernels import cuda_cut_search
    ext = cuda_extension()
    old = cuda_cut_search(kind)
    try:
        for launch_rows, rows, verify, auto in [(1, 3, False, 1), (64, 3, False, 1), (64, 2, False, 1),
                                                (65, 3, False, 0), (256, 3, False, 0), (1, 1, False, 0),
                                                (1, 0, False, 0), (64, 1, False, 0), (5, 3, True, 0),
                                                (576, 3, True, 0), (0, 3, False, 1), (1, 7, False, 0),
                                                (64, 6, False, 0), (1, 4, False, 0)]:
            want = {"block": 0, "split": 1, "auto": auto}[kind]
            assert ext.resolve_cut_search(launch_rows, rows, verify) == want, (launch_rows, rows, verify)
        for bad in [(-1, 3, False), (1, 8, False), (1, -1, True)]:
            assert ext.resolve_cut_search(*bad) == -1, bad
    finally:
        cuda_cut_search(old)


def test_cuda_first_pass_setting():
    """The process-wide choice of the first pass over V (the per-op tests run the CUDA ops under each)."""
    from bild_kernels import cuda_first_pass
    assert cuda_first_pass() == "auto"  # the default: per launch (csrc/common.cuh resolve_first_pass)
    assert cuda_first_pass("wide") == "auto"
    try:
        assert cuda_first_pass() == "wide"
        with pytest.raises(ValueError, match="kind must be one of"):
            cuda_first_pass("fast")
        assert cuda_first_pass() == "wide"  # a refused value changes nothing
        assert cuda_first_pass("long") == "wide"
        assert cuda_first_pass("chunked") == "long"
        assert cuda_first_pass() == "chunked"
    finally:
        assert cuda_first_pass("auto") == "chunked"
    # the binding itself refuses another kind with -1, not a C++ exception (one crossing pybind11 crashed the
    # process on an H200 machine), and changes nothing
    assert cuda_extension().set_first_pass(7) == -1
    assert cuda_extension().set_first_pass(5) == -1  # the first index past the five kinds
    assert cuda_extension().set_first_pass(-1) == -1
    assert cuda_first_pass() == "auto"


@pytest.mark.parametrize("kind", ["chunked", "wide", "auto", "stream", "long"])
def test_resolve_first_pass(kind):
    """What each setting launches: chunked, wide and stream as set; auto the stream pass for every verify_draft
    launch, and for sample_draft the stream pass where it has at least as many stream blocks (rows x
    ceil(V / 16384) in bf16, / 8192 in fp32) as the GPU has SMs, the chunked pass below that (the H200's
    timings of 2026-11-27, csrc/common.cuh)."""
    from bild_kernels import cuda_first_pass
    ext = cuda_extension()
    old = cuda_first_pass(kind)
    try:
        for rows, V, size, verify, sms, auto in [
                (576, 128256, 2, True, 132, 3),    # verify_draft, B=64, K=8
                (5, 128256, 2, True, 132, 3),      # verify_draft, B=1, K=4: stream too (18.9 against 20.6 us)
                (1, 111, 4, True, 132, 3),
                (64, 128256, 2, False, 132, 3),    # sample_draft, 64 rows: 512 stream blocks
                (1, 128256, 2, False, 132, 0),     # sample_draft, one row: 8 stream blocks on 132 SMs
                (17, 128256, 2, False, 132, 3),    # 17 * 8 = 136 stream blocks
                (16, 128256, 2, False, 132, 0),    # 128
                (44, 49152, 2, False, 132, 3),     # SmolLM2's vocabulary: 3 stream blocks a row
                (43, 49152, 2, False, 132, 0),
                (22, 49152, 4, False, 132, 3),     # fp32: 8192-element chunks, 6 a row
                (21, 49152, 4, False, 132, 0),
                (0, 111, 2, False, 132, 0)]:
            want = {"chunked": 0, "wide": 1, "auto": auto, "stream": 3, "long": 4}[kind]
            assert ext.resolve_first_pass(rows, V, size, verify, sms) == want, (rows, V, size, verify, sms)
        for bad in [(-1, 10, 2, False, 132), (1, 0, 2, False, 132), (1, 2**31, 2, False, 132),
                    (1, 10, 8, False, 132), (1, 10, 2, False, 0)]:
            assert ext.resolve_first_pass(*bad) == -1, bad
    finally:
        cuda_first_pass(old)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_first_pass_matches_chunked_at_serving_shapes(dtype):
    """Every first pass at a real vocabulary and batch: identical ids, counts and sampled tokens (greedy, BiLD and
    sampled rows, the last with logits as peaked as a language model's, where the stream pass skips most
    Gumbel draws), close floats."""
    from bild_kernels import cuda_first_pass, ops
    B, K, V = 16, 4, 128256
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(B, K + 1, V, generator=g) * 3).to(dtype).cuda()
    amax = logits.argmax(2)
    draft = torch.where(torch.rand(B, K, generator=g).cuda() < 0.7, amax[:, :K], torch.randint(0, V, (B, K)).cuda())
    kw = dict(rollback_threshold=torch.full((B,), 4.0, device="cuda"))
    peaked = logits[:, 0].float() * 2.0
    peaked[torch.arange(B, device="cuda"), torch.randint(0, V, (B,), generator=g).cuda()] += 25.0
    temp = torch.tensor([0.0, 0.7, 1.0, 1.5] * (B // 4), device="cuda")
    sk = dict(temperature=temp, seed=torch.arange(B, device="cuda") + 11, offset=torch.full((B,), 3, device="cuda"))
    res = {}
    for kind in ("chunked", "wide", "stream", "long"):
        old = cuda_first_pass(kind)
        try:
            res[kind] = (ops.verify_draft(draft, logits, "bild", backend="cuda", **kw),
                         ops.sample_draft(logits[:, 0], backend="cuda"),
                         ops.sample_draft(peaked.to(dtype), backend="cuda", **sk),
                         ops.sample_draft(logits[:, 1], backend="cuda", **sk))
        finally:
            cuda_first_pass(old)
    v0, s0, p0, q0 = res["chunked"]
    for kind in ("wide", "stream", "long"):
        v1, s1, p1, q1 = res[kind]
        assert torch.equal(v0.num_accepted, v1.num_accepted) and torch.equal(v0.output_ids, v1.output_ids), kind
        torch.testing.assert_close(v0.distances, v1.distances, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(v0.target_probs, v1.target_probs, atol=1e-6, rtol=1e-5)
        for a, b in ((s0, s1), (p0, p1), (q0, q1)):
            assert torch.equal(a.token_ids, b.token_ids), kind
            torch.testing.assert_close(a.max_probs, b.max_probs, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(a.token_probs, b.token_probs, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(a.energies, b.energies, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("value, want", [("wide", "wide"), ("chunked", "chunked"), ("auto", "auto"), ("stream", "stream"),
                                         ("long", "long"),
                                         ("fast", "must be one of")])
def test_first_pass_from_the_environment(value, want):
    """BILD_FIRST_PASS sets the first pass when the extension loads; a bad value fails naming the variable."""
    code = "from bild_kernels import cuda_first_pass; print(cuda_first_pass())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "BILD_FIRST_PASS": value})
    if want == "must be one of":
        assert res.returncode != 0 and "BILD_FIRST_PASS must be one of" in res.stderr
    else:
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.strip().splitlines()[-1] == want

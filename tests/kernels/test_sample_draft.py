"""sample_draft against its reference twin: identical tokens and fallback flags, close probabilities and
energies, at odd sizes, in every logits dtype, with per-row mixes of greedy, sampling, top-k and top-p rows;
bad input; and a 1M-draw check that the reference samples the filtered softmax."""
import pytest
import torch

from bild_kernels import ops
from bild_kernels import reference as R

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [(F32, 1e-5, 1e-5), (F16, 1e-5, 1e-4), (BF16, 1e-5, 1e-4)]  # (dtype, atol, rtol) of the float outputs


def separated_logits(B, V, device, dtype=F32, spread=8.0):
    """Each row a random permutation of a spaced grid: no two logits are close (bf16 may round some onto the
    same value, which ties exactly in both implementations), so float summation order cannot move a cut-off."""
    grid = torch.linspace(-spread, spread, V)
    rows = torch.stack([grid[torch.randperm(V)] for _ in range(B)])
    return rows.to(dtype).to(device)


def robust_top_p(logits, temperature, rank):
    """A top-p per row halfway between two steps of the sorted cumulative probability (float64), so the
    kept set is the top rank+1 tokens whatever the summation order; rank -1 means 1.0 (disabled)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).double().unsqueeze(1)
    p = torch.softmax(logits.double() / t, dim=1).sort(dim=1, descending=True).values.cumsum(1)
    r = rank.clamp(min=0).unsqueeze(1)
    hi = p.gather(1, r).squeeze(1)
    lo = torch.where(rank > 0, p.gather(1, (r - 1).clamp(min=0)).squeeze(1), torch.zeros_like(hi))
    return torch.where(rank >= 0, (lo + hi) / 2, torch.ones_like(hi)).float()


def mixed_params(B, V, device, filters=True, seed0=0):
    g = torch.Generator().manual_seed(seed0 + B + V)
    temperature = torch.rand(B, generator=g) * 1.5 + 0.2
    temperature[::3] = 0.0  # greedy rows between sampling rows
    top_k = torch.zeros(B, dtype=torch.int32)
    rank = torch.full((B,), -1)
    if filters:
        pick = torch.randint(0, 4, (B,), generator=g)  # 0 none, 1 top-k, 2 top-p, 3 both
        top_k = torch.where((pick == 1) | (pick == 3), torch.randint(1, min(V, 50) + 1, (B,), generator=g), 0).int()
        rank = torch.where(pick >= 2, torch.randint(0, min(V, 40), (B,), generator=g), -1)
    seed = torch.randint(0, 2**62, (B,), generator=g)
    offset = torch.randint(0, 2**40, (B,), generator=g)
    fallback_threshold = torch.rand(B, generator=g)
    to = lambda x: x.to(device)  # noqa: E731
    return to(temperature), to(top_k), rank, to(seed), to(offset), to(fallback_threshold)


def check(backend, logits, temperature, top_k, top_p, seed, offset, fallback_threshold, atol, rtol, **hints):
    want = R.sample_draft_ref(logits, temperature, top_k, top_p, seed, offset, fallback_threshold)
    got = ops.sample_draft(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=offset,
                           fallback_threshold=fallback_threshold, backend=backend, **hints)
    assert torch.equal(got.token_ids, want[0])
    torch.testing.assert_close(got.token_probs, want[1], atol=atol, rtol=rtol)
    torch.testing.assert_close(got.max_probs, want[2], atol=atol, rtol=rtol)
    torch.testing.assert_close(got.energies, want[3], atol=atol, rtol=rtol)
    assert torch.equal(got.fallback, want[4])
    return got


@pytest.mark.parametrize("B, V, filters", [(1, 111, True), (7, 111, True), (99, 111, True), (7, 32000, False),
                                           (5, 32000, True), (2, 151936, False)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_sample_draft_matches_reference(backend_device_passes, B, V, filters, dtype, atol, rtol):
    backend, device = backend_device_passes
    logits = separated_logits(B, V, device, dtype)
    temperature, top_k, rank, seed, offset, fallback_threshold = mixed_params(B, V, device, filters)
    top_p = robust_top_p(logits.float().cpu(), temperature.cpu(), rank).to(device)
    check(backend, logits, temperature, top_k, top_p, seed, offset, fallback_threshold, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_sample_draft_plain_randn_logits(backend_device_passes, dtype, atol, rtol):
    # Unfiltered rows need no separation: only argmax / Gumbel-max decide the token.
    backend, device = backend_device_passes
    B, V = 33, 1000
    logits = (torch.randn(B, V) * 3).to(dtype).to(device)
    temperature, top_k, _, seed, offset, fallback_threshold = mixed_params(B, V, device, filters=False)
    check(backend, logits, temperature, top_k, torch.ones(B, device=device), seed, offset, fallback_threshold,
          atol, rtol)


def test_sample_draft_edge_rows(backend_device_passes):
    backend, device = backend_device_passes
    V = 111
    logits = separated_logits(8, V, device)
    logits[0, :] = 1.0  # greedy on a flat row: first index
    logits[1, 50:] = float("-inf")  # -inf tail, sampling
    logits[2, ::2] = float("-inf")  # -inf interleaved, top-k larger than the finite count
    logits[3, :5] = 7.99  # a tie at the top-k cut-off is kept
    temperature = torch.tensor([0.0, 1.0, 0.9, 1.0, 0.0, 1.0, 0.7, 2.0], device=device)
    top_k = torch.tensor([0, 0, 80, 3, 1, 1, V, V - 1], dtype=torch.int32, device=device)
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], device=device)
    seed = torch.arange(8, device=device) * 977
    offset = torch.zeros(8, dtype=torch.int64, device=device)
    got = check(backend, logits, temperature, top_k, top_p, seed, offset, torch.full((8,), 0.5, device=device),
                1e-5, 1e-5)
    assert got.token_ids[0] == 0
    assert got.token_ids[5] == logits[5].argmax()  # top-k 1 samples the argmax
    assert got.token_probs[5] == 1.0


def test_sample_draft_top_k_top_p_hard_rows(backend_device_passes):
    """Rows that stress the top-k / top-p cut-off search (csrc/cut_search.h and its Triton twin): -inf logits,
    one finite logit, logits far below zero and around zero, a temperature of 1e-7 over integer logits (scaled
    logits of 1e8, where the search's value buckets collapse onto few floats), 2^28 plus whole ulps with the
    top-k cut-off below the value pass's 32 nats, greedy rows that filter; sampled and greedy rows alike."""
    backend, device = backend_device_passes
    V = 4096
    g = torch.Generator().manual_seed(11)
    base = torch.randn(V, generator=g)
    rows = [torch.where(torch.rand(V, generator=g) < 0.5, base * 4, torch.tensor(float("-inf"))),
            torch.full((V,), float("-inf")).index_fill(0, torch.tensor([17]), 3.0),
            base * 2 - 30.0,
            base * 0.01,
            (base * 8).round(),
            2.0**28 + 32.0 * torch.randint(-40, 8, (V,), generator=g).float(),
            base * 3,
            base * 3]
    logits = torch.stack(rows)
    temperature = torch.tensor([0.8, 1.0, 0.5, 1.0, 1e-7, 1.0, 0.0, 0.0])
    top_k = torch.tensor([10, 1, 40, 100, 7, 200, 5, 0], dtype=torch.int32)
    rank = torch.tensor([30, -1, 20, -1, -1, -1, -1, 12])  # top-p's cut-off rank (-1: off)
    top_p = robust_top_p(logits, temperature, rank)
    B = len(rows)
    to = lambda x: x.to(device)  # noqa: E731
    check(backend, to(logits), to(temperature), to(top_k), to(top_p), to(torch.arange(B) * 131 + 7),
          to(torch.full((B,), 5, dtype=torch.int64)), to(torch.full((B,), 0.5)), 1e-5, 1e-5)


def test_sample_draft_same_counters_same_token(backend_device_passes):
    # A row's token depends only on its own (seed, offset) and logits, not on its neighbours.
    backend, device = backend_device_passes
    logits = separated_logits(4, 111, device)
    logits[1:] = logits[0]
    kw = dict(temperature=1.0, top_k=10, seed=torch.tensor([5, 5, 6, 5], device=device), offset=3, backend=backend)
    ids = ops.sample_draft(logits, **kw).token_ids
    assert ids[0] == ids[1] == ids[3]


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(logits=torch.zeros(3)), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 5, dtype=torch.int32)), TypeError, "logits"),
    (dict(logits=[[0.0]]), TypeError, "logits"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=torch.zeros(3)), ValueError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=torch.zeros(2)), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(fallback_threshold=-0.1), ValueError, "fallback_threshold"),
    (dict(fallback_threshold=2.0), ValueError, "fallback_threshold"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(sampled=1), TypeError, "sampled"),
    (dict(temperature=torch.full((2,), 0.5), sampled=False), ValueError, "sampled"),
    (dict(top_p=torch.full((2,), 0.9), filtered=False), ValueError, "filtered"),
    (dict(top_k=torch.tensor([0, 3], dtype=torch.int32), filtered=False), ValueError, "filtered"),
])
def test_sample_draft_bad_input(backend_device_passes, kwargs, exc, name):
    backend, device = backend_device_passes
    args = dict(logits=torch.zeros(2, 5, device=device))
    args.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
    with pytest.raises(exc, match=name):
        ops.sample_draft(args.pop("logits"), backend=backend, **args)


def test_sample_draft_wrong_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_draft(torch.zeros(2, 5, device="cuda"), temperature=torch.zeros(2))


def test_sample_draft_reference_samples_filtered_softmax():
    # 1M rows of one logit vector with different seeds: the token histogram must match the filtered softmax.
    N, V = 1_000_000, 6
    z = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, 1.0])
    T, k, p = 0.8, 4, 0.8
    logits = z.expand(N, V)
    ones = torch.ones(N)
    tok = R.sample_draft_ref(logits, ones * T, torch.full((N,), k, dtype=torch.int32), ones * p,
                             torch.arange(N) * 7919 + 1, torch.full((N,), 11), ones * 0)[0]
    kept = R.sampling._filter_top_k_top_p((z / T).unsqueeze(0), torch.tensor([k]), torch.tensor([p]))
    want = torch.softmax(kept, 1)[0]
    assert (want > 0).sum() == 3  # the filters actually bit (top-p 0.8 keeps 3 of top-k 4)
    freq = torch.bincount(tok, minlength=V).double() / N
    assert float((freq - want.double()).abs().sum()) / 2 < 3e-3  # total variation; ~5 sigma at 1M draws
    assert (freq[want == 0] == 0).all()


def test_sample_draft_kernel_matches_reference_on_many_seeds(backend_device_passes):
    # The kernel reproduces the reference draw for draw on a few hundred seeds of the same setting.
    backend, device = backend_device_passes
    N, V = 300, 6
    logits = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, 1.0]).expand(N, V).contiguous().to(device)
    temperature = torch.full((N,), 0.8, device=device)
    temperature[::5] = 1.0
    top_k = torch.where(torch.arange(N) % 2 == 0, 4, 0).int().to(device)
    top_p = torch.where(torch.arange(N) % 3 == 0, 0.9, 1.0).to(device)
    check(backend, logits, temperature, top_k, top_p, torch.arange(N, device=device) * 7919 + 1,
          torch.full((N,), 11, device=device), torch.zeros(N, device=device), 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16, torch.float64])
def test_sample_draft_reference_greedy_shortcut_matches_general_path(monkeypatch, dtype):
    # With every row greedy and unfiltered the reference takes a shortcut (one logsumexp, one max): it must
    # give the general path's outputs bit for bit, ties, -inf entries and fallback flags included.
    V = 301
    logits = separated_logits(6, V, "cpu", dtype)
    logits[0, :] = 1.5  # a flat row: first index
    logits[1, 40:] = float("-inf")
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie at the top
    logits[3, ::2] = float("-inf")
    zeros = torch.zeros(6)
    args = (logits, zeros, torch.zeros(6, dtype=torch.int32), torch.ones(6), torch.arange(6) * 7,
            torch.zeros(6, dtype=torch.int64), torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0, 0.05]))
    fast = R.sample_draft_ref(*args)
    monkeypatch.setattr(R.sampling, "_plain_greedy", lambda *a: False)
    general = R.sample_draft_ref(*args)
    for f, g in zip(fast, general):
        assert f.dtype == g.dtype and torch.equal(f, g)
    assert fast.__len__() == 5 and fast[0][2].item() == 7


def _greedy_rows(B, V, device, dtype=F32, seed0=0):
    """All-greedy rows of plain randn logits (ties in bf16/fp16 exercise the first-index rule), with -inf
    stretches, a row of one finite logit and a flat row."""
    g = torch.Generator().manual_seed(seed0 + B + V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    if B >= 3:
        logits[0, V // 2:] = float("-inf")
        logits[1, :] = float("-inf")
        logits[1, V // 3] = 0.5
        logits[2, :] = 1.0
    return logits.to(device), torch.rand(B, generator=g).to(device)


@pytest.mark.parametrize("B, V", [(1, 111), (7, 1001), (3, 32000), (2, 151936)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_sample_draft_greedy_rows(backend_device_passes, B, V, dtype, atol, rtol):
    """Every row greedy and unfiltered: what a greedy CPU engine asks at every draft step (the CPU backend's
    own kernel; other backends take their general paths), with and without the engine's word for it (the hint that
    "cuda-fused" needs for its fused tail, SampleFusedTail)."""
    backend, device = backend_device_passes
    logits, thr = _greedy_rows(B, V, device, dtype)
    z = torch.zeros(B, device=device)
    for hints in ({}, dict(sampled=False, filtered=False)):
        check(backend, logits, z, torch.zeros(B, dtype=torch.int32, device=device), torch.ones(B, device=device),
              torch.zeros(B, dtype=torch.int64, device=device), torch.zeros(B, dtype=torch.int64, device=device), thr,
              atol, rtol, **hints)


def test_sample_draft_rows_the_host_knows(backend_device_passes):
    """`sampled` / `filtered` given (what the engine knows of its rows): the CUDA backend leaves out the kernels of
    the other kinds of row; every backend gives the reference's results."""
    backend, device = backend_device_passes
    logits, thr = _greedy_rows(5, 1001, device, F32)
    z = torch.zeros(5, device=device)
    for hints in (dict(sampled=False, filtered=False), dict(sampled=False), dict(filtered=False)):
        check(backend, logits, z, z.int(), z + 1, z.long(), z.long(), thr, 1e-5, 1e-5, **hints)
    # sampling rows without top-k / top-p (a sampling engine's usual draft step)
    temperature, top_k, _, seed, offset, fallback_threshold = mixed_params(7, 1001, device, filters=False)
    check(backend, separated_logits(7, 1001, device), temperature, top_k, torch.ones(7, device=device), seed, offset,
          fallback_threshold, 1e-5, 1e-5, filtered=False)


def test_sample_draft_row_kinds_from_numbers_and_promises():
    """What the wrapper tells the CUDA kernels (csrc/common.cuh kRowsSampled | kRowsFiltered | kRowsFilterGuessed):
    exact for numbers, everything for tensors it was not told about (the filter guessed), the caller's word otherwise (checked, or trusted inside
    `trusted_inputs`)."""
    from bild_kernels.ops.sampling import row_kinds
    V = 100
    t = lambda *x: torch.tensor(x)  # noqa: E731
    params = (t(0.0, 0.0), t(0, 0).int(), t(1.0, 1.0))
    assert row_kinds(V, (None, None, None), params, None, None, filter_needs_sampling=False) == 0
    assert row_kinds(V, (0.7, None, None), params, None, None, filter_needs_sampling=False) == 1
    assert row_kinds(V, (0.0, 5, 1.0), params, None, None, filter_needs_sampling=False) == 2
    assert row_kinds(V, (0.0, V, 1.0), params, None, None, filter_needs_sampling=False) == 0  # top-k of V: no filter
    assert row_kinds(V, (0.0, 0, 0.9), params, None, None, filter_needs_sampling=False) == 2
    assert row_kinds(V, params, params, None, None, filter_needs_sampling=False) == 7  # tensors: not known
    assert row_kinds(V, params, params, None, True, filter_needs_sampling=False) == 3  # told: known
    assert row_kinds(V, (0.5, 5, 1.0), params, None, None, filter_needs_sampling=False) == 3  # numbers: known
    assert row_kinds(V, params, params, False, False, filter_needs_sampling=False) == 0  # promised (and true)
    hot = (t(0.0, 0.5), t(0, 3).int(), t(1.0, 1.0))
    with pytest.raises(ValueError, match="sampled=False"):
        row_kinds(V, hot, hot, False, None, filter_needs_sampling=False)
    with pytest.raises(ValueError, match="filtered=False"):
        row_kinds(V, hot, hot, None, False, filter_needs_sampling=False)
    greedy_filtered = (t(0.0, 0.0), t(0, 3).int(), t(1.0, 1.0))  # top-k on a greedy row: nothing for verify
    assert row_kinds(V, greedy_filtered, greedy_filtered, False, False, filter_needs_sampling=True) == 0
    with ops.trusted_inputs():  # not checked there: the caller vouches for it
        assert row_kinds(V, hot, hot, False, False, filter_needs_sampling=False) == 0


def test_sample_draft_cpu_kernel_handles_every_row_over_finite_logits():
    """The CPU extension computes greedy and sampling rows, with and without top-k / top-p, itself and reports a
    call unhandled only for a row whose max is not finite (its wrapper then runs the reference): checked on the
    op, not through the wrapper, so a kernel that never handled anything could not pass for one that does."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    op = torch.ops.bild_kernels_cpu.cpu_sample_draft
    B, V = 5, 1001
    logits, thr = _greedy_rows(B, V, "cpu")
    t, k, p = torch.zeros(B), torch.zeros(B, dtype=torch.int32), torch.ones(B)
    seed, offset = torch.arange(B) * 7919 + 1, torch.arange(B) * 3
    sampling = t.clone()
    sampling[3:] = torch.tensor([0.7, 1.3])
    top_k, top_p = k.clone(), p.clone()
    top_k[3], top_p[4], top_k[0], top_p[1] = 5, 0.9, 3, 0.5  # sampling rows and greedy rows that filter
    for temp, kk, pp in ((t, k, p), (sampling, k, p), (t, top_k, top_p), (sampling, top_k, top_p)):
        *out, handled = op(logits, temp, kk, pp, seed, offset, thr)
        assert bool(handled)
        want = R.sample_draft_ref(logits, temp, kk, pp, seed, offset, thr)
        assert torch.equal(out[0], want[0]) and torch.equal(out[4], want[4])
        for g, w in zip(out[1:4], want[1:4]):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    for bad in (float("nan"), float("inf")):
        z = logits.clone()
        z[4, 17] = bad
        assert not bool(op(z, t, k, p, seed, offset, thr)[-1])
    z = logits.clone()
    z[4] = float("-inf")  # a row with no finite logit
    assert not bool(op(z, t, k, p, seed, offset, thr)[-1])


@pytest.mark.parametrize("V", [257, 8192, 49152])
def test_sample_draft_cpu_filtered_rows_follow_the_reference(V):
    """Rows with top-k, top-p or both on the CPU kernel, greedy and sampling, over many counters: the reference's
    tokens, flags and probabilities, with top-p's cut-off at every rank from the first token (top_p below the
    largest probability) to hundreds of tokens deep (the kernel's partial sort grows past its first 64)."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    B = 48
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(B, V, generator=g) * torch.linspace(0.5, 6.0, B).unsqueeze(1)  # flat to peaked rows
    temperature = torch.rand(B, generator=g) + 0.3
    temperature[::4] = 0.0
    pick = torch.arange(B) % 3  # 0 top-k, 1 top-p, 2 both
    top_k = torch.where(pick != 1, torch.randint(1, min(V, 300), (B,), generator=g), 0).int()
    rank = torch.where(pick != 0, torch.randint(0, min(V, 400), (B,), generator=g), -1)
    top_p = robust_top_p(logits, temperature, rank)
    seed = torch.randint(0, 2**62, (B,), generator=g)
    offset = torch.randint(0, 2**40, (B,), generator=g)
    got = check("cpu", logits, temperature, top_k, top_p, seed, offset, torch.rand(B, generator=g), 1e-5, 1e-5)
    sampled = temperature > 0
    assert (got.token_ids[sampled] != logits[sampled].argmax(1)).any()  # draws, not only argmaxes


def test_sample_draft_cpu_sampling_rows_follow_the_counter():
    """Sampling rows on the CPU kernel draw the reference's tokens over many (seed, offset) counters."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    B, V = 64, 257
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, V, generator=g) * 2
    temp = torch.rand(B, generator=g) + 0.5
    seed, offset = torch.randint(0, 2**62, (B,), generator=g), torch.randint(0, 2**40, (B,), generator=g)
    k, p, thr = torch.zeros(B, dtype=torch.int32), torch.ones(B), torch.full((B,), 0.3)
    got = ops.sample_draft(logits, temperature=temp, top_k=k, top_p=p, seed=seed, offset=offset,
                           fallback_threshold=thr, backend="cpu")
    want = R.sample_draft_ref(logits, temp, k, p, seed, offset, thr)
    assert torch.equal(got.token_ids, want[0])
    assert len(set(got.token_ids.tolist())) > 10  # draws, not one argmax

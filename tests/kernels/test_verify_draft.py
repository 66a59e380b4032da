"""verify_draft against its reference twin in every mode: identical counts and ids, close distances and
target probabilities, at odd sizes and dtypes, ragged and empty drafts, K = 0, -inf logits, mixed greedy
and sampling rows; bad input; and a 1M-draw check that sample mode reproduces the target distribution."""
import pytest
import torch

from bild_kernels import ops
from bild_kernels import reference as R
from tests.kernels.test_sample_draft import DTYPES, robust_top_p, separated_logits

MODES = ("greedy", "bild", "sample")


def make_case(B, K, V, device, dtype=torch.float32, filters=False, seed0=0):
    g = torch.Generator().manual_seed(seed0 + 31 * B + K + V)
    target_logits = separated_logits(B * (K + 1), V, "cpu").reshape(B, K + 1, V)
    amax = target_logits.argmax(2)
    draft_ids = torch.randint(0, V, (B, K), generator=g)
    agree = torch.rand(B, K, generator=g) < 0.7  # most drafts agree, so some rows accept several
    draft_ids = torch.where(agree, amax[:, :K], draft_ids)
    n = torch.randint(0, K + 1, (B,), generator=g)
    n[: B // 3] = K  # full drafts
    draft_ids[torch.arange(K).unsqueeze(0) >= n.unsqueeze(1)] = -1
    temperature = torch.rand(B, generator=g) * 1.5 + 0.3
    temperature[::2] = 0.0  # greedy and sampling rows side by side
    top_k = torch.zeros(B, dtype=torch.int32)
    top_p = torch.ones(B)
    if filters:
        top_k = torch.where(torch.rand(B, generator=g) < 0.5, torch.randint(1, 20, (B,), generator=g), 0).int()
        rank = torch.where(torch.rand(B, generator=g) < 0.5, torch.randint(0, 15, (B,), generator=g), -1)
        # Every position of a row permutes the same grid, so one robust top-p holds at all of them.
        top_p = robust_top_p(target_logits[:, 0].to(dtype).float(), temperature, rank)
    draft_probs = torch.softmax(torch.randn(B, K, V, generator=g) * 2, dim=2)
    draft_probs[..., : V // 4] = 0.0  # zero mass somewhere: exercises zero and all-zero residuals
    draft_probs /= draft_probs.sum(2, keepdim=True)
    params = dict(rollback_threshold=torch.rand(B, generator=g) * 6, temperature=temperature, top_k=top_k,
                  top_p=top_p, seed=torch.randint(0, 2**62, (B,), generator=g),
                  offset=torch.randint(0, 2**40, (B,), generator=g))
    to = lambda x: x.to(device)  # noqa: E731
    return to(draft_ids), to(target_logits.to(dtype)), to(draft_probs), {k: to(v) for k, v in params.items()}


def check(backend, mode, draft_ids, target_logits, draft_probs, params, atol=1e-5, rtol=1e-5, **hints):
    kw = dict(params, **hints)
    if mode != "bild":
        kw.pop("rollback_threshold")
    dp = draft_probs if mode == "sample" else None
    want = R.verify_draft_ref(draft_ids, target_logits, mode, params["rollback_threshold"], dp, params["temperature"],
                              params["top_k"], params["top_p"], params["seed"], params["offset"])
    got = ops.verify_draft(draft_ids, target_logits, mode, draft_probs=dp, backend=backend, **kw)
    assert torch.equal(got.num_accepted, want[0])
    assert torch.equal(got.output_ids, want[1])
    torch.testing.assert_close(got.distances, want[2], atol=atol, rtol=rtol)
    torch.testing.assert_close(got.target_probs, want[3], atol=atol, rtol=rtol)
    return got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, K, V, filters", [(1, 1, 111, True), (7, 4, 111, True), (99, 8, 111, False),
                                              (13, 8, 111, True), (5, 0, 111, True), (7, 4, 32000, False),
                                              (2, 2, 151936, False)])
def test_verify_draft_matches_reference(backend_device_passes, mode, B, K, V, filters):
    backend, device = backend_device_passes
    check(backend, mode, *make_case(B, K, V, device, filters=filters))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_verify_draft_dtypes(backend_device_passes, mode, dtype, atol, rtol):
    backend, device = backend_device_passes
    check(backend, mode, *make_case(9, 4, 257, device, dtype, filters=True), atol=atol, rtol=rtol)


@pytest.mark.parametrize("mode", MODES)
def test_verify_draft_all_and_nothing_accepted(backend_device_passes, mode):
    backend, device = backend_device_passes
    draft_ids, target_logits, draft_probs, params = make_case(6, 4, 111, device)
    params["temperature"].zero_()  # greedy target: acceptance is decided by the argmax alone
    amax = target_logits.argmax(2)[:, :4]
    draft_probs = torch.nn.functional.one_hot(amax, 111).float()
    for ids, want in ((amax.clone(), 4), ((amax + 1) % 111, 0)):
        ids[5] = -1  # a row with nothing drafted
        params["rollback_threshold"].zero_()
        got = check(backend, mode, ids, target_logits, draft_probs, params)
        assert (got.num_accepted[:5] == want).all() and got.num_accepted[5] == 0


def test_verify_draft_neg_inf_logits(backend_device_passes):
    backend, device = backend_device_passes
    for mode in MODES:
        draft_ids, target_logits, draft_probs, params = make_case(5, 3, 111, device, filters=True, seed0=1)
        target_logits[:, :, 60:] = float("-inf")
        target_logits[1, 0, :] = float("-inf")
        target_logits[1, 0, 7] = 0.0  # a one-token distribution
        draft_ids[0, 0] = 100  # a draft on a -inf logit: distance inf, rejected
        check(backend, mode, draft_ids, target_logits, draft_probs, params)


BAD = [
    (dict(draft_ids=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "draft_ids"),
    (dict(draft_ids=torch.zeros(2, 3)), TypeError, "draft_ids"),
    (dict(draft_ids=torch.full((2, 3), 5)), ValueError, "draft_ids"),
    (dict(draft_ids=torch.full((2, 3), -2)), ValueError, "draft_ids"),
    (dict(draft_ids=torch.tensor([[-1, 1, 1], [0, 0, 0]])), ValueError, "draft_ids"),
    (dict(target_logits=torch.zeros(2, 4)), ValueError, "target_logits"),
    (dict(target_logits=torch.zeros(2, 4, 5, dtype=torch.int64)), TypeError, "target_logits"),
    (dict(mode="nope"), ValueError, "mode"),
    (dict(mode="bild"), ValueError, "rollback_threshold"),
    (dict(mode="bild", rollback_threshold=-1.0), ValueError, "rollback_threshold"),
    (dict(mode="sample"), ValueError, "draft_probs"),
    (dict(mode="sample", draft_probs=torch.zeros(2, 3, 4)), ValueError, "draft_probs"),
    (dict(draft_probs=torch.zeros(2, 3, 5)), ValueError, "draft_probs"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.01), ValueError, "top_p"),
    (dict(top_k=-3), ValueError, "top_k"),
    (dict(offset=torch.full((3,), 1)), ValueError, "offset"),
    (dict(filtered="no"), TypeError, "filtered"),
    (dict(temperature=torch.full((2,), 0.5), sampled=False), ValueError, "sampled"),
    (dict(temperature=torch.full((2,), 0.5), top_k=torch.full((2,), 2, dtype=torch.int32), filtered=False),
     ValueError, "filtered"),
]


@pytest.mark.parametrize("kwargs, exc, name", BAD)
def test_verify_draft_bad_input(backend_device_passes, kwargs, exc, name):
    backend, device = backend_device_passes
    args = dict(draft_ids=torch.zeros(2, 3, dtype=torch.int64), target_logits=torch.zeros(2, 4, 5), mode="greedy")
    args.update(kwargs)
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(exc, match=name):
        ops.verify_draft(args.pop("draft_ids"), args.pop("target_logits"), args.pop("mode"), backend=backend, **args)


@pytest.mark.parametrize("mode", ["bild", "sample"])
def test_verify_draft_top_k_top_p_hard_rows(backend_device_passes, mode):
    """The rows of test_sample_draft_top_k_top_p_hard_rows (-inf logits, scaled logits of 1e8, cut-offs below the
    cut-off search's value range, ...), each repeated at every position of a row, verified with sampling
    temperatures and top-k / top-p: the kept sets decide q and the token drawn at the cut."""
    backend, device = backend_device_passes
    V, K = 4096, 2
    g = torch.Generator().manual_seed(12)
    base = torch.randn(V, generator=g)
    rows = torch.stack([torch.where(torch.rand(V, generator=g) < 0.5, base * 4, torch.tensor(float("-inf"))),
                        torch.full((V,), float("-inf")).index_fill(0, torch.tensor([17]), 3.0),
                        base * 2 - 30.0, base * 0.01, (base * 8).round(),
                        2.0**28 + 32.0 * torch.randint(-40, 8, (V,), generator=g).float()])
    B = rows.shape[0]
    target_logits = rows.unsqueeze(1).repeat(1, K + 1, 1)  # [B, K+1, V]
    draft_ids = torch.stack([rows.argmax(1), torch.randint(0, V, (B,), generator=g)], 1)  # [B, K]
    temperature = torch.tensor([0.8, 1.0, 0.5, 1.0, 1e-7, 1.0])
    rank = torch.tensor([30, -1, 20, -1, -1, -1])
    params = dict(rollback_threshold=torch.full((B,), 2.0), temperature=temperature,
                  top_k=torch.tensor([10, 1, 40, 100, 7, 200], dtype=torch.int32),
                  top_p=robust_top_p(rows, temperature, rank), seed=torch.arange(B) * 313 + 1,
                  offset=torch.full((B,), 9, dtype=torch.int64))
    draft_probs = torch.softmax(torch.randn(B, K, V, generator=g) * 2, dim=2)
    to = lambda x: x.to(device)  # noqa: E731
    check(backend, mode, to(draft_ids), to(target_logits), to(draft_probs), {k: to(v) for k, v in params.items()})


def _sampling_setup(N, device="cpu"):
    # V = 6, K = 2: fixed draft distributions p_S, fixed target logits; drafts drawn from p_S per row.
    V, K = 6, 2
    p_s = torch.tensor([[0.4, 0.1, 0.2, 0.05, 0.05, 0.2], [0.1, 0.3, 0.3, 0.1, 0.1, 0.1]])
    z = torch.tensor([[1.0, 0.2, 1.5, -0.5, 0.3, -2.0], [0.0, 1.0, -1.0, 0.5, 2.0, 0.1], [0.3] * 6])
    g = torch.Generator().manual_seed(1)
    draft_ids = torch.stack([torch.multinomial(p_s[j], N, replacement=True, generator=g) for j in range(K)], 1)
    ones = torch.ones(N)
    args = (draft_ids, z.expand(N, K + 1, V).contiguous(), "sample", None, p_s.expand(N, K, V).contiguous(),
            ones, torch.zeros(N, dtype=torch.int32), ones, torch.arange(N) * 104729 + 3, torch.full((N,), 5))
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args], torch.softmax(z, 1)


def test_verify_draft_sample_mode_reproduces_target():
    N = 1_000_000
    args, q = _sampling_setup(N)
    num_accepted, out = R.verify_draft_ref(*args)[:2]
    first = torch.bincount(out[:, 0], minlength=6).double() / N
    assert float((first - q[0]).abs().sum()) / 2 < 3e-3  # total variation, ~5 sigma at 1M draws
    second_rows = num_accepted >= 1  # the first token was an accepted draft: the second follows q_1
    second = torch.bincount(out[second_rows, 1], minlength=6).double() / int(second_rows.sum())
    assert int(second_rows.sum()) > 300_000
    assert float((second - q[1]).abs().sum()) / 2 < 5e-3
    assert 0.2 < float((num_accepted == 0).double().mean()) < 0.8  # both outcomes are well represented


def _kernel_vs_reference_on_sampling_rows(backend, device, N):
    args, _ = _sampling_setup(N, device)
    want = R.verify_draft_ref(*args)
    got = ops.verify_draft(args[0], args[1], "sample", draft_probs=args[4], temperature=args[5], top_k=args[6],
                           top_p=args[7], seed=args[8], offset=args[9], backend=backend)
    assert torch.equal(got.num_accepted, want[0])
    assert torch.equal(got.output_ids, want[1])


def test_verify_draft_sample_mode_kernel_matches_reference_rows(backend_device_passes):
    backend, device = backend_device_passes
    _kernel_vs_reference_on_sampling_rows(backend, device, 600 if device == "cpu" else 20_000)


@pytest.mark.slow
def test_verify_draft_sample_mode_kernel_matches_reference_20k_rows(backend_device_passes):
    backend, device = backend_device_passes
    _kernel_vs_reference_on_sampling_rows(backend, device, 20_000)


@pytest.mark.parametrize("mode", ["greedy", "bild"])
@pytest.mark.parametrize("K, dtype", [(0, torch.float32), (1, torch.float32), (4, torch.float32),
                                      (4, torch.bfloat16), (3, torch.float64)])
def test_verify_draft_reference_greedy_shortcut_matches_general_path(monkeypatch, mode, K, dtype):
    # All-greedy rows outside sample mode skip building the target distributions: the outputs must be the
    # general path's bit for bit (ragged and empty drafts, ties, -inf logits).
    draft_ids, target_logits, _, params = make_case(9, K, 257, "cpu", dtype)
    target_logits[0, :, :] = 0.5  # flat: the first index wins
    target_logits[1, :, 100:] = float("-inf")
    args = (draft_ids, target_logits, mode, params["rollback_threshold"], None, torch.zeros(9), params["top_k"],
            params["top_p"], params["seed"], params["offset"])
    fast = R.verify_draft_ref(*args)
    monkeypatch.setattr(R.verify, "_all_greedy", lambda *a: False)
    general = R.verify_draft_ref(*args)
    for f, g in zip(fast, general):
        assert f.dtype == g.dtype and torch.equal(f, g)


def _greedy_case(B, K, V, device, dtype=torch.float32, seed0=0):
    """All-greedy rows of randn logits, drafts mostly the argmax, ragged lengths, -inf stretches."""
    g = torch.Generator().manual_seed(seed0 + 31 * B + K + V)
    target_logits = (torch.randn(B, K + 1, V, generator=g) * 3).to(dtype)
    if B >= 2:
        target_logits[0, :, V // 2:] = float("-inf")
        target_logits[1, 0, :] = float("-inf")
        target_logits[1, 0, V // 3] = 0.0
    amax = target_logits.float().argmax(2)
    draft_ids = torch.where(torch.rand(B, K, generator=g) < 0.7, amax[:, :K], torch.randint(0, V, (B, K), generator=g))
    n = torch.randint(0, K + 1, (B,), generator=g)
    n[: B // 3] = K
    draft_ids[torch.arange(K).unsqueeze(0) >= n.unsqueeze(1)] = -1
    params = dict(rollback_threshold=torch.rand(B, generator=g) * 6, temperature=torch.zeros(B),
                  top_k=torch.zeros(B, dtype=torch.int32), top_p=torch.ones(B), seed=torch.zeros(B, dtype=torch.int64),
                  offset=torch.zeros(B, dtype=torch.int64))
    return draft_ids.to(device), target_logits.to(device), {k: v.to(device) for k, v in params.items()}


@pytest.mark.parametrize("mode", ["greedy", "bild"])
@pytest.mark.parametrize("B, K, V", [(1, 1, 111), (7, 4, 1001), (13, 8, 111), (5, 0, 111), (3, 3, 32000)])
def test_verify_draft_greedy_rows(backend_device_passes, mode, B, K, V):
    """Every row greedy, as the engine says it (no row samples or filters): what a greedy CPU engine verifies at every
    step (the CPU backend's own kernel), and what "cuda-fused" runs with its fused tail (VerifyFusedTail)."""
    backend, device = backend_device_passes
    draft_ids, target_logits, params = _greedy_case(B, K, V, device)
    check(backend, mode, draft_ids, target_logits, None, params, sampled=False, filtered=False)


def test_verify_draft_rows_the_host_knows(backend_device_passes):
    """`sampled` / `filtered` given (what the engine knows of its rows): the CUDA backend leaves out the scaled
    statistics, top-k / top-p and sampled-token kernels where no row needs them; every backend gives the
    reference's results."""
    backend, device = backend_device_passes
    draft_ids, target_logits, params = _greedy_case(5, 3, 1001, device)
    for mode in ("greedy", "bild"):
        check(backend, mode, draft_ids, target_logits, None, params, sampled=False, filtered=False)
    for mode in MODES:  # greedy and sampling rows, no top-k / top-p
        check(backend, mode, *make_case(7, 4, 257, device), filtered=False)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_verify_draft_greedy_rows_dtypes(backend_device_passes, dtype, atol, rtol):
    backend, device = backend_device_passes
    draft_ids, target_logits, params = _greedy_case(6, 3, 257, device, dtype)
    for mode in ("greedy", "bild"):
        check(backend, mode, draft_ids, target_logits, None, params, atol=atol, rtol=rtol)


def test_verify_draft_cpu_kernel_handles_every_mode():
    """The CPU extension computes calls in greedy, bild and sample modes, sampling rows with and without top-k / top-p,
    over rows with a finite max, itself, and reports a call with a non-finite row unhandled (its wrapper then runs
    the reference): checked on the op directly."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    op = torch.ops.bild_kernels_cpu.cpu_verify_draft
    draft_ids, z, params = _greedy_case(7, 4, 1001, "cpu")
    thr, t, k, p = params["rollback_threshold"], params["temperature"], params["top_k"], params["top_p"]
    seed, offset = torch.arange(7) * 104729 + 5, torch.arange(7) * 11
    sampling = t.clone()
    sampling[2:5] = torch.tensor([0.8, 1.0, 1.6])
    top_k, top_p = k.clone(), p.clone()
    top_k[3], top_p[4], top_k[2], top_p[2], top_k[0] = 20, 0.7, 50, 0.95, 20  # sampling rows and a greedy row
    for temp, kk, pp in ((t, k, p), (sampling, k, p), (sampling, top_k, top_p)):
        for mode in (R.MODE_GREEDY, R.MODE_BILD):
            *out, handled = op(draft_ids, z, mode, thr, None, temp, kk, pp, seed, offset)
            assert bool(handled)
            want = R.verify_draft_ref(draft_ids, z, mode, thr, None, temp, kk, pp, seed, offset)
            assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
            torch.testing.assert_close(out[2], want[2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[3], want[3], atol=1e-6, rtol=1e-5)
    # sample mode (speculative sampling): accept tests, the residual draw at a rejection and the bonus draw
    _, _, probs, _ = make_case(7, 4, 1001, "cpu")
    probs[5] = torch.softmax(z[5, :4] / 0.8, -1)  # p_S = q where row 5 samples at T = 0.8: always accepted
    sampling[5] = 0.8
    for temp, kk, pp in ((t, k, p), (sampling, k, p), (sampling, top_k, top_p)):
        *out, handled = op(draft_ids, z, R.MODE_SAMPLE, thr, probs, temp, kk, pp, seed, offset)
        assert bool(handled)
        want = R.verify_draft_ref(draft_ids, z, R.MODE_SAMPLE, thr, probs, temp, kk, pp, seed, offset)
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
        torch.testing.assert_close(out[3], want[3], atol=1e-6, rtol=1e-5)
    nan = z.clone()
    nan[0, 0, 5] = float("nan")  # row 0 drafts all K: position 0 is read
    assert not bool(op(draft_ids, nan, R.MODE_BILD, thr, None, t, k, p, seed, offset)[-1])
    with pytest.raises(RuntimeError, match="mode 2 \\(sample\\) needs draft_probs"):
        op(draft_ids, z, R.MODE_SAMPLE, thr, None, t, k, p, seed, offset)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        op(draft_ids, z, 3, thr, None, t, k, p, seed, offset)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, K, V", [(1, 0, 111), (7, 4, 1001), (3, 3, 49152)])
def test_verify_draft_with_given_target_stats_matches_reference(mode, B, K, V):
    """target_stats (each position's max, logsumexp and argmax, as the large model's head gives them with
    cpu_linear_q8_0x16_stats): the CPU backend reads only the drafted tokens' logits and gives the reference's
    verdicts; the reference ignores them. Greedy and sampling rows alike (sampling rows compute their own q)."""
    from bild_kernels._backend import cpu_extension
    draft_ids, z, probs, params = make_case(B, K, V, "cpu")
    mx, lse, arg, fin = R.logit_row_stats_ref(z.view(B * (K + 1), V))
    assert bool(fin.all())
    stats = (mx.view(B, K + 1), lse.view(B, K + 1), arg.view(B, K + 1))
    kw = dict(params)
    if mode != "bild":
        kw.pop("rollback_threshold")
    dp = probs if mode == "sample" else None
    want = R.verify_draft_ref(draft_ids, z, mode, params["rollback_threshold"], dp, params["temperature"],
                              params["top_k"], params["top_p"], params["seed"], params["offset"])
    for backend in (["cpu"] if cpu_extension() is not None else []) + ["ref"]:
        got = ops.verify_draft(draft_ids, z, mode, draft_probs=dp, target_stats=stats, backend=backend, **kw)
        assert torch.equal(got.num_accepted, want[0]) and torch.equal(got.output_ids, want[1])
        torch.testing.assert_close(got.distances, want[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.target_probs, want[3], atol=1e-6, rtol=1e-5)
    if cpu_extension() is not None and K:  # the given statistics are what the CPU backend uses: a wrong argmax shows
        liar = (stats[0], stats[1], (stats[2] + 1) % V)
        got = ops.verify_draft(draft_ids, z, "greedy", target_stats=liar, backend="cpu", **{
            k: v for k, v in params.items() if k != "rollback_threshold"})
        at = got.num_accepted.long()
        greedy = params["temperature"] <= 0  # (a sampling row draws its own token)
        emitted = got.output_ids[torch.arange(B), at][greedy]
        assert greedy.any() and torch.equal(emitted, liar[2][torch.arange(B), at][greedy])


@pytest.mark.parametrize("mode", ["greedy", "bild"])
@pytest.mark.parametrize("B, K, V", [(1, 0, 111), (7, 4, 1001)])
def test_verify_draft_cpu_trusted_is_verify_draft(mode, B, K, V):
    """The engine's unchecked CPU call (`ops.verify_draft_cpu_trusted`) gives verify_draft's results, greedy and
    sampling rows alike."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    draft_ids, z, _, params = make_case(B, K, V, "cpu")
    mx, lse, arg, _ = R.logit_row_stats_ref(z.view(B * (K + 1), V))
    stats = (mx.view(B, K + 1), lse.view(B, K + 1), arg.view(B, K + 1))
    p = dict(params, top_k=params["top_k"].int())
    thr = 2.5 if mode == "bild" else None
    got = ops.verify_draft_cpu_trusted(draft_ids, z, mode, thr, p["temperature"], p["top_k"], p["top_p"], p["seed"],
                                       p["offset"], stats)
    kw = {k: v for k, v in p.items() if k != "rollback_threshold"}
    want = ops.verify_draft(draft_ids, z, mode, rollback_threshold=thr, backend="ref", **kw)
    assert torch.equal(got.num_accepted, want.num_accepted) and torch.equal(got.output_ids, want.output_ids)
    torch.testing.assert_close(got.distances, want.distances, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.target_probs, want.target_probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stats, exc, match", [
    (lambda s: s[:2], TypeError, "target_stats must be a tuple"),
    (lambda s: (s[0].double(), s[1], s[2]), TypeError, "row_max"),
    (lambda s: (s[0], s[1][:, :1], s[2]), ValueError, "row_lse"),
    (lambda s: (s[0], s[1], s[2] + 10_000), ValueError, "row_argmax holds ids outside the vocabulary"),
])
def test_verify_draft_bad_target_stats(stats, exc, match):
    draft_ids, z, _, params = make_case(2, 3, 111, "cpu")
    mx, lse, arg, _ = R.logit_row_stats_ref(z.view(8, 111))
    good = (mx.view(2, 4), lse.view(2, 4), arg.view(2, 4))
    with pytest.raises(exc, match=match):
        ops.verify_draft(draft_ids, z, "greedy", target_stats=stats(good))
    with pytest.raises(ValueError, match="needs float32 target_logits"):
        ops.verify_draft(draft_ids, z.double(), "greedy", target_stats=good)


def test_verify_draft_cpu_kernel_is_thread_invariant():
    """The CPU kernel computes its positions' statistics on torch's threads: the same outputs, bit for bit, on one
    thread or several, and a non-finite logit past a row's drafted positions is never read."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    op = torch.ops.bild_kernels_cpu.cpu_verify_draft
    draft_ids, z, params = _greedy_case(7, 4, 1001, "cpu")
    draft_ids[3, 2:] = -1  # a ragged row: positions 3 and 4 of it are padding
    z[3, 3:, 7] = float("nan")
    args = (params["rollback_threshold"], None, params["temperature"], params["top_k"], params["top_p"],
            torch.arange(7) * 7919, torch.arange(7))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(op(draft_ids, z, R.MODE_BILD, *args))
    finally:
        torch.set_num_threads(threads)
    assert all(bool(o[-1]) for o in outs)
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


def _check_cpu_draws(draft_ids, z, params):
    """The CPU kernel against the reference in greedy and bild modes; its sampling rows draw at their cuts."""
    for mode in ("greedy", "bild"):
        got = check("cpu", mode, draft_ids, z, None, params)
        cut = got.num_accepted.long()
        emitted = got.output_ids.gather(1, cut[:, None]).squeeze(1)
        assert (emitted != z.argmax(2).gather(1, cut[:, None]).squeeze(1)).any()  # draws, not only argmaxes


def test_verify_draft_cpu_filtered_rows_emit_the_reference_tokens():
    """Sampling rows with top-k, top-p or both on the CPU kernel emit the reference's token at their cut over many
    counters (top-p from the first token to hundreds deep)."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    B, K, V = 36, 3, 4099
    draft_ids, z, params = _greedy_case(B, K, V, "cpu", seed0=11)
    g = torch.Generator().manual_seed(5)
    params["temperature"] = torch.rand(B, generator=g) + 0.5
    pick = torch.arange(B) % 3  # 0 top-k, 1 top-p, 2 both
    params["top_k"] = torch.where(pick != 1, torch.randint(1, 300, (B,), generator=g), 0).int()
    params["top_p"] = torch.where(pick != 0, torch.rand(B, generator=g) * 0.98 + 0.01, torch.ones(B))
    params["seed"] = torch.randint(0, 2**62, (B,), generator=g)
    params["offset"] = torch.randint(0, 2**40, (B,), generator=g)
    _check_cpu_draws(draft_ids, z, params)


def test_verify_draft_cpu_sampling_rows_emit_the_reference_tokens():
    """Sampling rows on the CPU kernel emit the reference's token at their cut over many counters."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu was not built or needs AVX2/FMA")
    B, K, V = 48, 3, 257
    draft_ids, z, params = _greedy_case(B, K, V, "cpu", seed0=7)
    g = torch.Generator().manual_seed(4)
    params["temperature"] = torch.rand(B, generator=g) + 0.5
    params["seed"] = torch.randint(0, 2**62, (B,), generator=g)
    params["offset"] = torch.randint(0, 2**40, (B,), generator=g)
    _check_cpu_draws(draft_ids, z, params)

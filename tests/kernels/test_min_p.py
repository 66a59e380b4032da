"""min-p (keep the tokens whose probability is at least min_p times the largest, after temperature) in
sample_draft and verify_draft: the reference against Hugging Face's MinPLogitsWarper, every backend against the
reference (min-p alone, with top-k and top-p, greedy and sampling rows, every verify mode), the CUDA kernels'
cut-off search (csrc/cut_search.h, run on the host by the CPU extension) with min-p, a statistical check that the
reference samples the min-p-filtered softmax, and bad input."""
import math

import pytest
import torch

from bild_kernels import ops
from bild_kernels import reference as R
from tests.kernels.test_sample_draft import mixed_params, robust_top_p, separated_logits
from tests.kernels.test_verify_draft import make_case


def robust_min_p(logits, temperature, rank):
    """A min_p per row that keeps exactly the rank+1 largest scaled logits, its cut-off halfway (in log space)
    between the rank-th and the next, far from every logit in float32; rank -1 means 0 (off)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).double().unsqueeze(1)
    s = (logits.double() / t).sort(dim=1, descending=True).values
    r = rank.clamp(min=0).unsqueeze(1)
    mid = (s.gather(1, r) + s.gather(1, r + 1)) / 2 - s[:, :1]
    return torch.where(rank >= 0, torch.exp(mid.squeeze(1)), torch.zeros(len(rank), dtype=torch.float64)).float()


def check_sample(backend, logits, temperature, top_k, top_p, min_p, seed, offset, thr, **hints):
    want = R.sample_draft_ref(logits, temperature, top_k, top_p, seed, offset, thr, min_p)
    got = ops.sample_draft(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                           offset=offset, fallback_threshold=thr, backend=backend, **hints)
    assert torch.equal(got.token_ids, want[0])
    for g, w in zip(got[1:4], want[1:4]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.fallback, want[4])
    return got, want


def test_min_p_reference_is_hugging_face_min_p():
    """The reference's min-p keeps what transformers' MinPLogitsWarper keeps after temperature (a token's
    probability at least min_p times the largest), at several min_p and temperatures."""
    from transformers.generation.logits_process import MinPLogitsWarper
    B, V = 12, 333
    logits = separated_logits(B, V, "cpu", spread=6.0)
    for T in (0.5, 1.0, 1.7):
        rank = torch.arange(B) * 7 % 60
        min_p = robust_min_p(logits, torch.full((B,), T), rank)
        scaled = logits / T
        got = R.sampling._filter_top_k_top_p(scaled, torch.zeros(B, dtype=torch.int32), torch.ones(B), min_p)
        for b in range(B):
            hf = MinPLogitsWarper(float(min_p[b]))(None, scaled[b:b + 1].clone())
            assert torch.equal(torch.isfinite(got[b]), torch.isfinite(hf[0])), (T, b)
            assert int(torch.isfinite(got[b]).sum()) == int(rank[b]) + 1


def test_min_p_reference_edges():
    """min_p 0 keeps everything, 1 keeps the ties at the top, a row without a finite logit keeps what it has,
    and min-p intersects with top-k and top-p (each on the unfiltered row)."""
    z = torch.tensor([[2.0, 2.0, 1.0, -1.0, float("-inf")], [float("-inf")] * 5, [3.0, 1.0, 0.5, 0.0, -2.0]])
    f = R.sampling._filter_top_k_top_p
    k0, p1 = torch.zeros(3, dtype=torch.int32), torch.ones(3)
    assert torch.equal(f(z, k0, p1, torch.zeros(3)), f(z, k0, p1))
    ones = f(z, k0, p1, torch.ones(3))
    assert torch.isfinite(ones[0]).tolist() == [True, True, False, False, False]
    assert torch.equal(ones[1], z[1])
    assert torch.isfinite(ones[2]).tolist() == [True, False, False, False, False]
    # row 2: min-p e^-2.75 keeps 3.0, 1.0, 0.5 (not 0.0); top-k 2 keeps two of them; both: the two
    mp = torch.full((3,), math.exp(-2.75))
    assert torch.isfinite(f(z, k0, p1, mp)[2]).tolist() == [True, True, True, False, False]
    both = f(z, torch.tensor([0, 0, 2], dtype=torch.int32), p1, mp)
    assert torch.isfinite(both[2]).tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("B, V", [(1, 111), (9, 111), (6, 32000)])
def test_sample_draft_min_p_matches_reference(backend_device_passes, B, V):
    """Rows with min-p alone, with top-k, with top-p and with both, greedy and sampling, on every backend."""
    backend, device = backend_device_passes
    logits = separated_logits(B, V, "cpu")
    temperature, top_k, rank, seed, offset, thr = mixed_params(B, V, "cpu", filters=True, seed0=5)
    top_p = robust_top_p(logits, temperature, rank)
    g = torch.Generator().manual_seed(B * V)
    m_rank = torch.randint(0, min(V - 1, 60), (B,), generator=g)
    m_rank[1::4] = -1  # rows without min-p among them
    min_p = robust_min_p(logits, temperature, m_rank)
    to = lambda x: x.to(device)  # noqa: E731
    got, _ = check_sample(backend, to(logits), to(temperature), to(top_k), to(top_p), to(min_p), to(seed),
                          to(offset), to(thr))
    # the min-p rows' tokens lie inside their kept sets
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    s = logits / t.unsqueeze(1)
    tok = got.token_ids.cpu()
    for b in range(B):
        if min_p[b] > 0:
            assert s[b, tok[b]] - s[b].max() >= math.log(float(min_p[b]))


def test_sample_draft_min_p_only_rows(backend_device_passes):
    """Every row filters with min-p alone (no top-k, no top-p), from keeping one token to keeping most: the
    token probabilities are renormalised over the kept set, for greedy rows too."""
    backend, device = backend_device_passes
    B, V = 8, 1000
    logits = separated_logits(B, V, "cpu")
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.4, 0.0, 0.9, 2.0, 1.0])
    min_p = robust_min_p(logits, temperature, torch.tensor([0, 1, 5, 30, 200, 600, 3, 998]))
    to = lambda x: x.to(device)  # noqa: E731
    got, _ = check_sample(backend, to(logits), to(temperature), to(torch.zeros(B, dtype=torch.int32)),
                          to(torch.ones(B)), to(min_p), to(torch.arange(B) * 101 + 3),
                          to(torch.full((B,), 9, dtype=torch.int64)), to(torch.full((B,), 0.5)))
    assert got.token_probs[0] == 1.0  # a greedy row whose min-p keeps one token
    assert got.token_probs[4] > got.max_probs[4]  # renormalised over the kept 201


@pytest.mark.parametrize("mode", ["greedy", "bild", "sample"])
@pytest.mark.parametrize("B, K, V", [(7, 4, 111), (5, 2, 2000)])
def test_verify_draft_min_p_matches_reference(backend_device_passes, mode, B, K, V):
    backend, device = backend_device_passes
    draft_ids, target_logits, draft_probs, params = make_case(B, K, V, "cpu", filters=True, seed0=3)
    g = torch.Generator().manual_seed(B + K + V)
    m_rank = torch.randint(0, 25, (B,), generator=g)
    m_rank[::3] = -1
    # every position of a row permutes the same grid, so one robust min-p holds at all of them
    min_p = robust_min_p(target_logits[:, 0], params["temperature"], m_rank)
    dp = draft_probs if mode == "sample" else None
    want = R.verify_draft_ref(draft_ids, target_logits, mode, params["rollback_threshold"], dp,
                              params["temperature"], params["top_k"], params["top_p"], params["seed"],
                              params["offset"], min_p)
    kw = {k: v.to(device) for k, v in params.items() if mode == "bild" or k != "rollback_threshold"}
    got = ops.verify_draft(draft_ids.to(device), target_logits.to(device), mode,
                           draft_probs=None if dp is None else dp.to(device), min_p=min_p.to(device),
                           backend=backend, **kw)
    assert torch.equal(got.num_accepted.cpu(), want[0])
    assert torch.equal(got.output_ids.cpu(), want[1])
    torch.testing.assert_close(got.distances.cpu(), want[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.target_probs.cpu(), want[3], atol=1e-5, rtol=1e-5)
    assert ((min_p > 0) & (params["temperature"] > 0)).any()  # the case has sampling rows that filter with min-p


def test_verify_draft_sample_mode_min_p_is_lossless():
    """Speculative sampling with a min-p target: the first output token (the accepted draft, or the residual's
    draw) follows the min-p-filtered target softmax (total variation over 200k counters)."""
    N, V = 200_000, 6
    z = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, 1.0])
    T, min_p = 0.9, 0.3
    target = z.expand(N, 2, V).contiguous()
    draft = torch.full((N, 1), 1, dtype=torch.int64)  # always proposes token 1: a one-hot draft distribution
    dp = torch.nn.functional.one_hot(draft, V).float()
    ones = torch.ones(N)
    out = R.verify_draft_ref(draft, target, "sample", None, dp, ones * T, torch.zeros(N, dtype=torch.int32), ones,
                             torch.arange(N) * 7919 + 1, torch.full((N,), 3), ones * min_p)[1]
    first = out[:, 0]
    q = torch.softmax(R.sampling._filter_top_k_top_p((z / T)[None], torch.zeros(1, dtype=torch.int32),
                                                     torch.ones(1), torch.tensor([min_p]))[0], 0)
    assert int((q > 0).sum()) == 3  # min-p 0.3 keeps 2.0, 1.5 and 1.0
    freq = torch.bincount(first, minlength=V).double() / N
    assert float((freq - q.double()).abs().sum()) / 2 < 6e-3
    assert (freq[q == 0] == 0).all()


def test_sample_draft_reference_samples_min_p_softmax():
    N, V = 200_000, 6
    z = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, 1.0])
    T, min_p = 0.8, 0.2
    ones = torch.ones(N)
    tok = R.sample_draft_ref(z.expand(N, V), ones * T, torch.zeros(N, dtype=torch.int32), ones,
                             torch.arange(N) * 7919 + 1, torch.full((N,), 11), ones * 0, ones * min_p)[0]
    q = torch.softmax(torch.where(z / T - (z / T).max() >= math.log(min_p), z / T, float("-inf")), 0)
    assert int((q > 0).sum()) == 3
    freq = torch.bincount(tok, minlength=V).double() / N
    assert float((freq - q.double()).abs().sum()) / 2 < 6e-3
    assert (freq[q == 0] == 0).all()


def test_cut_search_with_min_p():
    """The kernels' cut-off search (run by the CPU extension) with min-p alone and with top-k / top-p: the
    reference's kept set and its mass, within the pass bound, also for a min-p far below the value pass's 32 nats
    and for min_p = 1 (the ties at the top)."""
    pytest.importorskip("bild_kernels._cpu", reason="the CPU extension bild_kernels._cpu is not built")
    from tests.kernels.test_cut_search import MAX_PASSES, order_key
    g = torch.Generator().manual_seed(4)
    B, V = 18, 5000
    scaled = torch.randn(B, V, generator=g) * torch.tensor([1.0, 3.0, 8.0]).repeat(B // 3).unsqueeze(1)
    scaled[5, :3] = scaled[5].max() + 1.0  # a tie at the top
    rank = torch.randint(0, 80, (B,), generator=g)
    min_p = robust_min_p(scaled, torch.ones(B), rank)
    min_p[5] = 1.0
    min_p[7] = 1e-30  # below every bucket of the value pass
    min_p[8] = 0.0
    top_k = torch.where(torch.arange(B) % 3 == 0, torch.randint(1, 100, (B,), generator=g), 0).int()
    top_p = robust_top_p(scaled, torch.ones(B), torch.where(torch.arange(B) % 4 == 1, 30, -1))
    tau, kept_sum, passes = torch.ops.bild_kernels_cpu.cpu_filter_cut(scaled.contiguous(), top_k, top_p, min_p)
    want = R.sampling._filter_top_k_top_p(scaled, top_k, top_p, min_p) > float("-inf")
    got = order_key(scaled) >= tau.unsqueeze(1)
    for r in range(B):
        assert torch.equal(got[r], want[r]), f"row {r}"
        e = torch.exp(scaled[r].double() - scaled[r].max().double())
        torch.testing.assert_close(kept_sum[r].double(), e[got[r]].sum(), rtol=1e-5, atol=0.0)
    assert int(got[5].sum()) == 3
    assert bool(got[7].all())
    assert int(passes.max()) <= MAX_PASSES and int(passes[8]) == (0 if top_k[8] == 0 and top_p[8] == 1 else passes[8])


@pytest.mark.parametrize("kwargs, exc", [
    (dict(min_p=-0.1), ValueError), (dict(min_p=1.5), ValueError), (dict(min_p=float("nan")), ValueError),
    (dict(min_p=torch.zeros(3)), ValueError), (dict(min_p="x"), TypeError),
    (dict(min_p=torch.tensor([0.0, 0.2]), filtered=False), ValueError),
])
def test_min_p_bad_input(backend_device_passes, kwargs, exc):
    backend, device = backend_device_passes
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    logits = torch.zeros(2, 5, device=device)
    name = "filtered=False, but a row uses top-k, top-p or min-p" if "filtered" in kwargs else "min_p"
    with pytest.raises(exc, match=name):
        ops.sample_draft(logits, backend=backend, **kwargs)
    with pytest.raises(exc, match=name):
        ops.verify_draft(torch.zeros(2, 1, dtype=torch.int64, device=device), torch.zeros(2, 2, 5, device=device),
                         "greedy", temperature=0.5, backend=backend, **kwargs)

"""The CUDA sampling kernels' top-k / top-p cut-off search (csrc/cut_search.h), run on the host by the CPU
extension's cpu_filter_cut: the same bucket, bracket and settle code as the kernels' filter_cut, checked here
against the reference's filter (reference.sampling._filter_top_k_top_p): the kept set exactly, its mass closely, and
the number of passes over the row within its bound."""
import pytest
import torch

from bild_kernels import reference as R

from tests.kernels.test_sample_draft import robust_top_p

_cpu = pytest.importorskip("bild_kernels._cpu", reason="the CPU extension bild_kernels._cpu is not built")
MAX_PASSES = 5  # a value pass, then key passes that split at most 2^32 keys 1024-fold each


def order_key(s: torch.Tensor) -> torch.Tensor:
    """The kernels' int32 image of float32 values in their order (-0.0 onto +0.0)."""
    bits = torch.where(s == 0, torch.zeros_like(s), s).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def cut(scaled, top_k, top_p):
    return torch.ops.bild_kernels_cpu.cpu_filter_cut(scaled.float().contiguous(), top_k.int().contiguous(),
                                                     top_p.float().contiguous())


def check(scaled, top_k, top_p, max_passes=MAX_PASSES):
    tau, kept_sum, passes = cut(scaled, top_k, top_p)
    want = R.sampling._filter_top_k_top_p(scaled, top_k, top_p) > float("-inf")
    got = order_key(scaled) >= tau.unsqueeze(1)
    finite = torch.isfinite(scaled)  # a -inf logit has no mass and never wins a draw, kept or not
    filtered = ((top_k > 0) & (top_k < scaled.shape[1])) | (top_p < 1.0)
    for r in range(scaled.shape[0]):
        if not filtered[r]:
            assert tau[r] == -2147483647 and passes[r] == 0
            continue
        assert torch.equal(got[r] & finite[r], want[r]), f"row {r}: the kept set differs from the reference's"
        e = torch.exp(scaled[r].double() - scaled[r].max().double())
        torch.testing.assert_close(kept_sum[r].double(), e[got[r]].sum(), rtol=1e-5, atol=0.0)
    assert int(passes.max()) <= max_passes, passes.tolist()
    return tau, kept_sum, passes


@pytest.mark.parametrize("V", [111, 32000, 151936])
def test_cut_search_keeps_the_reference_set(V):
    """Random rows at three temperatures' spreads, top-k from 1 to V-1, top-p at every rank up to 40 (halfway
    between two steps of the sorted cumulative probability), and both together."""
    g = torch.Generator().manual_seed(V)
    B = 24
    scaled = torch.randn(B, V, generator=g) * torch.tensor([1.0, 3.0, 8.0]).repeat(B // 3).unsqueeze(1) + 2.0
    top_k = torch.randint(1, min(V, 60), (B,), generator=g).int()
    top_k[::5] = 0
    top_k[1] = V - 1
    rank = torch.randint(0, min(V, 40), (B,), generator=g)
    rank[::4] = -1
    top_p = robust_top_p(scaled, torch.ones(B), rank)
    _, _, passes = check(scaled, top_k, top_p)
    # Real settings cut within 32 nats of the max: one value pass brings the bracket to 1/32 nat, and a row
    # of these needs at most 2 more unless the cut-off lies next to zero.
    assert float(passes[passes > 0].float().median()) <= 3


def test_cut_search_on_separated_and_tied_rows():
    V = 1000
    grid = torch.linspace(-8.0, 8.0, V)
    rows = [grid[torch.randperm(V, generator=torch.Generator().manual_seed(i))] for i in range(4)]
    rows += [torch.full((V,), 1.5), torch.full((V,), -3.0)]  # every logit equal: ties at the cut-off are kept
    scaled = torch.stack(rows)
    top_k = torch.tensor([1, 7, 0, 500, 3, 0], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 1.0, 0.2])
    tau, _, _ = check(scaled, top_k, top_p)
    assert bool((order_key(scaled[4]) >= tau[4]).all()) and bool((order_key(scaled[5]) >= tau[5]).all())


def test_cut_search_edge_rows():
    """-inf logits, one finite logit, logits all below zero and around zero (the keys of a bucket that holds
    zero span most of the int32 range), a huge maximum (the value pass's buckets collapse onto one key), top-p
    that keeps only the max and one that reaches 200 tokens deep, top-k 1 and V - 1, and scaled logits of 1e8 with
    many equal values (a tiny temperature), where the value pass's bucket bounds collapse onto few floats."""
    V = 4096
    g = torch.Generator().manual_seed(7)
    base = torch.randn(V, generator=g)
    rows = [
        torch.where(torch.rand(V, generator=g) < 0.5, base * 4, torch.tensor(float("-inf"))),
        torch.full((V,), float("-inf")).index_fill(0, torch.tensor([17]), 3.0),
        base * 2 - 30.0,
        base * 0.01,
        base * 0.01 - 0.02,
        base + 1e30,
        base * 5,
        base * 5,
        base * 3,
        base * 3,
        (base * 8).round() * 1e7,  # a temperature of 1e-7 over integer logits
        2.0**28 + 32.0 * torch.randint(-40, 8, (V,), generator=g).float(),  # 2^28 + whole ulps: 512 of the
    ]                                                                        # value buckets on one float
    scaled = torch.stack(rows)
    top_k = torch.tensor([10, 1, 40, 100, 300, 20, 0, 0, 1, V - 1, 7, 200], dtype=torch.int32)
    rank = torch.tensor([30, -1, 20, -1, 5, -1, 0, 200, -1, -1, -1, -1])  # top-p's cut-off rank (-1: off)
    top_p = robust_top_p(scaled, torch.ones(len(rows)), rank)
    top_p[6] = 1e-6  # below the max's own probability: only the max is kept
    check(scaled, top_k, top_p)


def test_cut_search_below_the_value_range():
    """A flat row where top-k reaches more than 32 nats below the max: the value pass proves nothing and key
    passes over the rest of the range find the cut-off."""
    V = 2000
    scaled = torch.linspace(-100.0, 0.0, V).flip(0).unsqueeze(0).repeat(2, 1)
    top_k = torch.tensor([1500, V - 1], dtype=torch.int32)
    tau, _, passes = check(scaled, top_k, torch.ones(2))
    assert passes.tolist() == [4, 4], passes.tolist()  # the value pass and three key passes


def test_cut_search_without_filters_makes_no_pass():
    scaled = torch.randn(3, 50)
    tau, kept, passes = cut(scaled, torch.tensor([0, 50, 99]), torch.tensor([1.0, 1.0, 1.0]))
    assert passes.tolist() == [0, 0, 0] and tau.tolist() == [-2147483647] * 3

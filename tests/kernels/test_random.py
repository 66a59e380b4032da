"""The counter-based random numbers every sampling twin shares (reference.uniform_ref / gumbel_ref): uniforms
strictly inside (0, 1) for every Philox word, Gumbel draws finite and below GUMBEL_MAX (the bound that lets a
Gumbel-max kernel skip draws exactly), and the streams' basic statistics."""
import math

import torch

from bild_kernels import reference as R


def test_uniform_is_strictly_inside_the_unit_interval_for_every_word():
    words = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 512, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    u = R.uniform_of_word(words)
    assert u.dtype == torch.float32
    assert float(u.min()) == 2.0**-24 and float(u.max()) == 1.0 - 2.0**-24  # exact, never 0 or 1
    assert torch.equal(u, ((words >> 9).double() + 0.5).div(2**23).float())  # no rounding in float32
    # every one of the 2**23 levels is distinct and increasing (the float32 spacing near 1 is 2**-24)
    levels = R.uniform_of_word(torch.arange(2**23, dtype=torch.int64) << 9)
    assert bool((levels[1:] > levels[:-1]).all())


def test_gumbel_draws_are_finite_and_below_the_bound():
    u = R.uniform_of_word(torch.tensor([0, 2**32 - 1], dtype=torch.int64))
    g = -torch.log(-torch.log(u))  # gumbel_ref's formula in float32 at the two extreme uniforms
    assert bool(torch.isfinite(g).all())
    top = float(g.max())
    assert top == float(g[1]) and top < R.GUMBEL_MAX and R.GUMBEL_MAX - top < 0.01
    assert abs(top - (-math.log(-math.log1p(-2.0**-24)))) < 1e-4  # 16.6355...
    draws = R.gumbel_ref(torch.tensor(12345), torch.arange(200_000), torch.tensor(7), R.PURPOSE_DRAFT_SAMPLE, 0)
    assert bool(torch.isfinite(draws).all()) and float(draws.max()) < R.GUMBEL_MAX


def test_uniform_stream_statistics():
    """200k uniforms of one row: mean 1/2, variance 1/12, no bucket of 100 far from 2,000 (chi-square)."""
    u = R.uniform_ref(torch.tensor(2024), torch.arange(200_000), torch.tensor(3), R.PURPOSE_VERIFY_ACCEPT, 1).double()
    assert abs(float(u.mean()) - 0.5) < 0.003 and abs(float(u.var()) - 1 / 12) < 0.001
    counts = torch.histc(u, bins=100, min=0.0, max=1.0)
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 160  # 99 degrees of freedom: the 0.9999 quantile is ~155

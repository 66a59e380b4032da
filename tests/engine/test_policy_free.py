"""FREE's adaptive thresholds: the Beta-mixture fit on synthetic draws, and the online calibration in BiLD."""
import math

import numpy as np
import pytest
import torch

from bild_kernels import BiLD, Engine, SamplingParams
from bild_kernels.engine.calibration import (BetaMixture, BetaParams, Calibration, Calibrator, fit_beta,
                                             fit_beta_mixture, labelled_pairs, select_threshold)

from .conftest import assert_all_free

PROMPTS = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 37, 38]]
N = 12


def _draws(n_agree, n_disagree, agree=(5.0, 2.0), disagree=(2.0, 5.0), seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.beta(*agree, n_agree), rng.beta(*disagree, n_disagree)])
    y = np.concatenate([np.ones(n_agree, bool), np.zeros(n_disagree, bool)])
    perm = rng.permutation(x.size)
    return x[perm], y[perm]


# -- the pure math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b", [(5.0, 2.0), (0.7, 0.9), (30.0, 3.0)])
def test_fit_beta_recovers_parameters(a, b):
    fit = fit_beta(np.random.default_rng(1).beta(a, b, 200_000))
    assert fit.alpha == pytest.approx(a, rel=0.03) and fit.beta == pytest.approx(b, rel=0.03)


def test_fit_mixture_recovers_both_classes_and_the_prior():
    x, y = _draws(120_000, 80_000, agree=(8.0, 2.0), disagree=(1.5, 3.0))
    mix = fit_beta_mixture(x, y)
    assert (mix.agree.alpha, mix.agree.beta) == pytest.approx((8.0, 2.0), rel=0.03)
    assert (mix.disagree.alpha, mix.disagree.beta) == pytest.approx((1.5, 3.0), rel=0.03)
    assert mix.prior_agree == pytest.approx(0.6)


def test_threshold_of_a_symmetric_mixture_is_analytic():
    # Beta(5,2) vs Beta(2,5), equal priors: P(agree | x) = x^3 / (x^3 + (1-x)^3) > 0.9 iff x > r / (1 + r),
    # r = 9^(1/3); the smallest grid point above that is the threshold.
    mix = BetaMixture(BetaParams(5.0, 2.0), BetaParams(2.0, 5.0), 0.5)
    r = 9 ** (1 / 3)
    exact = r / (1 + r)
    assert mix.posterior(np.array([exact]))[0] == pytest.approx(0.9)
    assert select_threshold(mix, 0.9) == pytest.approx(math.ceil(exact * 1000) / 1000)
    assert select_threshold(mix, 0.5) == pytest.approx(0.501)  # the posterior crosses 1/2 at x = 1/2
    same = BetaMixture(BetaParams(2.0, 2.0), BetaParams(2.0, 2.0), 0.7)  # confidence says nothing: P = 0.7
    assert select_threshold(same, 0.69) == pytest.approx(0.001)
    assert select_threshold(same, 0.71) == 1.0  # nothing on the grid is that sure: the cautious end


def test_fitted_threshold_matches_the_true_one():
    x, y = _draws(150_000, 100_000, agree=(6.0, 1.5), disagree=(2.0, 4.0), seed=3)
    true = BetaMixture(BetaParams(6.0, 1.5), BetaParams(2.0, 4.0), 0.6)
    for target in (0.7, 0.85, 0.95):
        assert select_threshold(fit_beta_mixture(x, y), target) == pytest.approx(select_threshold(true, target),
                                                                                 abs=0.01)


def test_unfittable_samples():
    assert fit_beta([0.3] * 7) is None  # too few
    assert fit_beta([0.3] * 50) is None  # no variance
    assert fit_beta([0.0, 1.0] * 50) is None  # variance of a Bernoulli: no Beta has it
    x, y = _draws(500, 3)
    assert fit_beta_mixture(x, y) is None  # the disagreeing class is too small
    with pytest.raises(ValueError, match="same length"):
        fit_beta_mixture([0.5, 0.6], [True])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_beta_mixture([0.5, 1.5], [True, False])
    with pytest.raises(ValueError, match="target"):
        select_threshold(BetaMixture(BetaParams(2, 2), BetaParams(2, 2), 0.5), 1.0)


def test_calibrator_refits_on_a_bounded_buffer_and_freezes():
    cal = Calibrator(0.6, target=0.9, refit_every=1000, buffer_size=3000, max_updates=2)
    x, y = _draws(30_000, 30_000)
    cal.observe(x[:999], y[:999])
    assert cal.updates == 0 and cal.threshold == 0.6  # not yet refit_every new pairs
    cal.observe(x[999:1000], y[999:1000])
    assert cal.updates == 1 and cal.threshold == pytest.approx(0.676, abs=0.03)
    assert len(cal._x) == 1000
    cal.observe(x[1000:5000], y[1000:5000])
    assert cal.updates == 2 and cal.frozen and len(cal._x) == 3000  # bounded: only the last 3000 pairs
    frozen_at = cal.threshold
    x2, y2 = _draws(5000, 5000, agree=(20.0, 1.0), disagree=(1.0, 1.0), seed=9)
    cal.observe(x2, y2)
    assert cal.updates == 2 and cal.threshold == frozen_at and cal.seen == 5000


def _disagree_mean(mix):
    return mix.disagree.alpha / (mix.disagree.alpha + mix.disagree.beta)


def test_online_threshold_ignores_the_tail_below_the_disagreeing_class():
    # A narrow disagreeing class: near 0 its density vanishes faster than the agreeing one's, so the
    # posterior is high there too; the literal smallest λ is an artefact the calibrator must skip.
    x, y = _draws(20_000, 20_000, agree=(3.0, 1.5), disagree=(30.0, 150.0), seed=5)
    mix = fit_beta_mixture(x, y)
    assert select_threshold(mix, 0.9) < 0.05
    cal = Calibrator(0.6, target=0.9, refit_every=40_000, buffer_size=40_000, max_updates=1)
    cal.observe(x, y)
    assert cal.threshold == select_threshold(mix, 0.9, lower=_disagree_mean(mix))
    assert 0.2 < cal.threshold < 0.4 and mix.posterior(np.array([cal.threshold]))[0] > 0.9


def test_rollback_calibration_works_on_squashed_distances():
    cal = Calibration(fallback=False, rollback=True, fallback_threshold=0.6, rollback_threshold=5.0, target=0.9,
                      refit_every=10_000, buffer_size=20_000, max_updates=5)
    assert cal.rollback_threshold == pytest.approx(5.0) and cal.fallback_threshold == 0.6
    x, y = _draws(10_000, 10_000, seed=4)
    cal.observe([], [], (-np.log(x)).tolist(), y.tolist())  # distances d = -log x
    mix = fit_beta_mixture(x, y)
    expected = select_threshold(mix, 0.9, lower=_disagree_mean(mix))
    assert cal.updates == 1 and cal.rollback_threshold == pytest.approx(-math.log(expected))
    assert cal.as_dict()["rollback_updates"] == 1 and cal.as_dict()["fallback_updates"] is None


def test_labelled_pairs_stop_at_the_first_mismatch():
    drafts = [[4, 5, 6], [7, 8], [], [9]]
    confidences = [[0.9, 0.8, 0.7], [0.95, 0.85], [], [0.6]]
    unsure = [(1, 0.2), (2, 0.3), (3, 0.1), None]
    argmax = [[4, 0, 6, 0], [7, 8, 2], [0], [9, 5]]
    distances = [[0.1, 2.0, 0.3], [0.05, 0.2], [], [0.4]]
    conf, conf_ok, dist, dist_ok = labelled_pairs(drafts, confidences, unsure, argmax, distances)
    # row 0 stops at its mismatch (its unsure token is not labelled), row 1 agrees throughout and adds its
    # unsure token (which the large model would have emitted), row 2 only that, row 3 has none
    assert conf == [0.9, 0.8, 0.95, 0.85, 0.3, 0.1, 0.6]
    assert conf_ok == [True, False, True, True, True, False, True]
    assert dist == [0.1, 2.0, 0.05, 0.2, 0.4] and dist_ok == [True, False, True, True, True]


# -- the policy -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=3, max_model_len=64,
                  block_size=4)


def test_pairs_are_labelled_up_to_the_first_mismatch(engine, large_model):
    from .conftest import hf_greedy
    # No refit: the thresholds stay at 0.6 (the fallback target) / fixed 0 (lossless), and the buffer
    # holds every labelled pair.
    policy = BiLD(fallback_threshold="auto", rollback_threshold=0.0, max_draft_len=4, fallback_target=0.6,
                  refit_every=10**6, buffer_size=10**6)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert [o.token_ids for o in outs] == [hf_greedy(large_model, p, N) for p in PROMPTS]
    x, y = np.array(policy.calibration.fallback._x), np.array(policy.calibration.fallback._y)
    drafted = x >= 0.6  # drafted tokens were confident; the discarded unsure ones were not
    accepted = sum(o.metrics.accepted_tokens for o in outs)
    rollbacks = sum(o.metrics.rollbacks for o in outs)
    assert int(y[drafted].sum()) == accepted and int((~y[drafted]).sum()) == rollbacks
    assert 0 < int((~drafted).sum()) <= sum(o.metrics.fallbacks for o in outs)
    assert policy.calibration.rollback is None and policy.thresholds() == (0.6, 0.0)
    assert_all_free(engine)


def test_auto_thresholds_calibrate_then_freeze(engine):
    policy = BiLD(fallback_threshold="auto", rollback_threshold="auto", target=0.6, fallback_target=0.4,
                  max_draft_len=4, refit_every=12, max_updates=3)
    cal = policy.calibration
    # before any fit: the fallback at its target, the rollback exact
    assert (cal.fallback_threshold, cal.rollback_threshold, cal.updates) == (0.4, 0.0, 0)
    assert str(cal.rollback_threshold) == "0.0"
    for _ in range(6):
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
        assert all(len(o.token_ids) == N for o in outs)
        if cal.frozen:
            break
    assert cal.frozen and cal.updates == 3 and cal.fallback.updates == 3 and cal.rollback.updates == 3
    fb, rb = policy.thresholds()
    assert (fb, rb) != (0.4, 0.0)
    # each threshold from its own target: the fallback's break-even, the rollback's quality target
    assert fb == select_threshold(cal.fallback.mixture, 0.4, lower=_disagree_mean(cal.fallback.mixture))
    rb_conf = select_threshold(cal.rollback.mixture, 0.6, lower=_disagree_mean(cal.rollback.mixture))
    assert rb == pytest.approx(-math.log(rb_conf)) and 0.0 < fb < 1.0 and 0.0 <= rb < 5.0
    engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert policy.thresholds() == (fb, rb) and cal.updates == 3  # frozen: no more fits
    assert_all_free(engine)


def test_each_threshold_is_fitted_to_its_own_target():
    # The same pairs for both: the fallback's lower break-even target gives the lower threshold.
    cal = Calibration(fallback=True, rollback=True, fallback_threshold=0.5, rollback_threshold=0.0, target=0.9,
                      fallback_target=0.5, refit_every=20_000, buffer_size=20_000, max_updates=5)
    x, y = _draws(10_000, 10_000, seed=6)
    cal.observe(x.tolist(), y.tolist(), (-np.log(x)).tolist(), y.tolist())
    mix = fit_beta_mixture(x, y)
    assert cal.fallback_threshold == select_threshold(mix, 0.5, lower=_disagree_mean(mix)) == pytest.approx(0.5, abs=0.02)
    assert cal.rollback_threshold == pytest.approx(-math.log(select_threshold(mix, 0.9, lower=_disagree_mean(mix))))
    assert cal.fallback.target == 0.5 and cal.rollback.target == 0.9
    same = Calibration(fallback=True, rollback=False, fallback_threshold=0.6, rollback_threshold=5.0, target=0.7,
                       refit_every=10, buffer_size=10, max_updates=1)
    assert same.fallback.target == 0.7  # no fallback_target: the one target serves both


def test_auto_defaults():
    policy = BiLD(fallback_threshold="auto", rollback_threshold="auto")
    assert (policy.target, policy.fallback_target, policy.refit_every) == (0.9, 0.5, 64)
    assert policy.thresholds() == (0.5, 0.0)
    assert BiLD(fallback_threshold="auto", fallback_target=0.3).thresholds() == (0.3, 5.0)
    assert BiLD(fallback_threshold=0.4, rollback_threshold="auto").thresholds() == (0.4, 0.0)


def test_fixed_thresholds_have_no_calibration():
    assert BiLD().calibration is None and BiLD(fallback_threshold=0.3).thresholds() == (0.3, 5.0)
    assert BiLD(rollback_threshold="auto").calibration.fallback is None


@pytest.mark.parametrize("bad, match", [
    (dict(fallback_threshold="automatic"), "fallback_threshold"), (dict(rollback_threshold="aut"), "rollback"),
    (dict(target=1.0), "target"), (dict(target=0.0), "target"), (dict(target=float("nan")), "target"),
    (dict(fallback_target=1.0), "fallback_target"), (dict(fallback_target=0), "fallback_target"),
    (dict(fallback_target="auto"), "fallback_target"),
    (dict(refit_every=0), "refit_every"), (dict(buffer_size=1), "buffer_size"), (dict(max_updates=0), "max_updates"),
    (dict(max_updates=2.5), "max_updates"),
])
def test_bad_calibration_parameters_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        BiLD(**{"fallback_threshold": "auto", "rollback_threshold": "auto", **bad})

"""FREE's adaptive thresholds (Bae et al. 2023): a two-class Beta mixture over labelled confidences.

Every verification pass labels each drafted position up to the first mismatch: x = the draft's
confidence, y = whether the large model agreed. One Beta per class is fitted by the method of
moments, with the class frequencies as priors; the threshold is the smallest λ on a grid where
P(agree | x = λ) > ζ. The pure functions below do the math; `Calibrator` adds the online part
(a bounded buffer, periodic refits, a freeze), and `Calibration` is the state a policy carries.
Online, the search starts at the disagreeing class's mean confidence: below it, a posterior above ζ
is a tail artefact of the fit, not evidence (a threshold there would keep almost every token).

Rollback distances d = -log p_L(draft) in [0, inf) are squashed into (0, 1] by x = exp(-d) = p_L(draft),
so the same fit applies; the threshold maps back by d = -log λ.

The two thresholds answer different questions, so each has its own target. The rollback threshold
decides which disagreeing drafts stay in the output: ζ (`target`) is FREE's quality target. The
fallback threshold only decides whether the drafter proposes one more token, which the large model
still verifies: a token kept saves a large-model step, a token lost costs a draft step and its share
of the verify pass, so drafting pays while P(agree | confidence) exceeds that cost as a fraction of a
large-model step. `fallback_target` is that break-even.
Before the first fit the thresholds are the neutral guesses: fallback at its target (a calibrated
drafter, P(agree | x) = x), rollback at 0 (exact until the fit says what the target allows).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

GRID = np.arange(1, 1000) / 1000.0  # candidate thresholds λ in (0, 1)
MIN_PER_CLASS = 8  # fewer samples of a class than this: no fit
_EPS = 1e-4  # confidences are clamped into [eps, 1 - eps]: a Beta has no mass at 0 or 1


@dataclass(frozen=True)
class BetaParams:
    alpha: float
    beta: float

    def log_pdf(self, x) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=np.float64), _EPS, 1.0 - _EPS)
        log_norm = math.lgamma(self.alpha + self.beta) - math.lgamma(self.alpha) - math.lgamma(self.beta)
        return log_norm + (self.alpha - 1.0) * np.log(x) + (self.beta - 1.0) * np.log1p(-x)


@dataclass(frozen=True)
class BetaMixture:
    agree: BetaParams
    disagree: BetaParams
    prior_agree: float  # fraction of agreeing samples

    def posterior(self, x) -> np.ndarray:
        """P(agree | x) for each x."""
        la = math.log(self.prior_agree) + self.agree.log_pdf(x)
        ld = math.log1p(-self.prior_agree) + self.disagree.log_pdf(x)
        return 1.0 / (1.0 + np.exp(ld - la))


def fit_beta(x) -> BetaParams | None:
    """Method of moments: α = m·c, β = (1 - m)·c with c = m(1 - m)/v - 1. None when the samples cannot
    define a Beta (fewer than MIN_PER_CLASS, or a variance of about 0 or at least m(1 - m))."""
    x = np.clip(np.asarray(x, dtype=np.float64).ravel(), _EPS, 1.0 - _EPS)
    if x.size < MIN_PER_CLASS:
        return None
    m, v = float(x.mean()), float(x.var(ddof=1))
    if not 1e-9 * m * (1.0 - m) < v < m * (1.0 - m):  # (a variance of rounding error is none)
        return None
    c = m * (1.0 - m) / v - 1.0
    return BetaParams(m * c, (1.0 - m) * c)


def fit_beta_mixture(x, agreed) -> BetaMixture | None:
    """One Beta per class of the labelled samples (x in [0, 1], agreed bool); None if a class can't be fitted."""
    x, agreed = np.asarray(x, dtype=np.float64).ravel(), np.asarray(agreed, dtype=bool).ravel()
    if x.shape != agreed.shape:
        raise ValueError(f"x and agreed must have the same length, got {x.size} and {agreed.size}")
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise ValueError("x must hold confidences in [0, 1]")
    a, d = fit_beta(x[agreed]), fit_beta(x[~agreed])
    if a is None or d is None:
        return None
    return BetaMixture(a, d, float(agreed.mean()))


def select_threshold(mixture: BetaMixture, target: float, grid=GRID, lower: float = 0.0) -> float:
    """The smallest λ >= lower of `grid` with P(agree | x = λ) > target; 1.0 (the cautious end) if none."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target!r}")
    grid = np.asarray(grid, dtype=np.float64)
    grid = grid[grid >= lower]
    ok = np.nonzero(mixture.posterior(grid) > target)[0]
    return float(grid[ok[0]]) if ok.size else 1.0


def squash_distance(d) -> np.ndarray:
    """Rollback distance -log p_L(y) -> p_L(y) in (0, 1]."""
    return np.exp(-np.asarray(d, dtype=np.float64))


def labelled_pairs(drafts, confidences, unsure, argmax, distances):
    """FREE's training pairs from one verification pass, per row: each drafted position up to the first
    mismatch with the large model's argmax, labelled by agreement, and, when the whole run agreed, the
    token the drafter discarded as unsure (what lets a raised threshold come back down). Returns
    (confidences, agreed, distances, agreed) lists for `Calibration.observe`.

    drafts [B][k_i] ids; confidences [B][k_i] max p_S; unsure [B] (id, max p_S) or None;
    argmax [B][>= k_i + 1] the large model's argmax per position; distances [B][>= k_i] -log p_L(draft)."""
    conf, conf_ok, dist, dist_ok = [], [], [], []
    for i, d in enumerate(drafts):
        for j, tok in enumerate(d):
            agreed = tok == argmax[i][j]
            conf.append(confidences[i][j])
            conf_ok.append(agreed)
            dist.append(distances[i][j])
            dist_ok.append(agreed)
            if not agreed:
                break
        else:
            if unsure[i] is not None:
                conf.append(unsure[i][1])
                conf_ok.append(unsure[i][0] == argmax[i][len(d)])
    return conf, conf_ok, dist, dist_ok


class Calibrator:
    """One online threshold (in confidence units): buffers the last `buffer_size` pairs, refits after
    every `refit_every` new ones, and freezes after `max_updates` successful fits."""

    def __init__(self, threshold: float, *, target: float, refit_every: int, buffer_size: int, max_updates: int):
        self.threshold, self.target = threshold, target
        self.refit_every, self.max_updates = refit_every, max_updates
        self.updates = 0
        self.mixture: BetaMixture | None = None
        self.seen = 0  # pairs observed (while not frozen)
        self._x: deque[float] = deque(maxlen=buffer_size)
        self._y: deque[bool] = deque(maxlen=buffer_size)
        self._new = 0

    @property
    def frozen(self) -> bool:
        return self.updates >= self.max_updates

    def observe(self, x, agreed) -> None:
        if self.frozen:
            return
        x, agreed = list(x), list(agreed)
        self._x.extend(x)
        self._y.extend(agreed)
        self.seen += len(x)
        self._new += len(x)
        if self._new >= self.refit_every:
            self._new = 0
            mix = fit_beta_mixture(list(self._x), list(self._y))
            if mix is not None:
                # Below the disagreeing class's mean confidence, P(agree | x) > target can only be an
                # artefact of the Betas' tails (a narrow disagreeing class leaves it high near 0).
                lower = mix.disagree.alpha / (mix.disagree.alpha + mix.disagree.beta)
                self.mixture, self.threshold = mix, select_threshold(mix, self.target, lower=lower)
                self.updates += 1


class Calibration:
    """The mutable calibration state of a policy: current thresholds (fallback on max p_S, rollback on
    the distance), fits so far, and the calibrators that produce them (None: that threshold is fixed).
    `target` is the rollback's ζ, `fallback_target` the fallback's (default: the same)."""

    def __init__(self, *, fallback: bool, rollback: bool, fallback_threshold: float, rollback_threshold: float,
                 target: float, refit_every: int, buffer_size: int, max_updates: int,
                 fallback_target: float | None = None):
        kw = dict(refit_every=refit_every, buffer_size=buffer_size, max_updates=max_updates)
        fb_target = target if fallback_target is None else fallback_target
        self.fallback = Calibrator(fallback_threshold, target=fb_target, **kw) if fallback else None
        self.rollback = Calibrator(float(squash_distance(rollback_threshold)), target=target, **kw) if rollback else None
        self._fixed = (fallback_threshold, rollback_threshold)

    @property
    def fallback_threshold(self) -> float:
        return self.fallback.threshold if self.fallback else self._fixed[0]

    @property
    def rollback_threshold(self) -> float:
        return 0.0 - math.log(self.rollback.threshold) if self.rollback else self._fixed[1]  # (never -0.0)

    @property
    def updates(self) -> int:
        """Fits so far (the larger count when both thresholds calibrate)."""
        return max(c.updates for c in (self.fallback, self.rollback) if c is not None)

    @property
    def frozen(self) -> bool:
        return all(c.frozen for c in (self.fallback, self.rollback) if c is not None)

    def observe(self, confidences, confidence_agreed, distances, distance_agreed) -> None:
        """Labelled pairs of one verification pass: (max p_S, agreed) and (-log p_L(draft), agreed)."""
        if self.fallback is not None and len(confidences):
            self.fallback.observe(confidences, confidence_agreed)
        if self.rollback is not None and len(distances):
            self.rollback.observe(squash_distance(distances).tolist(), distance_agreed)

    def as_dict(self) -> dict:
        return {"fallback_threshold": self.fallback_threshold, "rollback_threshold": self.rollback_threshold,
                "fallback_updates": self.fallback.updates if self.fallback else None,
                "rollback_updates": self.rollback.updates if self.rollback else None,
                "updates": self.updates, "frozen": self.frozen}

    def __repr__(self) -> str:
        return f"Calibration({self.as_dict()})"

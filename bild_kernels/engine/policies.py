"""Decoding policies. A policy decides (how far to draft, when to fall back, how to verify);
the engine executes. Every policy is a frozen dataclass validated on construction.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from bild_kernels.engine.calibration import Calibration

FALLBACK_SIGNALS = ("max_prob", "energy")


class Policy:
    """Base: no small model, nothing drafted; the large model emits one token per pass."""

    name = "policy"
    uses_small = False  # the engine needs a small model
    drafts = False  # something drafts runs that the large model verifies
    drafter = "small"  # "small": the small model; "guess": Jacobi's guesses; "shallow": the large model's first
    # layers; "lookup": n-gram lookup in the sequence's own tokens (NGram)
    verify_mode = "greedy"  # bild_kernels.ops.verify_draft mode ("greedy" samples the emitted token when T > 0)
    max_draft_len = 0
    fallback_signal = "max_prob"  # "max_prob": unsure when max p < threshold; "energy": when energy > threshold
    fallback_threshold = 0.0
    rollback_threshold = 0.0
    calibration: Calibration | None = None  # online thresholds (FREE), None when they are fixed
    lookup: NGram | None = None  # a small model's policy: rows whose n-gram lookup matches take its drafts instead

    @property
    def max_run(self) -> int:
        """The most tokens one pass may verify past the committed ones (what a request's KV budget allows for)."""
        return max(self.max_draft_len, self.lookup.max_draft_len if self.lookup is not None else 0)

    def thresholds(self) -> tuple[float, float]:
        """The (fallback, rollback) thresholds to use now: fixed, or the calibration's current ones."""
        if self.calibration is not None:
            return self.calibration.fallback_threshold, self.calibration.rollback_threshold
        return self.fallback_threshold, self.rollback_threshold

    def request_error(self, params) -> str | None:
        """Why this policy cannot serve a request with these SamplingParams (None: it can)."""
        return None


MAX_DRAFT_LEN = 64  # the longest draft run a policy may ask for (the graphed draft loop keeps as many steps' outputs)


def _check_draft_len(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DRAFT_LEN:
        raise ValueError(f"max_draft_len must be an int in [1, {MAX_DRAFT_LEN}], got {n!r}")


@dataclass(frozen=True)
class LargeOnly(Policy):
    """Plain autoregressive decoding with the large model (the baseline)."""

    name = "large-only"


@dataclass(frozen=True)
class SmallOnly(Policy):
    """Plain autoregressive decoding with the small model (the other baseline)."""

    name = "small-only"
    uses_small = True

    def request_error(self, params) -> str | None:
        if params.penalized:
            return ("a logit bias, penalties and min_tokens shape the large model's distribution: small-only runs "
                    "the small model alone and verifies nothing")
        if params.logits_processors:
            return ("logits_processors act on the large model's distribution: small-only runs the small model alone "
                    "and verifies nothing")
        if params.guided:
            what = "structured_outputs" if params.structured_outputs is not None else "allowed_token_ids and bad_words"
            return (f"{what} mask the large model's distribution: small-only runs the small model alone "
                    "and verifies nothing")
        return None


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _check_int(name: str, n, lo: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {n!r}")


@dataclass(frozen=True)
class NGram(Policy):
    """N-gram lookup speculation (prompt lookup decoding; vLLM's `ngram`, transformers'
    `prompt_lookup_num_tokens`), no small model: each pass drafts the up to `max_draft_len` tokens that
    followed the latest earlier occurrence of the sequence's last n tokens (n from `max_ngram` down to
    `min_ngram`) in its own prompt and output, and nothing where no n-gram matches. The drafts are
    verified as speculative sampling with one-hot draft distributions (greedy verification when every
    row is greedy), so the output is exactly the large model's, at any temperature.

    Also a small model's helper: `Greedy(lookup=NGram(...))`, `BiLD(..., lookup=...)` and
    `SpeculativeSampling(lookup=...)` draft from the lookup on the rows where it matches (the small model
    skips them that pass) and with the small model elsewhere."""

    max_draft_len: int = 4
    max_ngram: int = 3
    min_ngram: int = 2  # one-token matches predict poorly (37% right on the default pair's held-out answers)
    name = "ngram"
    drafts = True
    drafter = "lookup"
    verify_mode = "sample"

    def __post_init__(self):
        _check_draft_len(self.max_draft_len)
        _check_int("max_ngram", self.max_ngram, 1)
        _check_int("min_ngram", self.min_ngram, 1)
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram must be <= max_ngram, got {self.min_ngram} > {self.max_ngram}"
                             + (" (min_ngram defaults to 2)" if self.max_ngram == 1 else ""))


def _check_lookup(lookup) -> None:
    if lookup is not None and not isinstance(lookup, NGram):
        raise TypeError(f"lookup must be an NGram policy or None, got {type(lookup).__name__}")


@dataclass(frozen=True)
class BiLD(Policy):
    """Big Little Decoder (Kim et al. 2023). The small model drafts until it is unsure (that token is
    discarded) or `max_draft_len` tokens; the large model then rolls back at the first drafted token
    whose distance -log p_L exceeds `rollback_threshold` and is not its own choice.
    rollback_threshold -> 0 with greedy decoding reproduces the large model's greedy output.

    fallback_signal: "max_prob" (BiLD: unsure when max p_S < fallback_threshold, in [0, 1]; default
    0.6) or "energy" (E-LANG: unsure when -T logsumexp(z/T) > fallback_threshold, a real number,
    typically negative; no default, its scale depends on the model; T is the request's temperature, 1
    when greedy, as in `sample_draft`).
    "auto" thresholds (FREE, max_prob only): calibrated online from the (confidence, agreed) pairs of
    every verification pass, each at the smallest value where P(agree | x = threshold) exceeds its
    target; refit every `refit_every` new pairs on the last `buffer_size`, frozen after `max_updates`
    fits. The rollback's `target` (ζ) is a quality target: which disagreeing drafts may stay. The
    fallback's `fallback_target` is a cost break-even, since a drafted token is still verified: the
    drafter goes on while the token is likely enough to be kept to pay for its draft step and its share
    of the verify pass (about a third of a large-model step for the default pair on a CPU; 0.5 keeps a
    margin; a cheaper drafter, as on a GPU, can go lower). Before the first fit they are
    `fallback_target` and 0 (exact verification); `calibration` shows their current values.
    Calibrated thresholds are shared by every request the policy serves, so a request's output then
    depends on what ran before it."""

    fallback_threshold: float | str | None = None
    rollback_threshold: float | str = 5.0
    max_draft_len: int = 10
    fallback_signal: str = "max_prob"
    target: float = 0.9
    fallback_target: float = 0.5
    refit_every: int = 64
    buffer_size: int = 4096
    max_updates: int = 50
    lookup: NGram | None = None
    calibration: Calibration | None = field(default=None, init=False, repr=False, compare=False)
    name = "bild"
    uses_small = True
    drafts = True
    verify_mode = "bild"

    def __post_init__(self):
        f, r, sig = self.fallback_threshold, self.rollback_threshold, self.fallback_signal
        if sig not in FALLBACK_SIGNALS:
            raise ValueError(f"fallback_signal must be one of {FALLBACK_SIGNALS}, got {sig!r}")
        if f is None:
            if sig == "energy":
                raise ValueError("fallback_signal='energy' needs an explicit fallback_threshold (a real number, "
                                 "typically negative: the energy -T*logsumexp(z/T) above which a token is hard)")
            object.__setattr__(self, "fallback_threshold", f := 0.6)
        if f == "auto":
            if sig != "max_prob":
                raise ValueError("fallback_threshold='auto' calibrates a probability: "
                                 "it needs fallback_signal='max_prob'")
        elif sig == "max_prob" and not (_is_real(f) and 0.0 <= f <= 1.0):
            raise ValueError(f"fallback_threshold must be in [0, 1] (or 'auto') for fallback_signal='max_prob', "
                             f"got {f!r}")
        elif sig == "energy" and not _is_real(f):
            raise ValueError(f"fallback_threshold must be a finite real number for fallback_signal='energy', got {f!r}")
        if r != "auto" and not (_is_real(r) and r >= 0):
            raise ValueError(f"rollback_threshold must be >= 0 (or 'auto'), got {r!r}")
        _check_draft_len(self.max_draft_len)
        _check_lookup(self.lookup)
        for name in ("target", "fallback_target"):
            t = getattr(self, name)
            if not (_is_real(t) and 0.0 < t < 1.0):
                raise ValueError(f"{name} must be a probability in (0, 1), got {t!r}")
        _check_int("refit_every", self.refit_every, 1)
        _check_int("buffer_size", self.buffer_size, 2)
        _check_int("max_updates", self.max_updates, 1)
        if "auto" in (f, r):
            object.__setattr__(self, "calibration", Calibration(
                fallback=f == "auto", rollback=r == "auto",
                fallback_threshold=self.fallback_target if f == "auto" else f,
                rollback_threshold=0.0 if r == "auto" else r, target=self.target,
                fallback_target=self.fallback_target, refit_every=self.refit_every,
                buffer_size=self.buffer_size, max_updates=self.max_updates))


def with_lookup(kw: dict) -> dict:
    """A policy's keyword arguments written as JSON (a draft's manifest, a server request): `lookup`, if given, as
    a dict of NGram's fields, becomes the NGram."""
    look = kw.get("lookup")
    if look is None or isinstance(look, NGram):
        return dict(kw)
    if not isinstance(look, dict):
        raise TypeError(f"lookup must be a dict of NGram's fields (max_draft_len, max_ngram, min_ngram), "
                        f"got {type(look).__name__}")
    return dict(kw, lookup=NGram(**look))


def bild_from_dict(d: dict) -> BiLD:
    """The BiLD policy a draft's manifest recommends (`policy` in bild_draft.json): BiLD's fields, with `lookup` as
    a dict of NGram's fields."""
    return BiLD(**with_lookup(d))


@dataclass(frozen=True)
class _SmallDrafts(Policy):
    """The small model drafts `max_draft_len` tokens (no fallback); the verify mode decides what is kept."""

    max_draft_len: int = 5
    lookup: NGram | None = None
    uses_small = True
    drafts = True

    def __post_init__(self):
        _check_draft_len(self.max_draft_len)
        _check_lookup(self.lookup)


@dataclass(frozen=True)
class Greedy(_SmallDrafts):
    """Lossless greedy speculative decoding: drafts are kept while they equal the large model's argmax."""

    name = "greedy"
    verify_mode = "greedy"


@dataclass(frozen=True)
class SpeculativeSampling(_SmallDrafts):
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the output follows the
    large model's distribution exactly, at any temperature."""

    name = "speculative-sampling"
    verify_mode = "sample"


@dataclass(frozen=True)
class Jacobi(Policy):
    """CLLM's Jacobi decoding (Kou et al. 2024), no small model. Each pass feeds the large model the
    last committed token followed by `block_size` guesses; the longest prefix of guesses that equal its
    argmax is kept (the fixed-point condition), plus its argmax after them, and its predictions past
    that point are carried as the next pass's first guesses. Fresh guesses are tokens drawn from the
    prompt. The output is exactly the large model's greedy output; only greedy requests are served."""

    block_size: int = 8
    name = "jacobi"
    drafts = True
    drafter = "guess"
    verify_mode = "greedy"

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or not 1 <= self.block_size <= 64:
            raise ValueError(f"block_size must be an int in [1, 64], got {self.block_size!r}")

    @property
    def max_draft_len(self) -> int:
        return self.block_size

    def guess(self, seq, n: int) -> list[int]:
        """Up to n guesses: the carried predictions, then prompt tokens drawn with the request's seed."""
        carried = seq.guesses[:n]
        rng = random.Random(seq.params.seed * 1_000_003 + seq.iteration)
        prompt = seq.tokens[:seq.prompt_len]
        return carried + [rng.choice(prompt) for _ in range(n - len(carried))]

    def request_error(self, params) -> str | None:
        if params.temperature > 0:
            return f"Jacobi decoding is greedy: temperature must be 0, got {params.temperature}"
        return None


@dataclass(frozen=True)
class ShallowDeep(Policy):
    """FREE's shallow-deep decoding (Bae et al. 2023), no small model: the large model's first
    `exit_layer` layers with its final norm and head draft while their max probability is at least
    `fallback_threshold` (at most `max_draft_len` tokens); drafted tokens leave their deep-layer KV
    pending, and the verification pass runs the deep layers once over every pending token
    (synchronized parallel decoding). Verification uses BiLD's rollback rule; the default
    rollback_threshold=0 with greedy decoding gives exactly the large model's greedy output."""

    exit_layer: int
    fallback_threshold: float = 0.6
    rollback_threshold: float = 0.0
    max_draft_len: int = 8
    name = "shallow-deep"
    drafts = True
    drafter = "shallow"
    verify_mode = "bild"

    def __post_init__(self):
        _check_int("exit_layer", self.exit_layer, 1)
        f, r = self.fallback_threshold, self.rollback_threshold
        if not (_is_real(f) and 0.0 <= f <= 1.0):
            raise ValueError(f"fallback_threshold must be in [0, 1], got {f!r}")
        if not (_is_real(r) and r >= 0):
            raise ValueError(f"rollback_threshold must be >= 0, got {r!r}")
        _check_draft_len(self.max_draft_len)

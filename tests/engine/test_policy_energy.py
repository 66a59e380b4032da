"""E-LANG's energy as BiLD's fallback signal: the engine against a plain loop over the HF models."""
import pytest
import torch

from bild_kernels import BiLD, Engine, SamplingParams

from .conftest import assert_all_free, greedy_speculative_reference, hf_greedy

PROMPTS = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 37, 38]]
N = 12
THRESHOLD = -7.2  # the tiny small model's energies spread over about [-8.6, -6.5]


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=3, max_model_len=64,
                  block_size=4)


def _energy_bild_reference(large, small, prompt, n, threshold, max_draft_len):
    """BiLD with rollback threshold 0 (greedy, lossless) and the energy fallback, one token at a time on
    the HF models: returns (output, drafted, accepted, fallbacks)."""
    return greedy_speculative_reference(large, small, prompt, n, max_draft_len,
                                        unsure=lambda z: -torch.logsumexp(z, 0).item() > threshold)  # T = 1


@pytest.mark.parametrize("max_draft_len", [1, 4])
def test_energy_fallback_follows_the_reference_loop(engine, large_model, small_model, max_draft_len):
    policy = BiLD(fallback_signal="energy", fallback_threshold=THRESHOLD, rollback_threshold=0.0,
                  max_draft_len=max_draft_len)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    total_fallbacks = 0
    for p, o in zip(PROMPTS, outs):
        ref, drafted, accepted, fallbacks = _energy_bild_reference(large_model, small_model, p, N, THRESHOLD,
                                                                   max_draft_len)
        assert o.token_ids == ref == hf_greedy(large_model, p, N)
        assert (o.metrics.drafted_tokens, o.metrics.accepted_tokens, o.metrics.fallbacks) == (drafted, accepted,
                                                                                              fallbacks)
        total_fallbacks += fallbacks
    assert total_fallbacks > 0, "the threshold should make the small model fall back sometimes"
    assert_all_free(engine)


def test_energy_threshold_extremes(engine):
    params = SamplingParams(max_tokens=N)
    never = engine.generate(PROMPTS, params, policy=BiLD(fallback_signal="energy", fallback_threshold=100.0,
                                                         max_draft_len=4))
    assert all(o.metrics.fallbacks == 0 and o.metrics.drafted_tokens > 0 for o in never)
    always = engine.generate(PROMPTS, params, policy=BiLD(fallback_signal="energy", fallback_threshold=-100.0,
                                                          max_draft_len=4))
    assert all(o.metrics.drafted_tokens == 0 and o.metrics.fallbacks > 0 for o in always)
    assert_all_free(engine)


def test_default_signal_is_max_prob():
    assert BiLD().fallback_signal == "max_prob" and BiLD().fallback_threshold == 0.6
    assert BiLD() == BiLD(fallback_threshold=0.6)
    assert BiLD(fallback_signal="energy", fallback_threshold=1.5).fallback_threshold == 1.5  # any real number


@pytest.mark.parametrize("bad, match", [
    (dict(fallback_signal="entropy"), "fallback_signal"),
    (dict(fallback_signal="energy"), "explicit fallback_threshold"),
    (dict(fallback_signal="energy", fallback_threshold=float("nan")), "finite real"),
    (dict(fallback_signal="energy", fallback_threshold=float("-inf")), "finite real"),
    (dict(fallback_signal="energy", fallback_threshold="-3"), "finite real"),
    (dict(fallback_signal="energy", fallback_threshold="auto"), "max_prob"),
    (dict(fallback_signal="max_prob", fallback_threshold=-7.0), r"\[0, 1\]"),
    (dict(fallback_threshold=True), r"\[0, 1\]"),
])
def test_bad_signal_parameters_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        BiLD(**bad)

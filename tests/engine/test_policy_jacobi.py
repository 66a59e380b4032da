"""CLLM's Jacobi decoding: exactly the large model's greedy output, with no small model."""
from types import SimpleNamespace

import pytest
import torch

from bild_kernels import Engine, Jacobi, SamplingParams

from .conftest import assert_all_free, hf_greedy

PROMPTS = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 37, 38]]
N = 40  # long enough for the tiny model's greedy output to repeat itself (where Jacobi gains)


@pytest.fixture(scope="module")
def engine(large_model):
    return Engine(large=large_model, small=None, dtype=torch.float64, max_batch_size=3, max_model_len=128,
                  block_size=4)


@pytest.fixture(scope="module")
def oracle(large_model):
    return [hf_greedy(large_model, p, N) for p in PROMPTS]


@torch.no_grad()
def _jacobi_reference(large, policy, prompt, n, seed=0):
    """Jacobi iterations on the HF model with the policy's guesses: (output, passes, accepted guesses)."""
    seq = SimpleNamespace(tokens=list(prompt), prompt_len=len(prompt), guesses=[], iteration=0,
                          params=SimpleNamespace(seed=seed))
    passes = accepted = 0
    while len(seq.tokens) - len(prompt) < n:
        guesses = policy.guess(seq, min(policy.block_size, n - (len(seq.tokens) - len(prompt)) - 1))
        pred = large(torch.tensor([seq.tokens + guesses])).logits[0, len(seq.tokens) - 1:].argmax(-1).tolist()
        a = next((i for i, g in enumerate(guesses) if g != pred[i]), len(guesses))
        seq.tokens += guesses[:a] + [pred[a]]
        seq.guesses = pred[a + 1:]
        seq.iteration += 1
        passes, accepted = passes + 1, accepted + a
    return seq.tokens[len(prompt):], passes, accepted


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_jacobi_matches_hf_greedy(engine, oracle, block_size):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=Jacobi(block_size=block_size))
    assert [o.token_ids for o in outs] == oracle
    for o in outs:
        m = o.metrics
        assert m.generated_tokens == N and m.small_steps == 0
        assert m.large_passes + m.accepted_tokens == N  # each pass commits its accepted guesses plus one token
        assert m.iterations_per_token == m.large_passes / N <= 1.0
    assert_all_free(engine)


def test_jacobi_iterations_follow_the_reference(engine, large_model):
    policy = Jacobi(block_size=8)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    for p, o in zip(PROMPTS, outs):
        ref, passes, accepted = _jacobi_reference(large_model, policy, p, N)
        assert o.token_ids == ref
        assert (o.metrics.large_passes, o.metrics.accepted_tokens) == (passes, accepted)
    # The first prompt's output repeats a token the prompt does not hold: only carried guesses can match it.
    assert not set(outs[0].token_ids) & set(PROMPTS[0])
    assert outs[0].metrics.accepted_tokens > 0 and outs[0].metrics.iterations_per_token < 1.0


def test_batch_composition_does_not_change_iterations(engine):
    policy = Jacobi(block_size=5)
    together = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    alone = [engine.generate([p], SamplingParams(max_tokens=N), policy=policy)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.metrics.large_passes for o in together] == [o.metrics.large_passes for o in alone]


def test_guesses_carry_then_draw_from_the_prompt():
    policy = Jacobi(block_size=6)
    seq = SimpleNamespace(tokens=[11, 12, 13, 50, 51], prompt_len=3, guesses=[7, 8, 9], iteration=4,
                          params=SimpleNamespace(seed=1))
    g = policy.guess(seq, 6)
    assert g[:3] == [7, 8, 9] and len(g) == 6 and set(g[3:]) <= {11, 12, 13}
    assert policy.guess(seq, 2) == [7, 8] and policy.guess(seq, 0) == []
    assert policy.guess(seq, 6) == g  # reproducible: seeded by the request's seed and iteration


def test_sampling_request_is_refused_alone(engine, oracle):
    outs = engine.generate(PROMPTS[:2], [SamplingParams(max_tokens=N), SamplingParams(max_tokens=N, temperature=0.7)],
                           policy=Jacobi(block_size=4))
    assert outs[0].token_ids == oracle[0]
    assert outs[1].finish_reason == "error" and "greedy" in outs[1].error
    assert_all_free(engine)


@pytest.mark.parametrize("bad", [0, 65, -1, 2.0, True])
def test_bad_block_size_raises(bad):
    with pytest.raises(ValueError, match="block_size"):
        Jacobi(block_size=bad)

"""SpeculativeSampling through the whole engine samples the large model's distribution."""
import torch

from bild_kernels import Engine, SamplingParams, SpeculativeSampling

from .conftest import assert_follows_the_large_model, flat_pair


def test_first_token_follows_the_large_model(monkeypatch):
    # Thousands of requests: the kernels' agreement with the reference is tested on their own, so the
    # loop runs on the reference here (under the Triton interpreter it would take many minutes).
    monkeypatch.setenv("BILD_BACKEND", "ref")
    large, small = flat_pair()
    prompt = [3, 5, 7]
    eng = Engine(large=large, small=small, dtype=torch.float64, max_batch_size=64, max_model_len=16, block_size=4)
    n = 4000
    # One seed per request: the same request with the same seed is deterministic by design.
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s) for s in range(n)]
    outs = eng.generate([prompt] * n, params, policy=SpeculativeSampling(max_draft_len=2))
    # The first token comes from the large model's prefill; the second is verified from a draft.
    assert_follows_the_large_model(large, prompt, outs)
    assert sum(o.metrics.drafted_tokens for o in outs) > 0
    assert 0 < sum(o.metrics.accepted_tokens for o in outs) < sum(o.metrics.drafted_tokens for o in outs)

"""SpeculativeSampling through the whole engine samples the large model's distribution."""
import torch

from bild_kernels import Engine, SamplingParams, SpeculativeSampling

from .conftest import tiny_llama


def test_first_token_follows_the_large_model(monkeypatch):
    # Thousands of requests: the kernels' agreement with the reference is tested on their own, so the
    # loop runs on the reference here (under the Triton interpreter it would take many minutes).
    monkeypatch.setenv("BILD_BACKEND", "ref")
    V = 12
    large, small = tiny_llama(11, layers=2, vocab=V), tiny_llama(12, layers=1, vocab=V)
    for m in (large, small):  # flat distributions: every token has real probability mass
        with torch.no_grad():
            m.lm_head.weight.mul_(0.02)
    prompt = [3, 5, 7]
    eng = Engine(large=large, small=small, dtype=torch.float64, max_batch_size=64, max_model_len=16, block_size=4)
    n = 4000
    # One seed per request: the same request with the same seed is deterministic by design.
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s) for s in range(n)]
    outs = eng.generate([prompt] * n, params, policy=SpeculativeSampling(max_draft_len=2))
    with torch.no_grad():
        logits = large(torch.tensor([prompt])).logits[0, -1]
    p = torch.softmax(logits, -1)
    # The first token comes from the large model's prefill; the second is verified from a draft.
    second = {}
    for o in outs:
        second.setdefault(o.token_ids[0], []).append(o.token_ids[1])
    t1, seconds = max(second.items(), key=lambda kv: len(kv[1]))
    with torch.no_grad():
        q = torch.softmax(large(torch.tensor([prompt + [t1]])).logits[0, -1], -1)
    for samples, target in (([o.token_ids[0] for o in outs], p), (seconds, q)):
        emp = torch.bincount(torch.tensor(samples), minlength=V).double() / len(samples)
        tv = 0.5 * (emp - target).abs().sum().item()
        bound = 4 * (V / len(samples)) ** 0.5 / 2  # a few standard errors of the TV estimate
        assert tv < bound, f"total variation {tv:.3f} >= {bound:.3f} over {len(samples)} samples"
    assert sum(o.metrics.drafted_tokens for o in outs) > 0
    assert 0 < sum(o.metrics.accepted_tokens for o in outs) < sum(o.metrics.drafted_tokens for o in outs)

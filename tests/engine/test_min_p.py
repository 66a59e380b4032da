"""min-p through the engine: with min_p = 1 every sampling policy decodes the large model's greedy text (only the
most likely token survives), SpeculativeSampling with min-p samples the large model's min-p-filtered distribution
(Hugging Face's MinPLogitsWarper's), and SamplingParams refuses a min_p outside [0, 1]."""
import pytest
import torch

from bild_kernels import BiLD, LargeOnly, SamplingParams, SpeculativeSampling

from .conftest import assert_all_free, assert_follows_the_large_model, flat_pair, hf_greedy, tiny_engine


def test_min_p_one_decodes_greedily(large_model, small_model):
    """temperature 1 with min_p = 1 keeps only the argmax at every sampled position (drafts and the large model's
    own tokens): LargeOnly and SpeculativeSampling give HF's greedy text, and BiLD gives what it gives greedy."""
    eng = tiny_engine(large_model, small_model)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    n = 12
    want = [hf_greedy(large_model, p, n) for p in prompts]
    hot = [SamplingParams(max_tokens=n, temperature=1.0, min_p=1.0, seed=s) for s in range(len(prompts))]
    greedy = SamplingParams(max_tokens=n)
    for policy in (LargeOnly(), SpeculativeSampling(max_draft_len=3)):
        assert [o.token_ids for o in eng.generate(prompts, hot, policy=policy)] == want, policy
    bild = BiLD(fallback_threshold=0.3, rollback_threshold=1.0, max_draft_len=4)
    outs = eng.generate(prompts, hot, policy=bild)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eng.generate(prompts, greedy, policy=bild)]
    assert sum(o.metrics.accepted_tokens for o in outs) > 0
    # and a min_p that cuts nothing changes nothing: the same seeds sample the same text as without it
    warm = [SamplingParams(max_tokens=n, temperature=0.8, seed=s) for s in range(len(prompts))]
    tiny = [SamplingParams(max_tokens=n, temperature=0.8, seed=s, min_p=1e-30) for s in range(len(prompts))]
    for policy in (LargeOnly(), SpeculativeSampling(max_draft_len=3)):
        assert ([o.token_ids for o in eng.generate(prompts, tiny, policy=policy)]
                == [o.token_ids for o in eng.generate(prompts, warm, policy=policy)])
    assert_all_free(eng)


def test_speculative_sampling_follows_the_min_p_distribution(monkeypatch):
    """Thousands of requests with min-p cutting about half the vocabulary: the first two tokens follow the large
    model's min-p-filtered distribution, as Hugging Face's MinPLogitsWarper filters it (the loop runs on the
    reference backend, whose agreement with the kernels is tested on its own)."""
    from transformers.generation.logits_process import MinPLogitsWarper
    monkeypatch.setenv("BILD_BACKEND", "ref")
    large, small = flat_pair()
    prompt = [3, 5, 7]
    with torch.no_grad():
        z = large(torch.tensor([prompt])).logits[0, -1]
    ratio = torch.exp(z - z.max()).sort(descending=True).values
    min_p = float((ratio[4] + ratio[5]) / 2)  # keeps the 5 most likely first tokens of 12
    eng = tiny_engine(large, small, max_batch_size=64, max_model_len=16)
    n = 3000
    params = [SamplingParams(max_tokens=3, temperature=1.0, min_p=min_p, seed=s) for s in range(n)]
    outs = eng.generate([prompt] * n, params, policy=SpeculativeSampling(max_draft_len=2))
    assert len({o.token_ids[0] for o in outs}) == 5
    assert_follows_the_large_model(large, prompt, outs, warp=lambda x: MinPLogitsWarper(min_p)(None, x.clone()))
    assert 0 < sum(o.metrics.accepted_tokens for o in outs) < sum(o.metrics.drafted_tokens for o in outs)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.1", True, None])
def test_sampling_params_refuse_bad_min_p(bad):
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=bad)

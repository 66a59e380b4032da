"""SamplingParams.logits_processors (vLLM's): the user's functions on the large model's logits at every verified
position, the drafts before it as output. Every lossless policy gives Hugging Face's greedy text under the same
processing; sampling keeps to it; a processor that fails, fails its request alone."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bild_kernels import BiLD, Greedy, SamplingParams, SmallOnly, SpeculativeSampling

from .conftest import assert_all_free, tiny_engine
from .test_structured_outputs import IDS, LOSSLESS, PROMPTS



def no_repeat_of_last(output_ids, logits):
    """Never the token just emitted, and a push toward ids near the last one (depends on the history)."""
    out = logits.clone()
    if output_ids:
        out[output_ids[-1]] = float("-inf")
        out[(output_ids[-1] + 1) % out.shape[0]] += 3.0
    return out


def same_parity_as_prompt(prompt_ids, output_ids, logits):
    """The three-argument kind: only ids of the prompt's first token's parity, none >= 90."""
    out = logits.clone()
    out[(prompt_ids[0] + 1) % 2::2] = float("-inf")
    out[90:] = float("-inf")
    return out


class Reference(LogitsProcessor):
    def __init__(self, prompt, fns):
        self.prompt, self.fns = prompt, fns

    def __call__(self, input_ids, scores):
        output = input_ids[0, len(self.prompt):].tolist()
        row = scores[0]
        for fn in self.fns:
            row = fn(self.prompt, output, row) if fn is same_parity_as_prompt else fn(output, row)
        return row[None]


def hf_processed_greedy(model, prompt, n, fns):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0,
                             logits_processor=LogitsProcessorList([Reference(prompt, fns)]))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return tiny_engine(large_model, small_model, max_batch_size=4)


@pytest.mark.parametrize("policy", LOSSLESS, ids=IDS)
def test_lossless_policies_give_hf_greedy_under_the_same_processors(engine, large_model, policy):
    for fns in ([no_repeat_of_last], [same_parity_as_prompt, no_repeat_of_last]):
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=14, logits_processors=fns), policy=policy)
        for p, o in zip(PROMPTS, outs):
            assert o.error is None and o.token_ids == hf_processed_greedy(large_model, p, 14, fns)
    assert_all_free(engine)


def test_sampling_keeps_to_the_processed_distribution(engine):
    for policy in (SpeculativeSampling(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=2.0,
                                                               max_draft_len=4)):
        params = [SamplingParams(max_tokens=20, temperature=1.0, seed=s, logits_processors=[same_parity_as_prompt])
                  for s in range(6)]
        outs = engine.generate([[5, 17, 3]] * 6, params, policy=policy)
        for o in outs:  # (the prompt starts odd: odd ids only, none >= 90)
            assert o.error is None and all(t % 2 == 1 and t < 90 for t in o.token_ids)
        assert len({tuple(o.token_ids) for o in outs}) > 1
    assert_all_free(engine)


def test_a_failing_processor_fails_its_request_alone(engine, large_model):
    calls = []

    def flaky(output_ids, logits):
        calls.append(len(output_ids))
        if len(output_ids) >= 3:
            raise RuntimeError("out of ideas")
        return logits

    def wrong_shape(output_ids, logits):
        return logits[:5]

    params = [SamplingParams(max_tokens=10, logits_processors=[flaky]), SamplingParams(max_tokens=10),
              SamplingParams(max_tokens=10, logits_processors=[wrong_shape])]
    outs = engine.generate([[5, 17, 3], [8], [33, 34, 35]], params, policy=Greedy(max_draft_len=3))
    assert "a logits processor failed: RuntimeError: out of ideas" in outs[0].error
    assert outs[0].finish_reason == "error" and len(outs[0].token_ids) < 10
    assert outs[1].error is None and outs[1].token_ids == hf_processed_greedy(large_model, [8], 10, [])
    assert "not a logits row of shape (97,)" in outs[2].error and outs[2].token_ids == []
    assert_all_free(engine)


def test_bad_processors_are_refused_by_name(engine):
    with pytest.raises(ValueError, match="logits_processors must be callables"):
        SamplingParams(logits_processors=[3])
    with pytest.raises(ValueError, match="takes 1 arguments"):
        SamplingParams(logits_processors=[lambda logits: logits])
    assert SamplingParams(logits_processors=no_repeat_of_last).logits_processors == (no_repeat_of_last,)
    out = engine.generate([[1, 2]], SamplingParams(max_tokens=4, logits_processors=[no_repeat_of_last]),
                          policy=SmallOnly())[0]
    assert "logits_processors act on the large model's distribution" in out.error
    assert_all_free(engine)

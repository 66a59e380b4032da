"""SamplingParams.allowed_token_ids and bad_words (vLLM's): the large model's distribution masked to the allowed ids,
without the last token of a bad word where the output ends with the rest of it. Every lossless policy gives Hugging
Face's greedy text under the same masks; sampling keeps to them; bad input is refused by name."""
import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams, SmallOnly, SpeculativeSampling
from bild_kernels.engine.guiding import bad_word_ids
from bild_kernels.structured.guide import Guide, TokenRules

from .conftest import assert_all_free, word_tokenizer
from .test_structured_outputs import IDS, LOSSLESS, PROMPTS

WORDS = [f"w{i}" for i in range(97)]


def _allowed(bits) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")).tolist())


def test_token_rules_mask_by_the_outputs_last_tokens():
    rules = TokenRules(40, allowed=range(10), bad=[(3,), (5, 6), (1, 2, 7), (30,)])
    assert _allowed(rules.mask(())) == set(range(10)) - {3}
    assert _allowed(rules.mask((5,))) == set(range(10)) - {3, 6}
    assert _allowed(rules.mask((1, 2))) == set(range(10)) - {3, 7}
    assert _allowed(rules.mask((9, 2))) == set(range(10)) - {3}
    assert rules.step(rules.step(rules.step((), 1), 2), 4) == (2, 4)  # (the two tokens before a 3-token word's last)
    tight = TokenRules(40, allowed=[3, 6], bad=[(3,), (4, 6)])  # the bad words would leave nothing: they give way
    assert _allowed(tight.mask(())) == {6} and _allowed(tight.mask((4,))) == {3, 6}
    guide = Guide(None, {39}, rules)  # rules alone: the end id only where listed as allowed
    masks = guide.masks_along([5, 6], 3)
    assert _allowed(masks[0]) == set(range(10)) - {3} and _allowed(masks[1]) == set(range(10)) - {3, 6}
    assert (masks[2] == -1).all()  # (after the token the rules do not allow: left open, the verification cuts there)
    assert guide.allowed_prefix([5, 6]) == 1 and guide.allowed_prefix([5, 9, 0]) == 3


def test_rules_beside_a_grammar_mask_both_and_end_where_nothing_is_left():
    from bild_kernels.structured import compile_regex
    from bild_kernels.structured.guide import Grammar, Vocabulary
    texts = ["a", "b", "ab", "abc", "1", "12", None]  # id 6: the end-of-sequence token
    grammar = Grammar(compile_regex(r"[ab]+1?"), Vocabulary(texts))
    guide = Guide(grammar, {6}, TokenRules(7, allowed=[0, 1, 2, 4, 6], bad=[(1,), (0, 4)]))
    assert _allowed(guide.mask(guide.state)) == {0, 2}  # "a", "ab" ("b" is a bad word, "abc" not allowed)
    guide.advance([0])
    assert _allowed(guide.mask(guide.state)) == {0, 2, 6}  # after "a": no "1" (bad after "a"), the end may come
    guide.advance([2, 4])  # "ab1": the pattern is done; nothing but the end is left
    assert _allowed(guide.mask(guide.state)) == {6}


class RulesMask(LogitsProcessor):
    """The rules one token at a time over the output tokens (not the prompt's, as vLLM's): a reference."""

    def __init__(self, prompt_len, allowed, bad):
        self.prompt_len, self.allowed, self.bad = prompt_len, allowed, bad

    def __call__(self, input_ids, scores):
        out = input_ids[0, self.prompt_len:].tolist()
        mask = torch.full_like(scores, float("-inf"))
        ok = set(range(scores.shape[-1])) if self.allowed is None else set(self.allowed)
        banned = {w[-1] for w in self.bad if len(out) >= len(w) - 1 and tuple(out[len(out) - len(w) + 1:]) == w[:-1]}
        if ok - banned:
            ok -= banned
        mask[:, sorted(ok)] = 0
        return scores + mask


def hf_masked_greedy(model, prompt, n, allowed=None, bad=()):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0,
                             logits_processor=LogitsProcessorList([RulesMask(len(prompt), allowed, bad)]))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return Engine(large=large_model, small=small_model, tokenizer=word_tokenizer(WORDS), dtype=torch.float64,
                  max_model_len=64, block_size=4)




@pytest.mark.parametrize("policy", LOSSLESS, ids=IDS)
def test_lossless_policies_give_hf_greedy_under_the_same_rules(engine, large_model, policy):
    allowed = list(range(0, 97, 2)) + [7, 13]
    free = engine.generate(PROMPTS, SamplingParams(max_tokens=16), policy=LargeOnly())
    # ban words the unmasked text holds: a single token and two-token words
    common = [o.token_ids for o in free]
    words = ["w" + str(common[0][1]), f"w{common[1][2]} w{common[1][3]}", f"w{common[2][0]} w{common[2][1]}"]
    bad = bad_word_ids(engine.tokenizer, words)
    assert bad == [(common[0][1],), tuple(common[1][2:4]), tuple(common[2][0:2])]
    for params, a, b in ((SamplingParams(max_tokens=16, allowed_token_ids=allowed), allowed, ()),
                         (SamplingParams(max_tokens=16, bad_words=words), None, bad),
                         (SamplingParams(max_tokens=16, allowed_token_ids=allowed, bad_words=words), allowed, bad)):
        outs = engine.generate(PROMPTS, params, policy=policy)
        for p, o in zip(PROMPTS, outs):
            assert o.error is None and o.token_ids == hf_masked_greedy(large_model, p, 16, a, b)
    assert_all_free(engine)


def test_sampling_keeps_to_the_rules(engine):
    allowed = [1, 4, 9, 16, 25, 36, 49, 64, 81]
    words = ["w4 w9", "w16"]
    for policy in (SpeculativeSampling(max_draft_len=3), LargeOnly(),
                   BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4)):
        params = [SamplingParams(max_tokens=24, temperature=1.0, seed=s, allowed_token_ids=allowed, bad_words=words)
                  for s in range(6)]
        outs = engine.generate([[5, 17, 3]] * 6, params, policy=policy)
        for o in outs:
            assert o.error is None and set(o.token_ids) <= set(allowed) - {16}
            assert all(o.token_ids[i:i + 2] != [4, 9] for i in range(len(o.token_ids)))
        assert len({tuple(o.token_ids) for o in outs}) > 1  # (sampled: the seeds differ)
    assert_all_free(engine)


def test_bad_rules_are_refused_by_name(engine, large_model):
    with pytest.raises(ValueError, match="allowed_token_ids must be None or a non-empty list"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="allowed_token_ids must be"):
        SamplingParams(allowed_token_ids=[1, -2])
    with pytest.raises(ValueError, match="bad_words must be a list of non-empty strings"):
        SamplingParams(bad_words=["ok", 3])
    assert SamplingParams(bad_words="w1").bad_words == ("w1",)
    outs = engine.generate([[1, 2], [1, 2], [1, 2]], [SamplingParams(max_tokens=4, allowed_token_ids=[3, 500]),
                                                     SamplingParams(max_tokens=4, bad_words=["w3"]),
                                                     SamplingParams(max_tokens=4, allowed_token_ids=[3])],
                           policy=Greedy())
    assert "allowed_token_ids names token id 500" in outs[0].error
    assert outs[1].error is None and 3 not in outs[1].token_ids
    assert outs[2].error is None and outs[2].token_ids == [3, 3, 3, 3]
    small = engine.generate([[1, 2]], SamplingParams(max_tokens=4, bad_words=["w3"]), policy=SmallOnly())[0]
    assert "allowed_token_ids and bad_words mask the large model's distribution" in small.error
    bare = Engine(large=large_model, dtype=torch.float64, max_model_len=32)  # no tokenizer: no words to find
    out = bare.generate([[1, 2]], SamplingParams(max_tokens=4, bad_words=["w3"]), policy=LargeOnly())[0]
    assert "bad_words need the engine's tokenizer" in out.error
    assert_all_free(engine)

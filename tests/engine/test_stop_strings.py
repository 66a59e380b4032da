"""Stop strings end the text where they begin, at the character (vLLM's and OpenAI's rule: the stop string is not
returned), while the token ids end with the token that completed it; a stream holds back a tail that could be a
stop string's start, so its chunks add up to the final text; a stop string wins over a length limit reached in the
same step."""
import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, Jacobi, LargeOnly, NGram, SamplingParams, ShallowDeep

from .conftest import assert_all_free, word_tokenizer

N = 16
PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    words = [f"w{i}" for i in range(large_model.config.vocab_size - 1)]
    return Engine(large=large_model, small=small_model, tokenizer=word_tokenizer(words), dtype=torch.float64,
                  max_batch_size=2, max_model_len=64, block_size=4)


@pytest.fixture(scope="module")
def plain(engine):
    return engine.generate([PROMPT], SamplingParams(max_tokens=N), policy=LargeOnly())[0]


def _cases(plain):
    """Stop strings cut out of the plain text: inside one token, across two (the end of one word, the space and the
    start of the next), and a whole word; with the token that completes each."""
    text = plain.text
    words = text.split(" ")
    out = []
    for k in (3, 6, 9):
        w, nxt = words[k], words[k + 1]
        for stop in (w[1:], w[-1] + " " + nxt[:2], w):
            out.append((stop, text.find(stop)))  # the earliest occurrence ends the text
    return out


@pytest.mark.parametrize("policy", [LargeOnly(), Greedy(max_draft_len=3)])
def test_the_text_ends_where_the_stop_string_begins(engine, plain, policy):
    ids = plain.token_ids
    for stop, first in _cases(plain):
        out = engine.generate([PROMPT], SamplingParams(max_tokens=N, stop=(stop,)), policy=policy)[0]
        assert out.finish_reason == "stop" and out.text == plain.text[:first], stop
        # the ids: the plain ones up to the first whose text completes the stop string
        n = next(n for n in range(1, len(ids) + 1) if stop in engine.tokenizer.decode(ids[:n]))
        assert out.token_ids == ids[:n], stop
    assert_all_free(engine)


def test_a_stream_adds_up_to_the_final_text(engine, plain):
    for stop, first in _cases(plain):
        chunks = list(engine.stream(PROMPT, SamplingParams(max_tokens=N, stop=(stop,)), policy=Greedy(max_draft_len=2)))
        assert "".join(c.text for c in chunks) == chunks[-1].output.text == plain.text[:first], stop
    # a held-back tail that turns out not to be a stop string is sent (here a stop string that never completes)
    never = plain.text.split(" ")[4] + " w999"
    chunks = list(engine.stream(PROMPT, SamplingParams(max_tokens=N, stop=(never,)), policy=LargeOnly()))
    assert "".join(c.text for c in chunks) == chunks[-1].output.text == plain.text
    assert chunks[-1].finish_reason == "length"


def test_a_stop_string_completed_by_the_last_allowed_token_still_stops(engine, plain):
    last = plain.text.split(" ")[N - 1]
    out = engine.generate([PROMPT], SamplingParams(max_tokens=N, stop=(last,)), policy=LargeOnly())[0]
    first = plain.text.find(last)
    assert out.finish_reason == "stop" and out.text == plain.text[:first]


def test_a_cancelled_stream_sends_what_it_held_back(engine, plain):
    """A request that ends early (here: cancelled) sends the tail it held back with its last chunk."""
    stop = plain.text.split(" ")[0] + " zzz"  # the first word is this stop string's start: held back
    stream = engine.stream(PROMPT, SamplingParams(max_tokens=N, stop=(stop,)), policy=LargeOnly())
    first = next(stream)
    assert first.token_ids and first.text == ""
    assert engine.cancel(first.request_id)
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert "".join(c.text for c in [first, *rest]) == rest[-1].output.text == plain.text.split(" ")[0]
    assert_all_free(engine)


def test_include_stop_str_in_output_and_skip_special_tokens(engine, plain):
    for stop, first in _cases(plain):
        out = engine.generate([PROMPT], SamplingParams(max_tokens=N, stop=(stop,), include_stop_str_in_output=True),
                              policy=LargeOnly())[0]
        assert out.finish_reason == "stop" and out.text == plain.text[:first + len(stop)], stop
        chunks = list(engine.stream(PROMPT, SamplingParams(max_tokens=N, stop=(stop,), include_stop_str_in_output=True),
                                    policy=LargeOnly()))
        assert "".join(c.text for c in chunks) == out.text
    # a special token (here the word tokenizer's <unk>, the last id) shows in the text only when asked
    unk = engine.vocab_size - 1
    ids = [PROMPT + [unk]]
    bias = {unk: 100.0}  # the first output token is <unk>
    skipped = engine.generate(ids, SamplingParams(max_tokens=3, logit_bias=bias), policy=LargeOnly())[0]
    shown = engine.generate(ids, SamplingParams(max_tokens=3, logit_bias=bias, skip_special_tokens=False),
                            policy=LargeOnly())[0]
    assert skipped.token_ids == shown.token_ids and skipped.token_ids[0] == unk
    assert "<unk>" in shown.text and "<unk>" not in skipped.text
    for name in ("include_stop_str_in_output", "skip_special_tokens"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: 1})


@pytest.mark.parametrize("policy", [LargeOnly(), Greedy(max_draft_len=3), BiLD(0.3, 0.0, 4), Jacobi(block_size=4),
                                    NGram(max_draft_len=3), ShallowDeep(exit_layer=1, rollback_threshold=0.0)])
def test_the_token_that_ended_a_request_is_not_in_its_text(engine, plain, policy):
    """A stop id (here an ordinary word) or EOS shown as text (skip_special_tokens off) ends the request and is its last
    token id, but not part of its text, whole or streamed, unless include_stop_str_in_output (vLLM's rule: a parser
    then reads the reply without the end-of-sequence marker)."""
    k = 5
    stop_id = plain.token_ids[k]
    first = plain.token_ids.index(stop_id)
    before = engine.tokenizer.decode(plain.token_ids[:first])
    for params, want in [(SamplingParams(max_tokens=N, stop=(stop_id,)), before),
                         (SamplingParams(max_tokens=N, stop=(stop_id,), include_stop_str_in_output=True),
                          engine.tokenizer.decode(plain.token_ids[:first + 1]))]:
        out = engine.generate([PROMPT], params, policy=policy)[0]
        assert out.token_ids == plain.token_ids[:first + 1] and out.finish_reason == "stop"
        assert out.text == want
        chunks = list(engine.stream(PROMPT, params, policy=policy))
        assert "".join(c.text for c in chunks) == out.text == chunks[-1].output.text
    eos = engine.vocab_size - 1  # (the word tokenizer's last id, a special token: an EOS biased to come third)
    saved = engine.eos_ids
    engine.eos_ids = {eos}
    try:
        bias = SamplingParams(max_tokens=N, logit_bias={eos: 100.0}, min_tokens=2, skip_special_tokens=False)
        out = engine.generate([PROMPT], bias, policy=policy)[0]
        assert out.token_ids[-1] == eos and len(out.token_ids) == 3 and out.finish_reason == "eos"
        assert out.text == engine.tokenizer.decode(out.token_ids[:-1])
        shown = engine.generate([PROMPT], SamplingParams(max_tokens=N, logit_bias={eos: 100.0}, min_tokens=2,
                                                         skip_special_tokens=False, include_stop_str_in_output=True),
                                policy=policy)[0]
        assert shown.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=False) != out.text
    finally:
        engine.eos_ids = saved
    assert_all_free(engine)

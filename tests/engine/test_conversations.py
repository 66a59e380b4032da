"""Prompts given as chat messages: put through the tokenizer's chat template, one per request, with a clear error for
a conversation the template cannot take (the batch's other requests complete)."""
import pytest
import torch

from bild_kernels import Engine, Greedy, SamplingParams

from .conftest import assert_all_free, hf_greedy, word_tokenizer

WORDS = [f"w{i}" for i in range(89)] + ["tool", "turn", "system", "user", "assistant", "endturn"]
TEMPLATE = ("{% for m in messages %}turn {{ m['role'] }} {{ m['content'] }} endturn {% endfor %}"
            "{% if add_generation_prompt %}turn assistant{% endif %}")
CHAT = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w1 w2 w3"}]


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    tok = word_tokenizer(WORDS)
    tok.chat_template = TEMPLATE
    return Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=3, max_model_len=64,
                  block_size=4, tokenizer=tok)


def test_a_conversation_is_its_chat_template_s_tokens(engine, large_model):
    ids = [90, 91, 5, 6, 94, 90, 92, 1, 2, 3, 94, 90, 93]
    assert engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"] == ids
    one = engine.generate(CHAT, SamplingParams(max_tokens=8), policy=Greedy(max_draft_len=3))
    assert len(one) == 1 and one[0].prompt_token_ids == ids and one[0].token_ids == hf_greedy(large_model, ids, 8)
    # a string with chat_template=True is one user turn
    user = engine.generate(["w1 w2 w3"], SamplingParams(max_tokens=8), chat_template=True)[0]
    assert user.prompt_token_ids == engine.generate([CHAT[1:]], SamplingParams(max_tokens=8))[0].prompt_token_ids
    chunks = list(engine.stream(CHAT, SamplingParams(max_tokens=8), policy=Greedy(max_draft_len=3)))
    assert chunks[-1].output.token_ids == one[0].token_ids
    assert_all_free(engine)


@pytest.mark.parametrize("bad, match", [
    ([{"role": "robot", "content": "w1"}], "message 0 must be"),
    ([{"role": "user", "content": "w1"}, {"role": "user", "content": 7}], "message 1 must be"),
    ([{"role": "user", "content": "w1", "colour": "x"}], "message 0 must be"),
    ([{"role": "user", "content": None}], "message 0 must be"),  # (None only beside an assistant's tool calls)
    ([{"role": "user", "content": "w1", "tool_call_id": "c1"}], "message 0 must be"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}],
     "message 0 must be"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "message 0 must be"),
    ([{"role": "user"}], "message 0 must be"),
])
def test_a_bad_conversation_fails_that_request_only(engine, large_model, bad, match):
    outs = engine.generate([bad, CHAT], SamplingParams(max_tokens=6))
    assert outs[0].finish_reason == "error" and match in outs[0].error and outs[0].error.startswith("prompt 0: ")
    assert outs[1].error is None and len(outs[1].token_ids) == 6
    assert_all_free(engine)


def test_a_tool_calling_conversation_reaches_the_template(large_model):
    """OpenAI's agent turns: an assistant message of tool calls (content None, arguments as JSON text) and the tool's
    reply; the template sees the calls' arguments as objects (as Hugging Face's templates read them)."""
    tok = word_tokenizer(WORDS)
    tok.chat_template = ("{% for m in messages %}turn {{ m['role'] }} {% if m['tool_calls'] %}"
                         "{% for c in m['tool_calls'] %}{{ c['function']['name'] }} "
                         "{{ c['function']['arguments']['a'] }} {% endfor %}{% else %}{{ m['content'] }} {% endif %}endturn {% endfor %}"
                         "{% if add_generation_prompt %}turn assistant{% endif %}")
    eng = Engine(large=large_model, dtype=torch.float64, max_model_len=64, block_size=4, tokenizer=tok)
    conv = [{"role": "user", "content": "w1 w2"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call-1", "type": "function", "function": {"name": "w7", "arguments": '{"a": "w8"}'}}]},
            {"role": "tool", "tool_call_id": "call-1", "name": "w7", "content": "w9"}]
    out = eng.generate([conv], SamplingParams(max_tokens=3))[0]
    assert out.error is None
    assert eng.tokenizer.decode(out.prompt_token_ids) == ("turn user w1 w2 endturn turn assistant w7 w8 endturn "
                                                           "turn tool w9 endturn turn assistant")
    assert conv[1]["tool_calls"][0]["function"]["arguments"] == '{"a": "w8"}'  # (the caller's messages untouched)


def test_a_template_that_raises_is_a_clear_error(large_model, small_model):
    tok = word_tokenizer(WORDS)
    tok.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}w1"
    eng = Engine(large=large_model, dtype=torch.float64, max_batch_size=2, max_model_len=64, block_size=4,
                 tokenizer=tok)
    out = eng.generate([CHAT, CHAT[1:]], SamplingParams(max_tokens=3))
    assert out[0].finish_reason == "error" and "the chat template refused these messages" in out[0].error
    assert "user first" in out[0].error and len(out[1].token_ids) == 3


def test_no_chat_template_no_conversations(large_model):
    eng = Engine(large=large_model, dtype=torch.float64, max_batch_size=2, max_model_len=64, block_size=4,
                 tokenizer=word_tokenizer(WORDS))
    out = eng.generate(CHAT, SamplingParams(max_tokens=3))[0]
    assert out.finish_reason == "error" and "needs a chat template" in out.error
    ids = Engine(large=large_model, dtype=torch.float64, max_batch_size=2, max_model_len=64, block_size=4)
    assert "needs a chat template" in ids.generate(CHAT, SamplingParams(max_tokens=3))[0].error  # no tokenizer at all


def test_tokenize_gives_what_generate_runs(engine, large_model):
    assert engine.tokenize(CHAT) == engine.generate(CHAT, SamplingParams(max_tokens=1))[0].prompt_token_ids
    plain = engine.generate(["w1 w2 w3"], SamplingParams(max_tokens=1))[0]
    assert engine.tokenize("w1 w2 w3") == plain.prompt_token_ids
    assert engine.tokenize("w1 w2", add_special_tokens=False) == [1, 2]
    assert engine.detokenize([1, 2, 90]) == engine.tokenizer.decode([1, 2, 90])
    with pytest.raises(ValueError, match="message 0 must be"):
        engine.tokenize([{"role": "robot", "content": "w1"}])
    with pytest.raises(ValueError, match="takes a string or a list of chat messages"):
        engine.tokenize(7)
    with pytest.raises(ValueError, match=r"token ids must be ints in \[0, 97\)"):
        engine.detokenize([1, 97])
    bare = Engine(large=large_model, dtype=torch.float64, max_batch_size=1, max_model_len=16, block_size=4)
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.tokenize("w1")

"""tool_choice "auto" through a model, in each of --tool-call-parser's formats: a tiny pair whose token names make the
large model's greedy reply a tool call written as Mistral, Llama 3, Granite or Hermes write theirs (special tokens
where the real tokenizers have them), and Hermes' after a reasoning model's thinking, served whole, streamed, and on
the Responses API, under lossless and BiLD policies."""
import importlib
import json
import threading

import pytest
import torch

from .engine.conftest import shallow_copy, tiny_llama
from .test_serve import _all_free, _post
from .test_serve_responses import _events

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}

# parser: (the reply's pieces, one token each; those that are special tokens; its content; its calls)
# ("hermes+qwen3": Hermes' calls after a thinking that --reasoning-parser qwen3 puts apart)
FORMATS = {
    "mistral": (["ok", "[TOOL_CALLS]", '[{"name": "', "weather", '", "arguments": {"city": "', "oslo", '"}}]'],
                ["[TOOL_CALLS]"], "ok", [("weather", '{"city": "oslo"}')]),
    "llama3_json": (["<|python_tag|>", '{"name": "', "clock", '", "parameters": {"zone": "', "utc", '"}}'],
                    ["<|python_tag|>"], None, [("clock", '{"zone": "utc"}')]),
    "hermes": (["ok", "<tool_call>", '{"name": "', "clock", '", "arguments": {"zone": "', "utc", '"}}',
                "</tool_call>"], [], "ok", [("clock", '{"zone": "utc"}')]),
    "granite": (["<|tool_call|>", '[{"name": "', "clock", '", "arguments": {"zone": "', "utc", '"}}]'],
                ["<|tool_call|>"], None, [("clock", '{"zone": "utc"}')]),
    "hermes+qwen3": (["<think>", "hm", "</think>", "<tool_call>", '{"name": "', "weather", '", "arguments": {}}',
                      "</tool_call>"], [], None, [("weather", "{}")]),
}
POLICIES = [{"name": "large-only"}, {"name": "greedy", "max_draft_len": 3},
            {"name": "bild", "fallback_threshold": 0.3, "rollback_threshold": 0.0}]


def _renamed_pair(pieces: list[str], specials: list[str]):
    """A tiny pair and a word tokenizer in which the large model's greedy reply to a prompt is `pieces`, then EOS:
    the reply's ids are named after them (each id once in the reply, none in the prompt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bild_kernels import Engine, LargeOnly, SamplingParams
    V, n = 64, len(pieces) + 1
    large = tiny_llama(31, layers=3, vocab=V)
    small = shallow_copy(large, layers=2, noise=0.3)
    plain = Engine(large=large, small=small, dtype=torch.float64, max_model_len=64, block_size=4)
    for prompt in ([a, b, c] for a in range(1, 9) for b in range(9, 20) for c in range(20, 30)):
        ids = plain.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True), policy=LargeOnly())[0].token_ids
        if len(set(ids)) == n and not set(ids) & set(prompt):
            break
    else:
        pytest.fail(f"no prompt whose greedy reply has {n} different ids")
    words = [f"a{i}" for i in range(V)]
    for t, w in zip(ids, pieces + ["</s>"]):
        words[t] = w
    words[next(t for t in range(V) if t not in ids + prompt)] = "<unk>"
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.Fuse()  # (each token's text as it is)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>",
                                  additional_special_tokens=specials)
    assert [tok.convert_tokens_to_ids(s) for s in specials] == [ids[pieces.index(s)] for s in specials]
    large.config.eos_token_id = small.config.eos_token_id = ids[-1]
    tok.chat_template = "{{ messages[-1]['content'] }}"
    engine = Engine(large=large, small=small, tokenizer=tok, dtype=torch.float64, max_model_len=64, block_size=4)
    return engine, " ".join(words[t] for t in prompt)


@pytest.fixture(scope="module", params=list(FORMATS))
def tool_server(programs, request):
    pieces, specials, content, calls = FORMATS[request.param]
    engine, prompt = _renamed_pair(pieces, specials)
    parser, _, reasoning = request.param.partition("+")
    srv = programs["serve"].make_server(engine, port=0, max_pending=16, tool_call_parser=parser,
                                        reasoning_parser=reasoning or None)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, prompt, content, calls
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("policy", POLICIES)
def test_the_calls_a_model_writes_in_its_format_are_read(tool_server, policy):
    """The reply is the format's call (and content before it where the format has some): message.tool_calls holds
    it, finish_reason "tool_calls"; streamed, the deltas join to the same; as a Responses API function_call item; and
    without tools the same reply is plain text."""
    srv, prompt, content, calls = tool_server
    base = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 20, "tools": [WEATHER, CLOCK],
            "policy": policy}
    thinking = "hm" if srv.service.reasoning_parser else None
    code, r = _post(srv, "/v1/chat/completions", base)
    assert code == 200, r
    msg = r["choices"][0]["message"]
    assert (msg["content"] or None) == content and r["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == calls
    assert all(c["type"] == "function" and c["id"] for c in msg["tool_calls"])
    assert msg.get("reasoning_content") == thinking

    code, events = _post(srv, "/v1/chat/completions", {**base, "stream": True})
    assert code == 200, events
    deltas = [e["choices"][0]["delta"] for e in events]
    from .test_serve import joined_calls
    assert [(n, a) for _, n, a in joined_calls(deltas)] == calls
    assert ("".join(d.get("content") or "" for d in deltas).strip() or None) == content
    assert ("".join(d.get("reasoning_content") or "" for d in deltas) or None) == thinking
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

    body = {"input": prompt, "max_output_tokens": 20, "policy": policy,
            "tools": [{"type": "function", **t["function"]} for t in (WEATHER, CLOCK)]}
    code, resp = _post(srv, "/v1/responses", body)
    assert code == 200, resp
    items = [(it["name"], it["arguments"]) for it in resp["output"] if it["type"] == "function_call"]
    assert items == calls
    thoughts = [it["content"][0]["text"] for it in resp["output"] if it["type"] == "reasoning"]
    assert thoughts == ([thinking] if thinking else [])
    done = _events(srv, body)[-1][1]["response"]["output"]
    assert [(it["name"], it["arguments"]) for it in done if it["type"] == "function_call"] == calls
    # the output text's logprobs are those of the content before the call (none where there is no content)
    code, resp = _post(srv, "/v1/responses", {**body, "top_logprobs": 1})
    events = _events(srv, {**body, "top_logprobs": 1})
    for output in (resp["output"], events[-1][1]["response"]["output"]):
        lps = [p["logprobs"] for it in output if it["type"] == "message" for p in it["content"]]
        if content is None:  # (no message item)
            assert lps == []
        else:
            assert len(lps) == 1 and "".join(e["token"] for e in lps[0]) == content

    code, plain = _post(srv, "/v1/chat/completions", {k: v for k, v in base.items() if k != "tools"})
    assert code == 200 and "tool_calls" not in plain["choices"][0]["message"]
    assert plain["choices"][0]["finish_reason"] == "stop"
    _all_free(srv.service.engine)


def test_the_reply_s_text_is_what_the_parser_reads(tool_server):
    """The completion's own text (special tokens kept where the format's parser needs them) parses to the calls."""
    srv, prompt, content, calls = tool_server
    svc = srv.service
    tools = importlib.import_module("tool_calls")
    params = svc.parse({"messages": [{"role": "user", "content": prompt}], "max_tokens": 20,
                        "tools": [WEATHER, CLOCK]}, "chat")[1]
    out = svc.engine.generate([svc.engine.tokenize([{"role": "user", "content": prompt}])], params)[0]
    text = out.text.split("</think>")[-1]  # (the answer after the thinking, where there is one)
    assert tools.parse_tool_calls(text, ["weather", "clock"], svc.tool_call_parser) == (content, calls)
    assert isinstance(json.loads(calls[0][1]), dict)

"""python/serve.py's POST /v1/responses (OpenAI's Responses API, python/responses_api.py): the same tokens as the chat
request it asks for, whole and as typed stream events; input items, function tools and text formats; what it cannot
serve refused with a 400."""
import importlib
import json

import pytest

from .test_serve import CHAT, _all_free, _post

WEATHER = {"type": "function", "name": "weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"]}}


def _text(resp) -> str:
    return "".join(p["text"] for it in resp["output"] if it["type"] == "message" for p in it["content"])


def _events(srv, body):
    """(event name, data) of a streamed Responses request, as the SSE lines name them."""
    from .test_serve import _raw
    code, data = _raw(srv, "POST", "/v1/responses", json.dumps({**body, "stream": True}).encode())
    assert code == 200, data
    out, name = [], None
    for line in data.decode().split("\n"):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


@pytest.mark.parametrize("extra", [{"max_output_tokens": 8}, {"max_output_tokens": 9, "temperature": 0.8, "seed": 4,
                                                              "policy": {"name": "speculative-sampling"}}])
def test_a_response_is_its_chat_reply(server, extra):
    """instructions + input = a chat's system and user messages: the same tokens as the chat completion, whole and
    streamed; the stream's typed events in order, numbered, its deltas joining to the text."""
    body = {"instructions": CHAT[0]["content"], "input": [{"role": "user", "content": [
        {"type": "input_text", "text": CHAT[1]["content"]}]}], "metadata": {"k": "v"}, **extra}
    chat = {"messages": CHAT, "max_tokens": extra["max_output_tokens"],
            **{k: v for k, v in extra.items() if k != "max_output_tokens"}}
    code, want = _post(server, "/v1/chat/completions", chat)
    assert code == 200
    code, resp = _post(server, "/v1/responses", body)
    assert code == 200, resp
    assert resp["object"] == "response" and resp["id"].startswith("resp_") and resp["metadata"] == {"k": "v"}
    assert resp["store"] is False and _post(server, "/v1/responses", {**body, "store": True})[1]["store"] is False
    assert _text(resp) == want["choices"][0]["message"]["content"]
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["usage"]["input_tokens"] == want["usage"]["prompt_tokens"]
    assert resp["usage"]["output_tokens"] == extra["max_output_tokens"]
    assert resp["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
    events = _events(server, body)
    names = [n for n, _ in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert all(n == d["type"] for n, d in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    final = events[-1][1]["response"]
    assert deltas == _text(final) == _text(resp) and final["usage"] == resp["usage"]
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    _all_free(server.service.engine)


def test_input_items_become_the_conversation(programs):
    """Messages (developer as system, output_text parts), function calls (parallel ones in one assistant turn) and
    their outputs, reasoning items dropped: the chat messages the template gets."""
    api = importlib.import_module("responses_api")
    body = {"input": [{"type": "message", "role": "developer", "content": "be brief"},
                      {"role": "user", "content": "weather?"},
                      {"type": "reasoning", "id": "rs_1", "summary": []},
                      {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "oslo"}'},
                      {"type": "function_call", "call_id": "c2", "name": "clock", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "rain"},
                      {"type": "function_call_output", "call_id": "c2", "output": {"t": 9}},
                      {"role": "assistant", "content": [{"type": "output_text", "text": "It rains."}]}],
            "tools": [WEATHER], "tool_choice": {"type": "function", "name": "weather"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}
    chat = api.chat_body(body)
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "tool", "tool_call_id": "c2", "content": '{"t": 9}'},
        {"role": "assistant", "content": "It rains."}]
    assert chat["tools"] == [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "x", "schema": {"type": "object"}}}


@pytest.mark.parametrize("choice", [{"type": "function", "name": "weather"}, "required"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_is_an_output_item(json_server, stream, choice):
    """tool_choice naming a function (or "required", with that one function): the reply is one function_call item
    whose arguments hold to its parameters, whole and streamed."""
    body = {"input": "weather?", "max_output_tokens": 60, "tools": [WEATHER], "tool_choice": choice,
            "parallel_tool_calls": False}
    if stream:
        events = _events(json_server, body)
        resp = events[-1][1]["response"]
        done = [d for n, d in events if n == "response.function_call_arguments.done"]
        assert len(done) == 1 and done[0]["arguments"] == resp["output"][-1]["arguments"]
    else:
        code, resp = _post(json_server, "/v1/responses", body)
        assert code == 200, resp
    calls = [it for it in resp["output"] if it["type"] == "function_call"]
    assert resp["status"] == "completed" and len(calls) == 1 and calls[0]["name"] == "weather"
    args = json.loads(calls[0]["arguments"])
    assert set(args) >= {"city", "unit"} and args["unit"] in ("c", "f") and calls[0]["call_id"]
    _all_free(json_server.service.engine)


@pytest.mark.parametrize("body, match", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "nothing is stored"),
    ({"input": "hi", "store": "yes"}, "store must be true or false"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "chat template has no reasoning effort"),
    ({"input": "hi", "reasoning": {"effort": "low", "summary": "auto"}}, "a summary of the thinking is not written"),
    ({"input": "hi", "reasoning": "high"}, "reasoning must be"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "no built-in tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "no images"),
    ({"input": []}, "non-empty list"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "must be a message"),
    ({"input": "hi", "n": 2}, "unsupported field"),
    ({"input": "hi", "tool_choice": {"type": "function"}}, "tool_choice must be"),
    ({"input": "hi", "text": {"format": "json"}}, "text must be"),
    ({"input": "hi", "include": ["reasoning.encrypted_content"]}, "include must be a list of"),
    ({"input": "hi", "include": "message.output_text.logprobs"}, "include must be a list of"),
    ({"input": "hi", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "hi", "max_output_tokens": 0}, "max_tokens")])
def test_what_it_cannot_serve_gets_a_clear_400(server, body, match):
    code, r = _post(server, "/v1/responses", body)
    assert code == 400 and match in r["error"]["message"], r


def _answer_logprobs(srv, body):
    """A Responses body's answer logprobs, whole, streamed (the deltas' joined, the done event's, the completed
    response's), and the chat reply's logprobs of the same request."""
    code, resp = _post(srv, "/v1/responses", body)
    assert code == 200, resp
    whole = [p["logprobs"] for it in resp["output"] if it["type"] == "message" for p in it["content"]]
    events = _events(srv, body)
    deltas = [e for n, d in events if n == "response.output_text.delta" for e in d["logprobs"]]
    done = [d["logprobs"] for n, d in events if n == "response.output_text.done"]
    completed = [p["logprobs"] for it in events[-1][1]["response"]["output"] if it["type"] == "message"
                 for p in it["content"]]
    chat = {"messages": [{"role": "user", "content": body["input"]}], "max_tokens": body["max_output_tokens"],
            "logprobs": True, "top_logprobs": body.get("top_logprobs", 0), **{k: body[k] for k in ("policy",)
                                                                                if k in body}}
    code, reply = _post(srv, "/v1/chat/completions", chat)
    assert code == 200, reply
    return whole, deltas, done, completed, reply["choices"][0]


@pytest.mark.parametrize("body", [
    {"input": "w1 w2 w3", "max_output_tokens": 6, "include": ["message.output_text.logprobs"], "top_logprobs": 2},
    {"input": "w4 w5", "max_output_tokens": 5, "top_logprobs": 0, "policy": {"name": "greedy", "max_draft_len": 3}}])
def test_the_output_text_carries_its_logprobs_where_asked(server, body):
    """include "message.output_text.logprobs" (or top_logprobs): the output_text part's logprobs are the chat reply's
    (token, logprob, bytes, top_logprobs), whole, and streamed in the text deltas, the done event and the completed
    response alike; without them, the part has none."""
    whole, deltas, done, completed, chat = _answer_logprobs(server, body)
    want = chat["logprobs"]["content"]
    assert len(want) == body["max_output_tokens"] and whole == [want] and done == [want] and completed == [want]
    assert deltas == want and all(len(e["top_logprobs"]) == body["top_logprobs"] for e in want)
    code, resp = _post(server, "/v1/responses", {"input": body["input"], "max_output_tokens": 3})
    assert "logprobs" not in resp["output"][0]["content"][0]
    _all_free(server.service.engine)


def test_a_streamed_answer_keeps_the_logprobs_of_what_the_parser_held_back(programs):
    """With a reasoning parser, a reply's opening may be held back (it could start <think>): its logprobs wait, and
    go to the answer if the reply does not think, or are dropped with the thinking if it does."""
    r = importlib.import_module("responses_api")

    def lp(t):
        return {"token": t, "logprob": -1.0, "bytes": list(t.encode()), "top_logprobs": []}

    def chunk(delta, tokens, finish=None):
        return {"id": "chatcmpl-1", "created": 0, "choices": [
            {"delta": delta, "logprobs": {"content": [lp(t) for t in tokens]}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4,
                      "prompt_tokens_details": {"cached_tokens": 0}} if finish else None}
    body = {"input": "x", "top_logprobs": 0}
    for chunks, want in (
            ([chunk({}, ["<"]), chunk({"content": "<a"}, ["a"]), chunk({"content": " b"}, [" b"], "stop")],
             ["<", "a", " b"]),  # (held back, then no thinking: all the answer's)
            ([chunk({}, ["<think>"]), chunk({"reasoning_content": "x"}, ["x"]),
              chunk({"content": "y"}, ["</think>", "y"], "stop")], ["y"])):  # (a thinking: only after </think>)
        s = r.ResponseStream(body, "m", lambda text: 1, parsed=True)
        events = [e for c in chunks for e in s.feed(c)]
        deltas = [e["token"] for n, d in events if n == "response.output_text.delta" for e in d["logprobs"]]
        final = events[-1][1]["response"]["output"][-1]["content"][0]["logprobs"]
        assert deltas == want and [e["token"] for e in final] == want


def test_truncation_auto_drops_the_earliest_turns_that_do_not_fit(server):
    """truncation "auto" (OpenAI's): a conversation too long for the context loses its earliest turns, as few as leave
    room to answer (the instructions stay; a call's replies go with it); "disabled", the default, refuses it."""
    eng, svc = server.service.engine, server.service
    words = " ".join(f"w{i}" for i in range(1, 10))
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": words} for i in range(11)]
    body = {"input": turns, "instructions": "w5 w6", "max_output_tokens": 3}
    code, r = _post(server, "/v1/responses", body)
    assert code == 400 and "max_model_len" in r["error"]["message"]
    code, resp = _post(server, "/v1/responses", {**body, "truncation": "auto"})
    assert code == 200 and resp["truncation"] == "auto", resp
    system = [{"role": "system", "content": "w5 w6"}]
    k = next(k for k in range(len(turns)) if len(eng.tokenize(system + turns[k:])) < eng.max_model_len)
    assert k > 0 and resp["usage"]["input_tokens"] == len(eng.tokenize(system + turns[k:]))
    want = eng.generate([system + turns[k:]], svc.parse({"messages": system + turns[k:], "max_tokens": 3},
                                                        "chat").params)[0]
    assert resp["output"][0]["content"][0]["text"] == want.text
    # a call's replies go with it; the last message stays however long
    call = [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": words}]
    kept = svc._fit(turns[:9] + call + turns[:1], None, {})
    assert kept[0]["role"] != "tool" and kept[-1] == turns[0]
    long = [{"role": "user", "content": " ".join([words] * 8)}]
    assert svc._fit(system + long, None, {}) == system + long
    code, r = _post(server, "/v1/responses", {"input": long, "max_output_tokens": 3, "truncation": "auto"})
    assert code == 400 and "max_model_len" in r["error"]["message"]
    code, r = _post(server, "/v1/responses", {**body, "truncation": "middle"})
    assert code == 400 and 'truncation must be "disabled" or "auto"' in r["error"]["message"]
    _all_free(eng)

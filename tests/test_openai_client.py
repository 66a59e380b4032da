"""python/serve.py under OpenAI's own Python client (the `openai` package): every reply it parses into its typed
objects, streamed and whole, on the completions, chat completions and Responses APIs, with tool calls and an API key.
What a client written for OpenAI's service gets from this one."""
import json
import threading

import openai  # (requirements.txt: the README's test command installs it)
import pytest

from .test_serve import CHAT

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 4}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]}}}


def _client(srv, key="none"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key=key, max_retries=0)


def test_the_three_apis_parse_as_openai_s(server):
    c = _client(server)
    cp = c.completions.create(model="bild", prompt="w1 w2 w3", max_tokens=5, logprobs=2, seed=1)
    assert cp.choices[0].finish_reason == "length" and cp.usage.completion_tokens == 5
    assert len(cp.choices[0].logprobs.tokens) == 5 and len(cp.choices[0].logprobs.top_logprobs[0]) == 2
    chat = c.chat.completions.create(model="bild", messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=1)
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens_details.cached_tokens == 0
    assert len(chat.choices[0].logprobs.content) == 6
    pieces = c.chat.completions.create(model="bild", messages=CHAT, max_tokens=6, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(pieces)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == 6
    resp = c.responses.create(model="bild", input=CHAT[1]["content"], instructions=CHAT[0]["content"],
                              max_output_tokens=6)
    assert resp.output_text == text and resp.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens" and resp.usage.output_tokens == 6
    events = list(c.responses.create(model="bild", input=CHAT[1]["content"], instructions=CHAT[0]["content"],
                                     max_output_tokens=6, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == text
    many = list(c.chat.completions.create(model="bild", messages=CHAT, max_tokens=4, n=2, temperature=1.0, seed=3,
                                          stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for ch in many:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    whole = c.chat.completions.create(model="bild", messages=CHAT, max_tokens=4, n=2, temperature=1.0, seed=3)
    assert texts == {ch.index: ch.message.content for ch in whole.choices}
    assert many[-1].choices == [] and many[-1].usage.completion_tokens == 8
    assert [m.id for m in c.models.list()] == ["bild"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="bild", prompt="w1", max_tokens=0)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_tool_calls_parse_as_openai_s(json_server, api):
    c = _client(json_server)
    if api == "chat":
        r = c.chat.completions.create(model="bild", messages=[{"role": "user", "content": "weather?"}], max_tokens=60,
                                      tools=[WEATHER], tool_choice={"type": "function",
                                                                    "function": {"name": "weather"}})
        call = r.choices[0].message.tool_calls[0].function
        with c.chat.completions.stream(model="bild", messages=[{"role": "user", "content": "weather?"}], max_tokens=60,
                                       tools=[WEATHER], tool_choice={"type": "function",
                                                                     "function": {"name": "weather"}}) as stream:
            final = stream.get_final_completion()  # (the client's helper puts the streamed deltas together)
        streamed = final.choices[0].message.tool_calls[0].function
        assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    else:
        r = c.responses.create(model="bild", input="weather?", max_output_tokens=60,
                               tools=[{"type": "function", **WEATHER["function"]}],
                               tool_choice={"type": "function", "name": "weather"})
        call = next(it for it in r.output if it.type == "function_call")
        assert r.status == "completed"
    assert call.name == "weather" and set(json.loads(call.arguments)) >= {"city", "unit"}
    if api == "responses":  # (the client's stream helper rebuilds the response from the events, and checks them)
        with c.responses.stream(model="bild", input="weather?", max_output_tokens=60,
                                tools=[{"type": "function", **WEATHER["function"]}],
                                tool_choice={"type": "function", "name": "weather"}) as stream:
            kinds = [e.type for e in stream]
            final = stream.get_final_response()
        assert final.status == "completed" and "response.function_call_arguments.done" in kinds
        streamed = next(it for it in final.output if it.type == "function_call")
        assert (streamed.name, streamed.arguments) == (call.name, call.arguments)


def test_an_api_key_is_what_the_client_sends(programs, server):
    srv = programs["serve"].make_server(server.service.engine, port=0, api_key="sekrit")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(srv, "wrong").models.list()
        assert [m.id for m in _client(srv, "sekrit").models.list()] == ["bild"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_responses_logprobs_parse_as_openai_s(server):
    c = _client(server)
    resp = c.responses.create(model="bild", input="w1 w2", max_output_tokens=4, top_logprobs=2,
                              include=["message.output_text.logprobs"])
    lps = resp.output[0].content[0].logprobs
    assert len(lps) == 4 and len(lps[0].top_logprobs) == 2 and lps[0].token and lps[0].logprob <= 0
    with c.responses.stream(model="bild", input="w1 w2", max_output_tokens=4, top_logprobs=2,
                            include=["message.output_text.logprobs"]) as stream:
        events = list(stream)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [lp.token for e in deltas for lp in e.logprobs] == [lp.token for lp in lps]
    final = events[-1].response  # (response.incomplete: cut by max_output_tokens)
    assert events[-1].type == "response.incomplete"
    assert [lp.logprob for lp in final.output[0].content[0].logprobs] == [lp.logprob for lp in lps]


def test_the_model_is_listed_and_retrieved_by_name(server):
    c = _client(server)
    assert [m.id for m in c.models.list()] == ["bild"]
    m = c.models.retrieve("bild")
    assert m.id == "bild" and m.object == "model"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("gpt-4o")

"""python/serve.py's service options: reasoning parsers (a reply's thinking apart from its answer), the chat
template's options (vLLM's chat_template_kwargs, add_generation_prompt, continue_final_message), an API key, and a
graceful shutdown that lets the requests in flight finish."""
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from .engine.conftest import shallow_copy, tiny_llama
from .conftest import PYTHON
from .test_serve import _all_free, _post, _raw

TEXTS = ["<think>a b</think>c d", "  <think>\nplan</think>\n\nanswer", "<think>still thinking", "no tags at all",
         "a</think>b", "</think>", "<think></think>", "", "<thin", "x <think>y</think>z", "<think>a</think>b</think>c"]


@pytest.mark.parametrize("parser, text, want", [
    ("deepseek_r1", "<think>a b</think>c d", ("a b", "c d")),
    ("deepseek_r1", "plan</think>\n\nanswer", ("plan", "\n\nanswer")),  # (the template opened <think>)
    ("deepseek_r1", "cut while thinking", ("cut while thinking", None)),
    ("deepseek_r1", "  <think>x</think>", ("x", None)),
    ("qwen3", "<think>a b</think>c d", ("a b", "c d")),
    ("qwen3", "no thinking</think>here", (None, "no thinking</think>here")),  # (only a reply that opens with it)
    ("qwen3", "<think>cut", ("cut", None)),
    ("qwen3", "plain answer", (None, "plain answer")),
    ("qwen3", "", (None, None))])
def test_split_reasoning(programs, parser, text, want):
    assert importlib.import_module("reasoning").split_reasoning(text, parser) == want


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_a_streamed_reply_splits_as_the_whole_one(programs, parser, size):
    """Fed in pieces of any size, the pieces joined equal the whole split, and no tag's piece leaks into either."""
    r = importlib.import_module("reasoning")
    for text in TEXTS:
        s = r.ReasoningStream(parser)
        pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
        outs = [s.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
        got = ("".join(a for a, _ in outs) or None, "".join(b for _, b in outs) or None)
        assert got == r.split_reasoning(text, parser), (text, size)
    with pytest.raises(ValueError, match="reasoning parser must be one of"):
        r.ReasoningStream("r1")


def _renamed_pair(programs):
    """A tiny pair and a word tokenizer in which the large model's greedy reply to a prompt opens with <think> and
    closes it a few tokens on: its ids are named after what the model writes (the words are the test's choice)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bild_kernels import Engine, LargeOnly, SamplingParams
    V = 64
    large = tiny_llama(31, layers=3, vocab=V)
    small = shallow_copy(large, layers=2, noise=0.3)
    plain = Engine(large=large, small=small, dtype=torch.float64, max_model_len=64, block_size=4)
    for prompt in ([a, b] for a in range(1, 12) for b in range(12, 20)):
        out = plain.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True), policy=LargeOnly())[0]
        ids = out.token_ids  # (each tag's id once in the reply, neither in the prompt)
        close = next((k for k in range(2, 10) if ids.count(ids[k]) == 1), None)
        if close is not None and ids.count(ids[0]) == 1 and not {ids[0], ids[close]} & set(prompt):
            break
    else:
        pytest.fail("no prompt whose reply can be named <think> ... </think> ...")
    words = [f"a{i}" for i in range(V)]
    free = [t for t in range(V) if t not in ids + prompt]  # (an EOS, and JSON's pieces for a constrained reply)
    for t, w in zip(free, ["</s>", "<unk>", "{", "}", '"', ":", "x"]):
        words[t] = w
    words[ids[0]], words[ids[close]] = "<think>", "</think>"
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.Fuse()  # (each token's text as it is: what structured outputs read)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    large.config.eos_token_id = small.config.eos_token_id = free[0]
    tok.chat_template = "{{ messages[-1]['content'] }}"
    engine = Engine(large=large, small=small, tokenizer=tok, dtype=torch.float64, max_model_len=64, block_size=4)
    return engine, " ".join(words[t] for t in prompt)


@pytest.fixture(scope="module")
def thinking_server(programs):
    engine, prompt = _renamed_pair(programs)
    srv = programs["serve"].make_server(engine, port=0, max_pending=16, reasoning_parser="qwen3")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, prompt
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("policy", [{"name": "large-only"}, {"name": "greedy", "max_draft_len": 3},
                                    {"name": "bild", "fallback_threshold": 0.3, "rollback_threshold": 1.0}])
def test_a_reasoning_reply_comes_apart_whole_and_streamed(thinking_server, parser, policy):
    """The model's reply opens with <think>, closes it and goes on: message.reasoning_content holds what it wrote
    between the tags, content the rest (as split_reasoning reads the reply's text), and the stream's
    reasoning_content / content deltas join to the same; the tags reach neither."""
    srv, prompt = thinking_server
    svc = srv.service
    r = importlib.import_module("reasoning")
    svc.reasoning_parser = parser
    base = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "ignore_eos": True,
            "policy": policy}
    code, plain = _post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "ignore_eos": True,
                                                  "policy": policy})
    assert code == 200, plain
    text = plain["choices"][0]["text"]
    want = r.split_reasoning(text, parser)
    assert want[0] and want[1] and text.lstrip().startswith("<think>")  # (both parts are there to split)
    code, whole = _post(srv, "/v1/chat/completions", base)
    assert code == 200, whole
    msg = whole["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == want
    assert "think>" not in msg["reasoning_content"] + msg["content"]
    code, events = _post(srv, "/v1/chat/completions", {**base, "stream": True})
    assert code == 200, events
    deltas = [e["choices"][0]["delta"] for e in events]
    got = ("".join(d.get("reasoning_content") or "" for d in deltas), "".join(d.get("content") or "" for d in deltas))
    assert got == want and deltas[0]["role"] == "assistant"
    # an output constraint holds the answer, the thinking free (the same thinking as without it), whole and streamed
    held = {**base, "ignore_eos": False, "guided_choice": prompt.split()}
    code, r = _post(srv, "/v1/chat/completions", held)
    assert code == 200, r
    msg = r["choices"][0]["message"]
    assert msg["reasoning_content"] == want[0] and msg["content"] in prompt.split()
    assert r["choices"][0]["finish_reason"] == "stop"
    code, events = _post(srv, "/v1/chat/completions", {**held, "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert ("".join(d.get("reasoning_content") or "" for d in deltas),
            "".join(d.get("content") or "" for d in deltas)) == (msg["reasoning_content"], msg["content"])
    svc.reasoning_parser = "qwen3"
    _all_free(svc.engine)


def test_a_reasoning_reply_s_thinking_is_a_reasoning_item_of_its_response(thinking_server):
    """POST /v1/responses with a reasoning parser: a reasoning item (its reasoning_text the thinking) before the
    message item (the answer), whole and streamed; usage counts the thinking's tokens."""
    from .test_serve_responses import _events
    srv, prompt = thinking_server
    r = importlib.import_module("reasoning")
    body = {"input": prompt, "max_output_tokens": 12, "ignore_eos": True}
    text = _post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "ignore_eos": True})[1]["choices"][0]
    thinking, answer = r.split_reasoning(text["text"], "qwen3")
    code, resp = _post(srv, "/v1/responses", body)
    assert code == 200, resp
    kinds = [it["type"] for it in resp["output"]]
    assert kinds == ["reasoning", "message"]
    assert resp["output"][0]["content"][0]["text"] == thinking and resp["output"][1]["content"][0]["text"] == answer
    assert resp["usage"]["output_tokens_details"]["reasoning_tokens"] == len(srv.service.engine.tokenize(
        thinking, add_special_tokens=False)) > 0
    events = _events(srv, body)
    assert "".join(d["delta"] for n, d in events if n == "response.reasoning_text.delta") == thinking
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == answer
    assert [(it["type"], it["content"]) for it in events[-1][1]["response"]["output"]] == [
        (it["type"], it["content"]) for it in resp["output"]]
    _all_free(srv.service.engine)


def test_a_reasoning_reply_s_answer_carries_its_own_logprobs(thinking_server):
    """The Responses API's output_text logprobs of a thinking reply are its answer's: the chat reply's after the
    </think> token, whole and streamed alike."""
    from .test_serve_responses import _answer_logprobs
    srv, prompt = thinking_server
    body = {"input": prompt, "max_output_tokens": 12, "ignore_eos": True, "top_logprobs": 1}
    whole, deltas, done, completed, chat = _answer_logprobs(srv, body)
    entries = chat["logprobs"]["content"]
    end = [e["token"] for e in entries].index("</think>")
    want = entries[end + 1:]
    assert want and whole == done == completed == [want] and deltas == want
    assert "".join(e["token"] for e in want) == chat["message"]["content"]
    _all_free(srv.service.engine)


def test_a_reasoning_reply_thinks_before_its_tool_call(thinking_server):
    """A named tool_choice with a reasoning parser: the thinking is free (as without the call), the call's arguments
    hold to the function's schema after it; streamed, reasoning_content deltas then the arguments."""
    srv, prompt = thinking_server
    r = importlib.import_module("reasoning")
    text = _post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "ignore_eos": True})[1]["choices"][0]
    thinking = r.split_reasoning(text["text"], "qwen3")[0]
    fn = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"enum": ["a1"]}}, "required": ["x"]}}}
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 30, "tools": [fn],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}
    code, out = _post(srv, "/v1/chat/completions", body)
    assert code == 200, out
    msg = out["choices"][0]["message"]
    assert msg["reasoning_content"] == thinking and msg["content"] is None
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"x": "a1"}
    code, events = _post(srv, "/v1/chat/completions", {**body, "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == thinking
    args = "".join(k["function"].get("arguments") or "" for d in deltas for k in d.get("tool_calls", []))
    assert json.loads(args) == {"x": "a1"}
    _all_free(srv.service.engine)


def test_reasoning_parser_names_are_checked(programs, server):
    api = importlib.import_module("openai_api")
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        api.Service(server.service.engine, reasoning_parser="o1")
    with pytest.raises(SystemExit):
        programs["serve"].parser().parse_args(["--reasoning-parser", "o1"])


def test_chat_template_options_reach_the_template(server):
    """continue_final_message leaves the assistant's last message open (the reply goes on from it), and the same
    messages tokenize through /tokenize as the engine tokenizes them; bad options get a 400 naming them."""
    eng = server.service.engine
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]
    want = eng.tokenize(messages, continue_final_message=True)
    assert want[-2:] == [3, 4]  # (no turn end, no new header after the assistant's words)
    code, r = _raw(server, "POST", "/tokenize", json.dumps({"messages": messages, "continue_final_message": True,
                                                            "add_generation_prompt": False}).encode())
    assert code == 200 and json.loads(r)["tokens"] == want
    body = {"messages": messages, "max_tokens": 6, "continue_final_message": True, "add_generation_prompt": False}
    code, chat = _post(server, "/v1/chat/completions", body)
    assert code == 200, chat
    code, text = _post(server, "/v1/completions", {"prompt": want, "max_tokens": 6})
    assert chat["choices"][0]["token_ids"] == text["choices"][0]["token_ids"]
    code, r = _post(server, "/v1/chat/completions", {**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert code == 200 and r["choices"][0]["token_ids"] == chat["choices"][0]["token_ids"]  # (a variable it ignores)
    for bad, match in (({"chat_template_kwargs": {"tokenize": False}}, "may not set"),
                       ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs must be an object"),
                       ({"add_generation_prompt": True}, "exclude each other"),
                       ({"continue_final_message": "yes"}, "must be true or false")):
        code, r = _post(server, "/v1/chat/completions", {**body, **bad})
        assert code == 400 and match in r["error"]["message"], (bad, r)
    code, r = _post(server, "/v1/chat/completions", {"messages": messages[:1], "continue_final_message": True,
                                                    "max_tokens": 2})
    assert code == 400 and "must be the assistant's" in r["error"]["message"]
    code, r = _raw(server, "POST", "/tokenize", json.dumps({"prompt": "w1", "continue_final_message": True}).encode())
    assert code == 400
    _all_free(eng)


def test_reasoning_effort_reaches_a_template_that_reads_it(server):
    """OpenAI's reasoning_effort (chat) and reasoning.effort (Responses) are the template's `reasoning_effort`
    variable (as gpt-oss's template reads it), beside chat_template_kwargs; a template without one refuses it."""
    eng = server.service.engine
    old = eng.tokenizer.chat_template
    eng.tokenizer.chat_template = ("{{ messages[-1]['content'] }}{% if reasoning_effort is defined %} "
                                   "w{{ {'low': 1, 'medium': 2, 'high': 3}[reasoning_effort] }}{% endif %}")
    try:
        messages = [{"role": "user", "content": "w7 w8"}]
        for effort, last in (("low", 1), ("high", 3)):
            prompt = eng.tokenize(messages, chat_template_kwargs={"reasoning_effort": effort})
            assert prompt[-3:] == [7, 8, last]
            code, want = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5})
            code, chat = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 5,
                                                                "reasoning_effort": effort})
            assert code == 200 and chat["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
            assert chat["usage"]["prompt_tokens"] == len(prompt)
            code, resp = _post(server, "/v1/responses", {"input": "w7 w8", "max_output_tokens": 5,
                                                         "reasoning": {"effort": effort, "summary": None}})
            assert code == 200 and resp["usage"]["input_tokens"] == len(prompt)
            assert resp["output"][0]["content"][0]["text"] == want["choices"][0]["text"]
        code, r = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "reasoning_effort":
                                                         "low", "chat_template_kwargs": {"reasoning_effort": "high"}})
        assert code == 200 and r["usage"]["prompt_tokens"] == 3  # (the explicit variable wins)
    finally:
        eng.tokenizer.chat_template = old
    _all_free(eng)


def test_an_api_key_guards_the_v1_routes(programs, server):
    serve = programs["serve"]
    srv = serve.make_server(server.service.engine, port=0, api_key="sekrit")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"prompt": [5, 17, 3], "max_tokens": 3}).encode()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            code, r = _raw(srv, "POST", "/v1/completions", body, headers)
            assert code == 401 and json.loads(r)["error"]["type"] == "authentication_error"
            assert _raw(srv, "GET", "/v1/models", None, headers)[0] == 401
        ok = {"Authorization": "Bearer sekrit"}
        assert _raw(srv, "POST", "/v1/completions", body, ok)[0] == 200
        assert _raw(srv, "GET", "/v1/models", None, ok)[0] == 200
        for path in ("/health", "/metrics"):  # (probes and scrapers need no key, as vLLM's)
            assert _raw(srv, "GET", path)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
    for bad in ("", 5):
        with pytest.raises(ValueError, match="api_key"):
            serve.make_server(server.service.engine, port=0, api_key=bad)


class _HeldEngine:
    """The engine, with each stream held after its first chunk until `release` is set."""

    def __init__(self, engine):
        self._engine, self.release, self.started = engine, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, *a, **kw):
        chunks = self._engine.stream(*a, **kw)
        yield next(chunks)
        self.started.set()
        self.release.wait(30)
        yield from chunks


def test_drain_lets_requests_in_flight_finish_and_refuses_new_ones(programs, server):
    serve = programs["serve"]
    srv = serve.make_server(server.service.engine, port=0)
    held = srv.service.engine = _HeldEngine(server.service.engine)
    loop = threading.Thread(target=srv.serve_forever, daemon=True)
    loop.start()
    got = {}
    body = {"prompt": [5, 17, 3], "max_tokens": 8, "stream": True}
    client = threading.Thread(target=lambda: got.update(r=_post(srv, "/v1/completions", body)))
    client.start()
    assert held.started.wait(30)
    left = []
    drainer = threading.Thread(target=lambda: left.append(srv.drain(30)))
    drainer.start()
    deadline = time.monotonic() + 10
    while not srv.draining:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    code, r = _raw(srv, "GET", "/health")
    assert code == 503 and json.loads(r)["status"] == "draining"
    code, r = _post(srv, "/v1/completions", {"prompt": [5], "max_tokens": 2})
    assert code == 503 and "shutting down" in r["error"]["message"]
    assert drainer.is_alive()  # (the stream is still in flight)
    held.release.set()
    drainer.join(30)
    client.join(30)
    loop.join(30)
    assert left == [0] and not loop.is_alive()
    code, events = got["r"]
    alone = server.service.engine.generate([[5, 17, 3]], server.service.parse({**body, "stream": False})[1])[0]
    assert code == 200 and [t for e in events for t in e["choices"][0]["token_ids"]] == alone.token_ids
    srv.server_close()
    # a request that outlasts the timeout: drain returns the number left in flight
    srv = serve.make_server(server.service.engine, port=0)
    held = srv.service.engine = _HeldEngine(server.service.engine)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    client = threading.Thread(target=lambda: _post(srv, "/v1/completions", body))
    client.start()
    assert held.started.wait(30)
    assert srv.drain(0.2) == 1
    held.release.set()
    client.join(30)
    srv.server_close()
    _all_free(server.service.engine)


def test_sigterm_drains_and_exits_cleanly(programs, tmp_path):
    large, small = programs["tiny_pair"].save_tiny_pair(tmp_path / "pair")
    env = {**os.environ, "PYTHONPATH": str(PYTHON), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(PYTHON / "serve.py"), "--large", str(large), "--small", str(small),
                             "--dtype", "float64", "--max-model-len", "64", "--port", "0", "--shutdown-timeout", "20"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "serving on" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "SIGTERM: draining" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_served_model_name_is_listed_and_held_to(programs, server):
    """--served-model-name: replies and /v1/models carry it, and a request naming another model gets a 404;
    without it any name is accepted (the replies say "bild")."""
    serve = programs["serve"]
    args = serve.parser().parse_args(["--served-model-name", "smol"])
    assert args.served_model_name == "smol"
    srv = serve.make_server(server.service.engine, port=0, model_name="smol", strict_model=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        models = json.loads(_raw(srv, "GET", "/v1/models")[1])["data"]
        assert [m["id"] for m in models] == ["smol"]
        assert models[0]["max_model_len"] == server.service.engine.max_model_len
        code, r = _post(srv, "/v1/completions", {"prompt": [5, 17], "max_tokens": 2, "model": "smol"})
        assert code == 200 and r["model"] == "smol"
        code, r = _post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}],
                                                     "max_tokens": 2, "model": "gpt-4o"})
        assert code == 404 and "does not exist" in r["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()
    code, r = _post(server, "/v1/completions", {"prompt": [5, 17], "max_tokens": 2, "model": "gpt-4o"})
    assert code == 200 and r["model"] == "bild"


def slow_and_watched(eng, monkeypatch) -> list:
    """Make `eng` slow (50 ms a step) and record the request ids it is told to cancel."""
    step = eng._scheduler._step_all
    monkeypatch.setattr(eng._scheduler, "_step_all", lambda: (time.sleep(0.05), step())[1])
    cancelled = []
    monkeypatch.setattr(eng, "cancel", lambda rid, _c=eng.cancel: (cancelled.append(rid), _c(rid))[1])
    return cancelled


def send_while_running(sock, eng, body: dict) -> None:
    """POST a completions `body` over `sock` and wait until the engine runs it."""
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    deadline = time.monotonic() + 10
    while not eng._scheduler.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_client_that_leaves_before_a_whole_reply_cancels_its_requests(programs, server, monkeypatch):
    """A non-streamed request whose client closes its connection mid-generation is cancelled at once (its blocks
    freed, counted as cancelled), not run to its max_tokens."""
    import socket
    eng, srv = server.service.engine, server
    before = srv.service.metrics.requests.get("cancelled", 0)
    cancelled = slow_and_watched(eng, monkeypatch)
    with socket.create_connection(("127.0.0.1", srv.server_address[1])) as s:
        send_while_running(s, eng, {"prompt": [5, 17, 3], "max_tokens": 50, "ignore_eos": True, "n": 2})
    t0 = time.monotonic()
    while srv.service.metrics.requests.get("cancelled", 0) < before + 2:
        assert time.monotonic() - t0 < 5, "the requests ran on after their client left"
        time.sleep(0.02)
    assert len(cancelled) == 2  # (both choices' requests)
    _all_free(eng)


def test_usage_counts_the_prompt_positions_the_prefix_cache_served(programs, tmp_path):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: 0 for a first prompt, the reused positions for one that
    opens like it (RequestOutput.metrics.cached_prompt_tokens), whole and streamed."""
    serve = programs["serve"]
    large, small = programs["tiny_pair"].save_tiny_pair(tmp_path / "pair")
    args = serve.parser().parse_args(["--large", str(large), "--small", str(small), "--dtype", "float64",
                                      "--max-model-len", "64", "--prefix-cache", "256"])
    srv = serve.make_server(serve.build_engine(args), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        words = " ".join(f"w{i}" for i in range(1, 30))
        first = _post(srv, "/v1/completions", {"prompt": words, "max_tokens": 3})[1]["usage"]
        again = _post(srv, "/v1/completions", {"prompt": words + " w40", "max_tokens": 3})[1]["usage"]
        events = _post(srv, "/v1/completions", {"prompt": words + " w41", "max_tokens": 3, "stream": True})[1]
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        assert 0 < again["prompt_tokens_details"]["cached_tokens"] < again["prompt_tokens"]
        assert events[-1]["usage"]["prompt_tokens_details"] == again["prompt_tokens_details"]
        metrics = _raw(srv, "GET", "/metrics")[1].decode()  # (the cache's lookups and hits, as counters)
        got = {k: float(v) for k, v in (line.rsplit(" ", 1) for line in metrics.splitlines()
                                        if line.startswith("bild_prefix_cache_"))}
        assert got["bild_prefix_cache_queries_total"] >= 3 and 2 <= got["bild_prefix_cache_hits_total"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_chat_template_from_the_command_line_replaces_the_tokenizer_s(programs, server, tmp_path):
    serve, eng = programs["serve"], server.service.engine
    messages = [{"role": "user", "content": "w5 w6"}]
    old = eng.tokenizer.chat_template
    try:
        serve.set_chat_template(eng, "{% for m in messages %}w7 {{ m['content'] }} {% endfor %}w8")
        assert eng.tokenize(messages) == [7, 5, 6, 8]
        (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }} w9")
        serve.set_chat_template(eng, str(tmp_path / "t.jinja"))
        assert eng.tokenize(messages) == [5, 6, 9]
        for bad, match in (("no/such/file.jinja", "neither a file nor"), ("{{ messages[5]['x'] }}", "does not lay")):
            with pytest.raises(SystemExit, match=match):
                serve.set_chat_template(eng, bad)
            assert eng.tokenize(messages) == [5, 6, 9]  # (a bad one leaves the one before)
    finally:
        eng.tokenizer.chat_template = old
    code, r = _raw(server, "GET", "/version")
    assert code == 200 and json.loads(r)["version"]


def test_browsers_on_allowed_origins_may_call_it(programs, server):
    """--allowed-origins: a CORS preflight (no API key) gets the methods and headers, and replies (401s too) name the
    origin, for allowed origins only; none by default."""
    import http.client

    def call(srv, method, path, headers, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
        try:
            conn.request(method, path, body, headers)
            r = conn.getresponse()
            r.read()
            return r.status, dict(r.getheaders())
        finally:
            conn.close()
    serve = programs["serve"]
    assert serve.parser().parse_args(["--allowed-origins", "https://a.example, https://b.example"]).allowed_origins
    srv = serve.make_server(server.service.engine, port=0, api_key="k", allowed_origins=["https://app.example"])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
        code, h = call(srv, "OPTIONS", "/v1/chat/completions", pre)
        assert code == 204 and h["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in h["Access-Control-Allow-Methods"] and h["Access-Control-Allow-Headers"] == pre[
            "Access-Control-Request-Headers"]
        body = json.dumps({"prompt": [5, 17], "max_tokens": 2}).encode()
        code, h = call(srv, "POST", "/v1/completions", {"Origin": "https://app.example", "Authorization": "Bearer k"},
                       body)
        assert code == 200 and h["Access-Control-Allow-Origin"] == "https://app.example"
        code, h = call(srv, "POST", "/v1/completions", {"Origin": "https://app.example"}, body)
        assert code == 401 and h["Access-Control-Allow-Origin"] == "https://app.example"
        code, h = call(srv, "OPTIONS", "/v1/completions", {**pre, "Origin": "https://evil.example"})
        assert code == 204 and "Access-Control-Allow-Origin" not in h
    finally:
        srv.shutdown()
        srv.server_close()
    code, h = call(server, "GET", "/health", {"Origin": "https://app.example"})  # (the default: no CORS)
    assert code == 200 and "Access-Control-Allow-Origin" not in h


def _with_headers(srv, path, body, headers):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        return r.status, r.getheader("X-Request-Id"), r.read()
    finally:
        conn.close()


def test_a_request_id_header_names_the_reply(server):
    """X-Request-Id (a proxy's or client's id, as vLLM takes it) is the reply's id and comes back as a header, whole,
    streamed and on the Responses API; without one the header carries the reply's own id."""
    from .test_serve import _sse
    chat = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 3}
    code, rid, data = _with_headers(server, "/v1/completions", {"prompt": "w1", "max_tokens": 3},
                                    {"X-Request-Id": "trace-7:a.b"})
    assert code == 200 and rid == "trace-7:a.b" and json.loads(data)["id"] == "cmpl-trace-7:a.b"
    code, rid, data = _with_headers(server, "/v1/chat/completions", {**chat, "stream": True, "n": 2},
                                    {"X-Request-Id": "s1"})
    events = _sse(data)
    assert code == 200 and rid == "s1" and {e["id"] for e in events} == {"chatcmpl-s1"} and len(events) > 2
    code, rid, data = _with_headers(server, "/v1/responses", {"input": "w1", "max_output_tokens": 3},
                                    {"X-Request-Id": "r1"})
    assert code == 200 and rid == "r1" and json.loads(data)["id"] == "resp_r1"
    for path, body, prefix in (("/v1/completions", {"prompt": "w1", "max_tokens": 3}, "cmpl-"),
                               ("/v1/chat/completions", {**chat, "stream": True}, "chatcmpl-"),
                               ("/v1/responses", {"input": "w1", "max_output_tokens": 3}, "resp_"),
                               ("/v1/responses", {"input": "w1", "max_output_tokens": 3, "stream": True}, "resp_")):
        code, rid, data = _with_headers(server, path, body, {})
        assert code == 200 and rid.startswith(prefix), (path, rid)
        if not body.get("stream"):
            assert json.loads(data)["id"] == rid
        elif path == "/v1/responses":
            assert f'"id": "{rid}"' in data.decode()
        else:
            assert {e["id"] for e in _sse(data)} == {rid}
    import http.client  # a kept-alive connection: the next request's reply does not carry the last one's id
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "w1", "max_tokens": 2}).encode(),
                     {"Content-Type": "application/json", "X-Request-Id": "first"})
        r = conn.getresponse()
        assert r.getheader("X-Request-Id") == "first" and json.loads(r.read())["id"] == "cmpl-first"
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.getheader("X-Request-Id") is None and r.read()
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "w1", "max_tokens": 2}).encode(),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.getheader("X-Request-Id") == json.loads(r.read())["id"] != "cmpl-first"
    finally:
        conn.close()
    for bad in ("has space", "x" * 129, ""):
        code, rid, data = _with_headers(server, "/v1/completions", {"prompt": "w1", "max_tokens": 3},
                                        {"X-Request-Id": bad})
        assert code == 400 and "X-Request-Id must be" in json.loads(data)["error"]["message"] and rid is None
    _all_free(server.service.engine)

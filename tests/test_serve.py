"""python/serve.py on a tiny pair saved to disk: streamed == non-streamed == Engine alone, concurrent
clients, hostile input, and a client that leaves mid-stream."""
import dataclasses
import http.client
import importlib
import json
import re
import socket
import threading
import time

import pytest

from bild_kernels import SamplingParams

from .engine.conftest import assert_all_free

def test_engine_flags_reach_the_engine_and_bad_ones_exit_with_a_message(programs, tmp_path):
    serve = programs["serve"]
    large, small = programs["tiny_pair"].save_tiny_pair(tmp_path / "pair")
    base = ["--large", str(large), "--small", str(small), "--dtype", "float64", "--max-model-len", "64"]
    engine = serve.build_engine(serve.parser().parse_args(base + ["--prefix-cache", "32", "--draft-max-batch", "2",
                                                                  "--prefill-chunk", "5"]))
    assert engine.prefix_cache is not None and engine.prefix_cache.max_tokens == 32
    assert engine.draft_max_batch == 2 and engine.prefill_chunk == 5
    engine = serve.build_engine(serve.parser().parse_args(base + ["--prefix-cache", "0", "--draft-max-batch", "none",
                                                                  "--kv-admission", "reserve"]))
    assert engine.prefix_cache is None and engine.draft_max_batch is None and engine.kv_admission == "reserve"
    for flag, value in (("--prefix-cache", "-1"), ("--prefix-cache", "lots"), ("--draft-max-batch", "0"),
                        ("--draft-max-batch", "x"), ("--prefill-chunk", "auto-ish"), ("--threads", "0"),
                        ("--kv-cache-memory", "lots"), ("--kv-cache-memory", "-1GiB"), ("--kv-cache-memory", "4IB"),
                        ("--kv-cache-memory", "0")):
        with pytest.raises(SystemExit, match=flag):
            serve.build_engine(serve.parser().parse_args(base + [f"{flag}={value}"]))
    # vLLM's names and a memory budget for both caches (bytes on a CPU; a fraction needs a GPU)
    args = serve.parser().parse_args(base + ["--max-num-seqs", "3", "--kv-cache-memory", "2MiB"])
    engine = serve.build_engine(args)
    assert engine.max_batch_size == 3 and args.max_batch_size == 3
    per_block = engine.kv_cache_blocks  # (blocks of both caches that 2 MiB hold)
    assert 0 < per_block < serve.build_engine(serve.parser().parse_args(
        base + ["--kv-cache-memory", "4MiB"])).kv_cache_blocks
    assert [serve._memory(v) for v in ("0.9", "1.0", "4GiB", "512MiB", "2GB", "1e9", "1.5kib")] == [
        0.9, 1.0, 4 << 30, 512 << 20, 2 * 10**9, 10**9, 1536]
    for bad, match in ((["--kv-cache-memory", "1MiB", "--kv-cache-blocks", "9"], "not both"),
                       (["--enable-auto-tool-choice"], "needs --tool-call-parser"),
                       (["--max-model-len", "0"], "cannot build the engine"),
                       (["--large", str(tmp_path / "nowhere")], "cannot build the engine")):
        with pytest.raises(SystemExit, match=match):
            serve.build_engine(serve.parser().parse_args(base + bad))
    assert serve.parser().parse_args(base + ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"])


def _url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}"


def _raw(srv, method, path, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _all_free(engine):
    deadline = time.monotonic() + 10
    while engine._scheduler.running or engine._scheduler.waiting:
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.01)
    assert_all_free(engine)


BODIES = [{"prompt": "w1 w2 w3", "max_tokens": 12},
          {"prompt": [5, 17, 3], "max_tokens": 9, "policy": {"name": "greedy", "max_draft_len": 3}},
          {"prompt": "w40 w2", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 11,
           "policy": {"name": "speculative-sampling"}},
          {"prompt": "w40 w2", "max_tokens": 10, "temperature": 1.2, "min_p": 0.1, "seed": 12,
           "policy": {"name": "bild", "fallback_threshold": 0.3}},
          {"prompt": [8], "max_tokens": 7, "policy": {"name": "bild", "fallback_threshold": 0.4,
                                                      "rollback_threshold": 2.0}},
          {"prompt": "w7 w7 w7", "max_tokens": 8, "policy": {"name": "jacobi", "block_size": 3}, "stop": ["w50"]},
          {"prompt": "w7 w8", "max_tokens": 12, "stop": ["5", "w2"], "include_stop_str_in_output": True,
           "skip_special_tokens": False},
          {"prompt": "w3 w4 w5 w3 w4", "max_tokens": 10, "policy": {"name": "ngram", "max_draft_len": 3}},
          {"prompt": "w3 w4 w5 w3 w4", "max_tokens": 10, "temperature": 0.8, "seed": 2,
           "policy": {"name": "greedy", "max_draft_len": 2, "lookup": {"max_draft_len": 4, "min_ngram": 2}}}]


def test_streamed_equals_complete_equals_engine(programs, server):
    lt = programs["load_test"]
    eng, svc = server.service.engine, server.service
    for body in BODIES:
        full = lt.complete(_url(server), body, stream=False)
        streamed = lt.complete(_url(server), body, stream=True)
        _, params, policy, *_ = svc.parse(body)
        alone = eng.generate([body["prompt"]], params, policy=policy)[0]
        assert full["status"] == streamed["status"] == 200
        assert full["token_ids"] == streamed["token_ids"] == alone.token_ids and alone.token_ids
        assert full["text"] == streamed["text"] == alone.text
        assert full["finish_reason"] == streamed["finish_reason"] == alone.finish_reason
    _all_free(eng)


def _sse(data: bytes) -> list[dict]:
    events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_as_openai_completions_give_them(server, stream):
    eng = server.service.engine
    body = {"prompt": "w1 w2 w3", "max_tokens": 10, "logprobs": 2, "stream": stream,
            "policy": {"name": "bild", "fallback_threshold": 0.3, "rollback_threshold": 2.0}}
    code, data = _raw(server, "POST", "/v1/completions", json.dumps(body).encode(),
                      {"Content-Type": "application/json"})
    assert code == 200
    choices = [e["choices"][0] for e in (_sse(data) if stream else [json.loads(data)])]
    lp = {k: sum((c["logprobs"][k] for c in choices), []) for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                      "text_offset")}
    _, params, policy, *_ = server.service.parse(body)
    alone = eng.generate([body["prompt"]], params, policy=policy)[0]
    ids = sum((c["token_ids"] for c in choices), [])
    assert ids == alone.token_ids and len(ids) == 10
    assert lp["token_logprobs"] == pytest.approx(alone.logprobs, abs=1e-9)
    assert lp["tokens"] == eng.token_texts(ids)
    assert [list(d) for d in lp["top_logprobs"]] == [eng.token_texts([t for t, _ in a]) for a in alone.top_logprobs]
    assert [v for d in lp["top_logprobs"] for v in d.values()] == pytest.approx(
        [v for a in alone.top_logprobs for _, v in a], abs=1e-9)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    plain = json.loads(_raw(server, "POST", "/v1/completions", json.dumps({"prompt": "w1", "max_tokens": 3}).encode(),
                            {"Content-Type": "application/json"})[1])
    assert "logprobs" not in plain["choices"][0]
    _all_free(eng)


CHAT = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w1 w2 w3"}]


def _post(server, path, body):
    code, data = _raw(server, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return code, (_sse(data) if body.get("stream") and code == 200 else json.loads(data))


@pytest.mark.parametrize("body", [
    {"messages": CHAT, "max_tokens": 10},
    {"messages": CHAT, "max_completion_tokens": 9, "temperature": 0.8, "seed": 5,
     "policy": {"name": "speculative-sampling"}},
    {"messages": CHAT[1:], "max_tokens": 10, "logprobs": True, "top_logprobs": 2,
     "policy": {"name": "bild", "fallback_threshold": 0.3, "rollback_threshold": 2.0}}])
def test_chat_completions_streamed_equal_complete_equal_engine(server, body):
    eng = server.service.engine
    _, params, policy, *_ = server.service.parse(body, "chat")
    alone = eng.generate([body["messages"]], params, policy=policy)[0]
    want_ids = eng.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
    assert alone.prompt_token_ids == list(want_ids["input_ids"]) and alone.token_ids
    code, full = _post(server, "/v1/chat/completions", body)
    assert code == 200 and full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    c = full["choices"][0]
    assert c["message"] == {"role": "assistant", "content": alone.text} and c["token_ids"] == alone.token_ids
    assert c["finish_reason"] == ("stop" if alone.finish_reason == "eos" else alone.finish_reason)
    assert full["usage"]["prompt_tokens"] == len(alone.prompt_token_ids)
    code, events = _post(server, "/v1/chat/completions", {**body, "stream": True})
    assert code == 200 and all(e["object"] == "chat.completion.chunk" for e in events)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d["content"] for d in deltas) == alone.text
    assert sum((e["choices"][0]["token_ids"] for e in events), []) == alone.token_ids
    assert events[-1]["choices"][0]["finish_reason"] == c["finish_reason"]
    if body.get("logprobs"):
        for got in (c["logprobs"]["content"], sum((e["choices"][0]["logprobs"]["content"] for e in events), [])):
            assert [x["logprob"] for x in got] == pytest.approx(alone.logprobs, abs=1e-9)
            assert [x["token"] for x in got] == eng.token_texts(alone.token_ids)
            assert all(x["bytes"] == list(x["token"].encode()) and len(x["top_logprobs"]) == 2 for x in got)
            assert [[a["token"] for a in x["top_logprobs"]] for x in got] == [
                eng.token_texts([t for t, _ in a]) for a in alone.top_logprobs]
    else:
        assert "logprobs" not in c
    _all_free(eng)


@pytest.mark.parametrize("body, match", [
    ({"max_tokens": 3}, "messages must be a non-empty list"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": ["w1"]}, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "w1"}]}, "message 0 must be"),
    ({"messages": [{"role": "user", "content": 3}]}, "message 0 must be"),
    ({"messages": [{"role": "user"}]}, "message 0 must be"),
    ({"messages": CHAT, "logprobs": 3}, "logprobs must be true or false"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 30}, "top_logprobs must be an int in [0, 20]"),
    ({"messages": CHAT, "max_tokens": 3, "max_completion_tokens": 3}, "not both"),
    ({"messages": CHAT, "prompt": "w1"}, "unsupported field(s): ['prompt']"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_tokens"),
    ({"messages": CHAT, "presence_penalty": 3}, "presence_penalty must be a number in [-2, 2]"),
    ({"messages": CHAT, "echo": False}, "unsupported field(s): ['echo']"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_hostile_chat_requests_get_clear_errors(server, body, match, stream):
    code, data = _post(server, "/v1/chat/completions", {**body, "stream": stream})
    assert code == 400 and match in data["error"]["message"], data
    _all_free(server.service.engine)


@pytest.mark.parametrize("prompt", ["w1 w2 w3 w4", [5, 17, 3, 44, 2]])
def test_echo_scores_the_prompt_as_lm_evaluation_harness_asks(server, prompt):
    """{"prompt", "max_tokens": 1, "logprobs": 1, "echo": true}: the prompt's tokens and their log-probabilities
    (the first null) before the completion's, each the large model's given what precedes it."""
    eng = server.service.engine
    body = {"prompt": prompt, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234}
    code, r = _post(server, "/v1/completions", body)
    assert code == 200, r
    c, ids = r["choices"][0], prompt if isinstance(prompt, list) else eng.tokenizer(prompt)["input_ids"]
    out = eng.generate([prompt], SamplingParams(max_tokens=1, logprobs=1))[0]
    lp = c["logprobs"]
    assert lp["tokens"] == eng.token_texts(ids + out.token_ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with_ctx = [eng.score(ids[:i], ids[i:i + 1])[0] for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(with_ctx, abs=1e-9)
    assert lp["token_logprobs"][len(ids):] == pytest.approx(out.logprobs, abs=1e-9)
    assert all(len(d) == 1 for d in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    head = prompt if isinstance(prompt, str) else eng.tokenizer.decode(prompt)
    assert c["text"] == head + out.text
    plain = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "echo": True})[1]["choices"][0]
    assert plain["text"].startswith(head) and "logprobs" not in plain
    _all_free(eng)


def test_a_batch_prompt_gets_one_choice_each_as_alone(server):
    """lm-evaluation-harness sends its requests as batches ("prompt": [[ids], [ids], ...]): one choice each, by
    index, each what that prompt gets alone."""
    eng = server.service.engine
    batch = [[5, 17, 3, 44, 2], "w1 w2 w3", [8, 9]]
    body = {"prompt": batch, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234}
    code, r = _post(server, "/v1/completions", body)
    assert code == 200, r
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for p, c in zip(batch, r["choices"]):
        alone = _post(server, "/v1/completions", {**body, "prompt": p})[1]["choices"][0]
        assert c["text"] == alone["text"] and c["token_ids"] == alone["token_ids"]
        assert c["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        assert c["logprobs"]["token_logprobs"][1:] == pytest.approx(alone["logprobs"]["token_logprobs"][1:], abs=1e-9)
    n_prompt = sum(len(p) if isinstance(p, list) else len(eng.tokenizer(p)["input_ids"]) for p in batch)
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 3, "total_tokens": n_prompt + 3,
                          "prompt_tokens_details": {"cached_tokens": 0}}  # (no prefix cache here)
    _all_free(eng)


@pytest.mark.parametrize("body, match", [
    ({"prompt": [[1, 2], [3, 500]]}, "prompt 1 holds token id 500"),
    ({"prompt": [[1, 2], ""]}, "prompt 1 is empty"),
    ({"prompt": [[1, 2], [1.5]]}, "a batch prompt must be a list of up to 64 prompts"),
    ({"prompt": [[1, 2]] * 65}, "a batch prompt must be a list of up to 64 prompts"),
    ({"prompt": ["w1", ""], "stream": True}, "prompt 1 is empty"),
])
def test_a_bad_batch_is_refused_whole(server, body, match):
    code, r = _post(server, "/v1/completions", body)
    assert code == 400 and match in r["error"]["message"], r
    _all_free(server.service.engine)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": ["w1 w2", [5, 17, 3]], "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3})])
def test_n_choices_are_the_prompt_sampled_with_seed_plus_i(server, path, body):
    eng, kind = server.service.engine, "text" if "prompt" in body else "chat"
    code, r = _post(server, path, body)
    assert code == 200, r
    prompts = body["prompt"] if kind == "text" else [body["messages"]]
    assert [c["index"] for c in r["choices"]] == list(range(3 * len(prompts)))
    _, params, policy, *_ = server.service.parse({**body, "n": 1}, kind)
    for j, p in enumerate(prompts):
        for i in range(3):
            alone = eng.generate([p], dataclasses.replace(params, seed=7 + i), policy=policy)[0]
            assert r["choices"][j * 3 + i]["token_ids"] == alone.token_ids
    assert len({tuple(c["token_ids"]) for c in r["choices"][:3]}) > 1  # sampled: the seeds differ
    # streamed (as OpenAI streams n choices): each event one choice's, by index; joined, the same choices; one id;
    # the usage of all in a last event with no choice
    code, events = _post(server, path, {**body, "stream": True})
    assert code == 200, events
    assert len({e["id"] for e in events}) == 1 and events[-1]["choices"] == []
    assert events[-1]["usage"] == r["usage"] and all("usage" not in e for e in events[:-1])
    for c in r["choices"]:
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == c["index"]]
        assert [t for m in mine for t in m["token_ids"]] == c["token_ids"]
        assert mine[-1]["finish_reason"] == c["finish_reason"] and all(m["finish_reason"] is None for m in mine[:-1])
        if kind == "text":
            assert "".join(m["text"] for m in mine) == c["text"]
        else:
            assert mine[0]["delta"]["role"] == "assistant" and all("role" not in m["delta"] for m in mine[1:])
            assert "".join(m["delta"].get("content") or "" for m in mine) == c["message"]["content"]
    _all_free(eng)


def test_a_request_without_a_seed_samples_with_a_fresh_random_one(server, monkeypatch):
    """OpenAI's and vLLM's meaning: a sampled request that gives no seed (or null) draws its own, so that two alike
    requests sample independently; one that gives a seed reproduces. The drawn seeds leave room for n choices."""
    import openai_api
    import openai_fields
    eng = server.service.engine
    drawn, bounds = iter([41, 42, 43]), []

    def randbelow(n):
        bounds.append(n)
        return next(drawn)
    monkeypatch.setattr(openai_fields.secrets, "randbelow", randbelow)
    body = {"prompt": "w1 w2", "max_tokens": 8, "temperature": 1.0, "n": 2}
    outs = [_post(server, "/v1/completions", b) for b in (body, {**body, "seed": None}, {**body, "seed": 41})]
    assert all(code == 200 for code, _ in outs), outs
    assert bounds == [2 ** 63 - openai_api.MAX_N] * 2  # drawn for the two requests without a seed, not the third
    _, params, policy, *_ = server.service.parse({**body, "n": 1, "seed": 0}, "text")
    for (_, r), seed in zip(outs, (41, 42, 41)):
        for i in range(2):
            alone = eng.generate(["w1 w2"], dataclasses.replace(params, seed=seed + i), policy=policy)[0]
            assert r["choices"][i]["token_ids"] == alone.token_ids
    assert outs[0][1]["choices"][0]["token_ids"] != outs[1][1]["choices"][0]["token_ids"]  # (seeds 41 and 42)
    _all_free(eng)


def test_a_server_seed_makes_unseeded_requests_reproducible(programs, server):
    """serve.py --seed (vLLM's): the seeds of requests that give none come from a generator seeded with it, so a
    restarted server samples alike for the same requests in the same order; requests that give one keep it."""
    serve = programs["serve"]
    assert serve.parser().parse_args(["--seed", "7"]).seed == 7
    body = {"prompt": "w1 w2", "max_tokens": 8, "temperature": 1.0}
    runs = []
    for seed in (7, 7, 8):
        srv = serve.make_server(server.service.engine, port=0, seed=seed)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            runs.append([_post(srv, "/v1/completions", b)[1]["choices"][0]["token_ids"]
                         for b in (body, body, {**body, "seed": 3})])
        finally:
            srv.shutdown()
            srv.server_close()
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]  # (a restart: the same draws; two requests: two draws)
    assert runs[2][:2] != runs[0][:2] and runs[2][2] == runs[0][2]  # (another server seed; a request's own seed)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        serve.make_server(server.service.engine, port=0, seed=-1)
    with pytest.raises(SystemExit, match="--seed must be >= 0"):
        serve.main(["--seed=-2"])
    _all_free(server.service.engine)


def _metrics(server) -> dict:
    code, data = _raw(server, "GET", "/metrics")
    assert code == 200
    out = {}
    for line in data.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_what_the_service_served(server):
    eng = server.service.engine
    before = _metrics(server)
    bodies = [{"prompt": "w1 w2 w3", "max_tokens": 7, "policy": {"name": "greedy", "max_draft_len": 3}},
              {"prompt": [5, 17, 3], "max_tokens": 5, "stream": True},
              {"messages": CHAT, "max_tokens": 4}]
    outs = []
    for b in bodies:
        path = "/v1/chat/completions" if "messages" in b else "/v1/completions"
        code, r = _post(server, path, b)
        assert code == 200
        outs.append(sum(len(e["choices"][0]["token_ids"]) for e in (r if b.get("stream") else [r])))
    assert _post(server, "/v1/completions", {"prompt": [1, 500]})[0] == 400  # refused by the engine: an error
    after = _metrics(server)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)
    assert delta('bild_requests_total{finish_reason="length"}') == 3
    assert delta('bild_requests_total{finish_reason="error"}') == 1
    assert delta("bild_generation_tokens_total") == sum(outs) == 16
    assert delta("bild_drafted_tokens_total") > 0 and delta("bild_accepted_tokens_total") >= 0
    assert delta("bild_prefill_chunks_total") > 0  # the chat request's prompt, 4 tokens a step
    assert delta("bild_time_to_first_token_seconds_count") == 3 and delta("bild_request_duration_seconds_count") == 4
    assert delta('bild_request_duration_seconds_bucket{le="+Inf"}') == 4
    # the refused request never got a row; each of the others made more than one token
    assert delta("bild_request_queue_time_seconds_count") == 3
    assert delta("bild_time_per_output_token_seconds_count") == 3
    assert delta("bild_request_generation_tokens_sum") == 16 and delta("bild_request_prompt_tokens_count") == 4
    assert delta('bild_request_generation_tokens_bucket{le="5"}') == 3  # (7, 5, 4 tokens and the refused one's 0)
    kept = {int(k.split('"')[1]): delta(k) for k in after if k.startswith("bild_verifications_total{")}
    assert sum(n * c for n, c in kept.items()) == delta("bild_accepted_tokens_total") and sum(kept.values()) > 0
    assert after['bild_kv_cache_usage_ratio{model="small"}'] == 0.0
    assert after["bild_running_requests"] == 0 and after["bild_waiting_requests"] == 0
    assert after["bild_preempted_requests"] == 0 and after["bild_preemptions_total"] == 0
    assert after['bild_free_kv_blocks{model="large"}'] == eng.kv_cache_blocks
    health = json.loads(_raw(server, "GET", "/health")[1])
    assert health["load"]["running"] == 0 and health["load"]["free_kv_blocks"]["small"] == eng.kv_cache_blocks


def test_tokenizer_routes_as_vllm_serves_them(server):
    eng = server.service.engine
    info = json.loads(_raw(server, "GET", "/tokenizer_info")[1])
    assert info["chat_template"] == eng.tokenizer.chat_template and info["model_max_length"] == eng.max_model_len
    assert set(info) >= {"eos_token", "bos_token", "pad_token"}
    code, r = _post(server, "/tokenize", {"prompt": "w1 w2 w3", "add_special_tokens": False})
    assert code == 200 and r["tokens"] == eng.tokenizer("w1 w2 w3", add_special_tokens=False)["input_ids"] == [1, 2, 3]
    assert r["count"] == 3 and r["max_model_len"] == eng.max_model_len
    code, r = _post(server, "/tokenize", {"messages": CHAT})
    assert code == 200 and r["tokens"] == eng.generate([CHAT], SamplingParams(max_tokens=1))[0].prompt_token_ids
    code, r = _post(server, "/detokenize", {"tokens": [1, 2, 3]})
    assert code == 200 and r["prompt"] == eng.tokenizer.decode([1, 2, 3])
    for path, body, match in [("/tokenize", {"prompt": 3}, "prompt must be a string"),
                              ("/tokenize", {}, "tokenize takes"),
                              ("/tokenize", {"prompt": "w1", "messages": CHAT}, "tokenize takes"),
                              ("/tokenize", {"prompt": "w1", "add_special_tokens": "no"}, "add_special_tokens"),
                              ("/tokenize", {"messages": [{"role": "robot", "content": "w1"}]}, "message 0 must be"),
                              ("/detokenize", {"tokens": [1, 500]}, "token ids must be ints in [0, 97)"),
                              ("/detokenize", {"tokens": "w1"}, "detokenize takes")]:
        code, r = _post(server, path, body)
        assert code == 400 and match in r["error"]["message"], (path, body, r)


def test_neutral_fields_clients_send_are_accepted(server):
    body = {"prompt": "w1 w2", "max_tokens": 5, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "best_of": 1, "n": 1, "stream_options": {"include_usage": True}}
    code, full = _post(server, "/v1/completions", body)
    assert code == 200 and len(full["choices"][0]["token_ids"]) == 5
    chat = {"messages": CHAT, "max_tokens": 5, "presence_penalty": 0.0, "frequency_penalty": 0, "logit_bias": None,
            "stream": True, "stream_options": {"include_usage": True}}
    code, events = _post(server, "/v1/chat/completions", chat)
    assert code == 200 and events[-1]["usage"]["completion_tokens"] == 5
    # what OpenAI's chat clients send at their defaults: the same reply as without them
    code, plain = _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 5})
    code, r = _post(server, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 5, "store": False, "service_tier": "auto", "modalities": ["text"],
        "audio": None, "prediction": None, "web_search_options": None, "verbosity": None, "metadata": {"app": "x"},
        "reasoning_effort": None, "user": "u1"})
    assert code == 200 and r["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    code, r = _post(server, "/v1/completions", {"prompt": "w1 w2", "max_tokens": 2, "suffix": None})
    assert code == 200
    for field, value, match in [("store", True, "store is not supported"), ("modalities", ["text", "audio"],
                                                                           "modalities is not supported"),
                                ("service_tier", "flex", "service_tier is not supported"),
                                ("metadata", {"a": 1}, "metadata must be an object of up to 16 string values"),
                                ("reasoning_effort", "max", "reasoning_effort must be one of"),
                                ("reasoning_effort", "low", "chat template has no reasoning effort")]:
        code, r = _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, field: value})
        assert code == 400 and match in r["error"]["message"], (field, r)
    code, r = _post(server, "/v1/completions", {"prompt": "w1", "suffix": "w2"})
    assert code == 400 and "suffix is not supported" in r["error"]["message"]
    _all_free(server.service.engine)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "w1 w2 w3", "max_tokens": 9, "presence_penalty": -2, "frequency_penalty": -1.5,
                         "repetition_penalty": 1.4, "min_tokens": 4}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 9, "frequency_penalty": -2, "min_tokens": 9,
                              "policy": {"name": "greedy", "max_draft_len": 3}}),
    ("/v1/completions", {"prompt": [5, 17, 3], "max_tokens": 9, "logit_bias": {"40": -100, "9": 7}, "min_tokens": 0})])
def test_penalties_reach_the_engine(server, path, body):
    eng, svc = server.service.engine, server.service
    code, r = _post(server, path, body)
    assert code == 200, r
    kind = "text" if path == "/v1/completions" else "chat"
    prompt, params, policy, *_ = svc.parse(body, kind)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty, params.min_tokens) == (
        body.get("presence_penalty", 0), body.get("frequency_penalty", 0), body.get("repetition_penalty", 1),
        body["min_tokens"])
    alone = eng.generate([prompt], params, policy=policy)[0]
    plain = eng.generate([prompt], SamplingParams(max_tokens=9), policy=policy)[0]
    assert r["choices"][0]["token_ids"] == alone.token_ids != plain.token_ids
    assert params.logit_bias == tuple(sorted((int(k), v) for k, v in body.get("logit_bias", {}).items()))
    _all_free(eng)


@pytest.mark.parametrize("path, constraint", [
    ("/v1/completions", {"guided_choice": [" w7 w8", " w9"]}),
    ("/v1/chat/completions", {"guided_regex": "( w[1-3]){1,3}"}),
    ("/v1/completions", {"structured_outputs": {"regex": "( w4| w5){2,3}"}}),
    ("/v1/completions", {"structured_outputs": {"choice": [" w6 w0"]}, "policy": {"name": "bild"}})])
def test_output_constraints_reach_the_engine(server, path, constraint):
    # (the tiny tokenizer's words read " wN" after another token; it has no EOS: stop id 95 ends the text. Each
    # pattern can be finished in tokens: " w60" could not, where " w6" is a token and "0" none, so the text would
    # end at " w6", the way out the engine takes where no token can continue a pattern)
    eng, svc = server.service.engine, server.service
    body = {**({"prompt": "w1 w2"} if path == "/v1/completions" else {"messages": CHAT}), "max_tokens": 8,
            "stop": [95], **constraint}
    code, r = _post(server, path, body)
    assert code == 200, r
    prompt, params, policy, *_ = svc.parse(body, "text" if path == "/v1/completions" else "chat")
    assert params.structured_outputs is not None
    alone = eng.generate([prompt], params, policy=policy)[0]
    ids = r["choices"][0]["token_ids"]
    assert ids == alone.token_ids and ids[-1] == 95
    pattern = params.structured_outputs.pattern()
    assert re.fullmatch(pattern, "".join(f" w{t}" for t in ids[:-1])), (ids, pattern)
    _all_free(eng)


def test_response_format_and_guided_json_parse_to_the_same_constraint(server):
    svc = server.service
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    bodies = [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
              {"guided_json": schema}, {"structured_outputs": {"json": schema}}]
    made = {svc.parse({"prompt": "w1", **b})[1].structured_outputs for b in bodies}
    assert len(made) == 1 and next(iter(made)).pattern().startswith(r"\{")
    so = svc.parse({"prompt": "w1", "response_format": {"type": "json_object"}})[1].structured_outputs
    assert so.json_object
    assert svc.parse({"prompt": "w1", "response_format": {"type": "text"}})[1].structured_outputs is None
    ws = svc.parse({"prompt": "w1", "guided_json": schema, "guided_whitespace_pattern": " *"})[1].structured_outputs
    assert ws.whitespace_pattern == " *"


def test_concurrent_clients_equal_alone(programs, server):
    lt = programs["load_test"]
    bodies = lt.request_mix(12, seed=1, max_tokens=12)
    res = lt.run_load(_url(server), bodies, clients=6, requests=36, seed=2)
    assert res["row"]["mismatches"] == 0 and not res["failures"], res["failures"]
    assert res["row"]["latency_p99_ms"] >= res["row"]["latency_p50_ms"] > 0
    _all_free(server.service.engine)


@pytest.mark.parametrize("body, status, match", [
    (b"{not json", 400, "invalid JSON"), (b"[1, 2]", 400, "JSON object"), (b"{}", 400, "prompt must be"),
    (json.dumps({"prompt": "w1", "max_tokens": -1}), 400, "max_tokens"),
    (json.dumps({"prompt": "w1", "temperature": "hot"}), 400, "temperature"),
    (json.dumps({"prompt": "w1", "priority": "high"}), 400, "priority must be an int"),
    (json.dumps({"prompt": "w1", "allowed_token_ids": []}), 400, "allowed_token_ids must be"),
    (json.dumps({"prompt": "w1", "stop_token_ids": [1, "x"]}), 400, "stop_token_ids must be a list of token ids"),
    (json.dumps({"prompt": "w1", "truncate_prompt_tokens": 0}), 400, "truncate_prompt_tokens must be"),
    (json.dumps({"prompt": "w1", "bad_words": [""]}), 400, "bad_words must be"),
    (json.dumps({"prompt": "w1", "allowed_token_ids": [1, 500]}), 400, "allowed_token_ids names token id 500"),
    (json.dumps({"prompt": "w1", "temperature": 1, "min_p": 2}), 400, "min_p must be"),
    (json.dumps({"prompt": "w1", "policy": {"name": "magic"}}), 400, "unknown policy"),
    (json.dumps({"prompt": "w1", "policy": {"name": "bild", "fallback_threshold": 7}}), 400, "fallback_threshold"),
    (json.dumps({"prompt": "w1", "policy": {"name": "shallow-deep", "exit_layer": 9}}), 400, "exit_layer"),
    (json.dumps({"prompt": "w1", "policy": "greedy"}), 400, "policy must be"),
    (json.dumps({"prompt": "w1", "policy": {"name": "ngram", "min_ngram": 5}}), 400, "min_ngram must be <="),
    (json.dumps({"prompt": "w1", "policy": {"name": "greedy", "lookup": {"depth": 2}}}), 400, "depth"),
    (json.dumps({"prompt": "w1", "policy": {"name": "greedy", "lookup": 3}}), 400, "dict of NGram's fields"),
    (json.dumps({"prompt": [1, 500]}), 400, "outside the vocabulary"),
    (json.dumps({"prompt": [1] * 80}), 400, "max_model_len"),
    (json.dumps({"prompt": ""}), 400, "empty"),
    (json.dumps({"prompt": "w1", "n": 17}), 400, "n must be an int in [1, 16]"),
    (json.dumps({"prompt": "w1", "n": 2, "seed": 2 ** 63 - 1}), 400, "seed must be an int"),
    (json.dumps({"prompt": "w1", "stop": {"a": 1}}), 400, "stop"),
    (json.dumps({"prompt": "w1", "stream": "yes"}), 400, "stream"),
    (json.dumps({"prompt": "w1", "timeout": -2}), 400, "timeout_s"),
    (json.dumps({"prompt": "w1", "logprobs": 21}), 400, "logprobs"),
    (json.dumps({"prompt": "w1", "logprobs": "all"}), 400, "logprobs"),
    (json.dumps({"prompt": "w1", "suffix": "w2"}), 400, "suffix is not supported"),
    (json.dumps({"prompt": [1, 500], "stream": True}), 400, "outside the vocabulary"),
    (json.dumps({"messages": [{"role": "user", "content": "w1"}]}), 400, "unsupported field(s): ['messages']"),
    (json.dumps({"prompt": "w1", "presence_penalty": 2.5}), 400, "presence_penalty must be a number in [-2, 2]"),
    (json.dumps({"prompt": "w1", "frequency_penalty": True}), 400, "frequency_penalty must be a number"),
    (json.dumps({"prompt": "w1", "repetition_penalty": 0}), 400, "repetition_penalty must be a finite number > 0"),
    (json.dumps({"prompt": "w1", "min_tokens": 20}), 400, "min_tokens must be an int in [0, max_tokens=16]"),
    (json.dumps({"prompt": "w1", "min_tokens": 2, "policy": {"name": "small-only"}}), 400, "verifies nothing"),
    (json.dumps({"prompt": "w1", "logit_bias": {"x5": 10}}), 400, "logit_bias must be an object"),
    (json.dumps({"prompt": "w1", "logit_bias": [5, 10]}), 400, "logit_bias must be an object"),
    (json.dumps({"prompt": "w1", "logit_bias": {"5": 500}}), 400, "logit_bias values must be numbers in [-100, 100]"),
    (json.dumps({"prompt": "w1", "logit_bias": {"500": 5}}), 400, "logit_bias names token id 500"),
    (json.dumps({"prompt": "w1", "echo": True, "stream": True}), 400, "echo is not supported with stream"),
    (json.dumps({"prompt": "w1", "echo": 1}), 400, "echo must be true or false"),
    (json.dumps({"prompt": "w1", "best_of": 3}), 400, "best_of is not supported"),
    (json.dumps({"prompt": "w1", "stream_options": {"include_usage": "yes"}}), 400, "stream_options must be"),
    (json.dumps({"prompt": "w1", "guided_regex": "(?=x)"}), 400, "lookarounds"),
    (json.dumps({"prompt": "w1", "guided_regex": "a", "guided_choice": ["b"]}), 400, "give one output constraint"),
    (json.dumps({"prompt": "w1", "response_format": {"type": "yaml"}}), 400, "response_format must be"),
    (json.dumps({"prompt": "w1", "guided_json": {"type": "number", "minimum": 1}}), 400, "'minimum'"),
    (json.dumps({"prompt": "w1", "structured_outputs": {"grammar": "x"}}), 400, "no field 'grammar'"),
    (json.dumps({"prompt": "w1", "guided_choice": ["a"]}), 400, "end-of-sequence"),
    (json.dumps({"prompt": "w1", "guided_choice": ["a"], "ignore_eos": True}), 400, "ignore_eos"),
    (json.dumps({"prompt": "w1", "guided_regex": "a", "guided_whitespace_pattern": " "}), 400, "goes with"),
])
def test_hostile_requests_get_clear_errors(server, body, status, match):
    body = body.encode() if isinstance(body, str) else body
    code, data = _raw(server, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
    assert code == status and match in json.loads(data)["error"]["message"]
    _all_free(server.service.engine)


def test_routes_and_limits(server):
    assert _raw(server, "GET", "/health")[0] == 200
    assert json.loads(_raw(server, "GET", "/v1/models")[1])["data"][0]["object"] == "model"
    assert _raw(server, "GET", "/nope")[0] == 404
    assert _raw(server, "POST", "/v1/chat", b"{}")[0] == 404
    assert _raw(server, "POST", "/v1/chat/completions", b"{}")[0] == 400
    assert _raw(server, "POST", "/v1/completions", b"x", {"Content-Length": str(1 << 24)})[0] == 413


def test_timeout_reports_partial_tokens(programs, server, monkeypatch):
    eng = server.service.engine
    step = eng._step
    monkeypatch.setattr(eng, "_step", lambda running, policy: time.sleep(0.03) or step(running, policy))
    res = programs["load_test"].complete(_url(server), {"prompt": "w3 w4", "max_tokens": 50, "timeout": 0.2,
                                                        "policy": {"name": "large-only"}}, stream=True)
    assert res["finish_reason"] == "timeout" and "timed out" in res["error"] and 0 < len(res["token_ids"]) < 50
    _all_free(eng)


def test_client_leaving_mid_stream_frees_its_blocks(server, monkeypatch):
    eng = server.service.engine
    step = eng._step
    monkeypatch.setattr(eng, "_step", lambda running, policy: time.sleep(0.01) or step(running, policy))
    body = json.dumps({"prompt": [3, 4], "max_tokens": 60, "stream": True, "policy": {"name": "large-only"}})
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while b"data: " not in got:  # the headers and the first event may come in separate reads
        part = sock.recv(4096)
        assert part, f"the server closed the stream before its first event: {got!r}"
        got += part
    assert eng._scheduler.running, "the request should still be running"
    sock.close()
    _all_free(eng)


WEATHER = {"type": "function", "function": {"name": "weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 4},
                                                "unit": {"enum": ["c", "f"]}, "rain": {"type": "boolean"}},
                                                "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}


@pytest.mark.parametrize("choice, parallel", [({"type": "function", "function": {"name": "weather"}}, True),
                                              ("required", False), ("required", True)])
def test_tool_calls_hold_to_the_functions_schemas(json_server, choice, parallel):
    svc = json_server.service
    body = {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 60, "tools": [WEATHER, TIME],
            "tool_choice": choice, "parallel_tool_calls": parallel, "policy": {"name": "bild"}}
    code, r = _post(json_server, "/v1/chat/completions", body)
    assert code == 200, r
    c = r["choices"][0]
    prompt, params, policy, *_ = svc.parse(body, "chat")
    assert prompt == [svc.engine.tokenize("yes", add_special_tokens=False)[0]]  # (the template was given the tools)
    alone = svc.engine.generate([prompt], params, policy=policy)[0]
    assert c["token_ids"] == alone.token_ids
    assert alone.finish_reason == "eos", alone  # (bounded schemas: the JSON always ends)
    calls = c["message"]["tool_calls"]
    assert c["message"]["content"] is None and calls and all(k["type"] == "function" for k in calls)
    if choice == "required":
        assert c["finish_reason"] == "tool_calls" and (parallel or len(calls) == 1)
    else:
        assert c["finish_reason"] == "stop" and len(calls) == 1 and calls[0]["function"]["name"] == "weather"
    for k in calls:
        args = json.loads(k["function"]["arguments"])
        if k["function"]["name"] == "weather":
            assert set(args) >= {"city", "unit"} and len(args["city"]) <= 4 and args["unit"] in ("c", "f")
        else:
            assert args == {"zone": "utc"} or args == {"zone": "cet"}
    assert len({k["id"] for k in calls}) == len(calls)


@pytest.mark.parametrize("extra, match", [
    ({"tools": [WEATHER]}, "--tool-call-parser hermes"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, 'tool_choice "auto"'),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"}, "each tool must be"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "twice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice must be"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "no other output constraint"),
    ({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "number", "minimum": 2}}}],
      "tool_choice": "required"}, "'minimum'")])
def test_tool_requests_it_cannot_serve_get_clear_errors(json_server, extra, match):
    body = {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 8, **extra}
    code, r = _post(json_server, "/v1/chat/completions", body)
    assert code == 400 and match in r["error"]["message"], r


def test_tool_choice_none_is_a_plain_reply(json_server):
    body = {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 5, "tools": [WEATHER],
            "tool_choice": "none"}
    code, r = _post(json_server, "/v1/chat/completions", body)
    assert code == 200 and "tool_calls" not in r["choices"][0]["message"]


def test_a_tool_reply_that_is_not_whole_json_comes_back_as_content(programs):
    # (max_tokens, a timeout, or tokens that cannot write a function's name: the text, no calls)
    tool_message = importlib.import_module("tool_calls").tool_message
    named = {"mode": "named", "name": "f"}
    assert tool_message('{"a": 1}', "eos", named, "c")[0]["tool_calls"][0]["function"] == {"name": "f",
                                                                                          "arguments": '{"a": 1}'}
    assert tool_message('{"a": ', "length", named, "c") == ({"role": "assistant", "content": '{"a": '}, "length")
    required = {"mode": "required", "names": ["f", "g"]}
    assert tool_message('[{"name": "ge', "eos", required, "c") == (
        {"role": "assistant", "content": '[{"name": "ge'}, "stop")
    msg, reason = tool_message('[{"name": "f", "parameters": {}}, {"name": "g", "parameters": {"x":1}}]', "eos",
                               required, "c")
    assert reason == "tool_calls" and [c["function"]["arguments"] for c in msg["tool_calls"]] == ["{}", '{"x":1}']
    assert tool_message('[{"name": "h", "parameters": {}}]', "eos", required, "c")[1] == "stop"  # (not a tool's)


@pytest.mark.parametrize("parallel", [True, False])
def test_a_required_reply_streams_its_calls_as_they_come(json_server, parallel):
    """tool_choice "required" streamed (as vLLM streams it): each call's id and name once its parameters begin, then
    their text, joining to the whole reply's calls; finish_reason "tool_calls"."""
    body = {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 60, "tools": [WEATHER, TIME],
            "tool_choice": "required", "parallel_tool_calls": parallel, "policy": {"name": "bild"}}
    code, whole = _post(json_server, "/v1/chat/completions", body)
    code2, events = _post(json_server, "/v1/chat/completions", {**body, "stream": True})
    assert code == code2 == 200, events
    want = [(k["function"]["name"], k["function"]["arguments"]) for k in whole["choices"][0]["message"]["tool_calls"]]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert [(n, a) for _, n, a in joined_calls(deltas)] == want and want
    assert not "".join(d.get("content") or "" for d in deltas) and events[-1]["choices"][0]["finish_reason"] == \
        "tool_calls" == whole["choices"][0]["finish_reason"]
    assert sum("tool_calls" in d for d in deltas) > len(want)  # (the arguments in pieces, not whole at the end)
    _all_free(json_server.service.engine)


def test_a_named_tool_call_streams_its_arguments(json_server):
    body = {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 60, "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "weather"}}}
    code, whole = _post(json_server, "/v1/chat/completions", body)
    code2, events = _post(json_server, "/v1/chat/completions", {**body, "stream": True})
    assert code == code2 == 200
    deltas = [e["choices"][0]["delta"] for e in events]
    first = deltas[0]["tool_calls"][0]
    assert deltas[0]["content"] is None and first["function"]["name"] == "weather" and first["type"] == "function"
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
    call = whole["choices"][0]["message"]["tool_calls"][0]
    assert args == call["function"]["arguments"] and first["id"].startswith("call-")  # (ids: per request)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_priority_reaches_the_engine(server):
    """vLLM's `priority` field (the lower, the sooner) in both routes."""
    svc = server.service
    for path, body in (("/v1/completions", {"prompt": [5, 17, 3], "max_tokens": 4, "priority": -2}),
                       ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "priority": 7})):
        code, r = _post(server, path, body)
        assert code == 200, r
        _, params, *_ = svc.parse(body, "text" if path == "/v1/completions" else "chat")
        assert params.priority == body["priority"]
    _all_free(svc.engine)


def test_allowed_token_ids_and_bad_words_reach_the_engine(server):
    """vLLM's `allowed_token_ids` and `bad_words` fields."""
    eng, svc = server.service.engine, server.service
    body = {"prompt": [5, 17, 3], "max_tokens": 6, "allowed_token_ids": [2, 4, 6, 8, 10], "bad_words": ["w4"]}
    code, r = _post(server, "/v1/completions", body)
    assert code == 200, r
    ids = r["choices"][0]["token_ids"]
    assert set(ids) <= {2, 6, 8, 10}
    prompt, params, policy, *_ = svc.parse(body, "text")
    assert ids == eng.generate([prompt], params, policy=policy)[0].token_ids
    _all_free(eng)


def test_stop_token_ids_and_truncate_prompt_tokens_reach_the_engine(server):
    """vLLM's `stop_token_ids` (ids that end the request) and `truncate_prompt_tokens` (the prompt's last k)."""
    eng, svc = server.service.engine, server.service
    code, r = _post(server, "/v1/completions", {"prompt": [5, 17, 3], "max_tokens": 8})
    first = r["choices"][0]["token_ids"]
    code, r = _post(server, "/v1/completions", {"prompt": [5, 17, 3], "max_tokens": 8, "stop_token_ids": [first[2]]})
    assert code == 200 and r["choices"][0]["token_ids"] == first[:first.index(first[2]) + 1]
    assert r["choices"][0]["finish_reason"] == "stop"
    long = [(5 * i + 2) % 90 for i in range(70)]
    code, r = _post(server, "/v1/completions", {"prompt": long, "max_tokens": 4, "truncate_prompt_tokens": 10})
    assert code == 200 and r["usage"]["prompt_tokens"] == 10
    assert r["choices"][0]["token_ids"] == eng.generate([long[-10:]], SamplingParams(max_tokens=4),
                                                        policy=svc.policy(None))[0].token_ids
    _all_free(eng)


def test_hermes_tool_calls_are_read_from_a_reply(programs):
    api = importlib.import_module("tool_calls")
    names = ["weather", "clock"]
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "oslo"}}\n</tool_call>'
    assert api.parse_tool_calls("no calls here", names) is None
    assert api.parse_tool_calls(call, names) == (None, [("weather", '{"city": "oslo"}')])
    two = f'Let me look.\n{call}\n<tool_call>{{"name": "clock", "parameters": {{"zone": "utc"}}}}</tool_call>'
    assert api.parse_tool_calls(two, names) == ("Let me look.", [("weather", '{"city": "oslo"}'),
                                                                 ("clock", '{"zone": "utc"}')])
    # (the reply ended inside its last block, its JSON whole: read; cut inside the JSON: no call)
    assert api.parse_tool_calls('<tool_call>{"name": "clock", "arguments": "{}"}', names) == (None, [("clock", "{}")])
    assert api.parse_tool_calls('<tool_call>{"name": "clock", "argu', names) is None
    assert api.parse_tool_calls('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', names) is None  # unknown
    assert api.parse_tool_calls("<tool_call>{not json}</tool_call>", names) is None
    # streamed: the content goes out until a call may begin (a split tag held back), then the call's id and name once
    # its arguments begin, and their text as it comes
    spec = {"mode": "auto", "names": names, "parser": "hermes"}
    text = f"Sure <tool_c, hm. {call}"
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    s = api.AutoToolStream(spec, "call-7")
    outs = [s.delta({"content": p}, i == len(pieces) - 1, None) for i, p in enumerate(pieces)]
    sent = "".join(d.get("content") or "" for d, _ in outs)
    assert sent == "Sure <tool_c, hm. " and outs[-1][1] == "tool_calls"  # (the space went out before the tag came)
    assert joined_calls(d for d, _ in outs) == [("call-7-0", "weather", '{"city": "oslo"}')]
    assert sum("tool_calls" in d for d, _ in outs[:-1]) > 3  # (not all at the end)
    s = api.AutoToolStream(spec, "call-8")  # no call after all: the held tail goes out at the end
    outs = [s.delta({"content": "a <tool"}, False, None), s.delta({"content": "box>"}, True, "stop")]
    assert [d["content"] for d, _ in outs] == ["a ", "<toolbox>"] and outs[-1][1] == "stop"


def joined_calls(deltas) -> list[tuple[str, str, str]]:
    """Streamed tool_calls deltas put together by index: [(id, name, arguments)]."""
    calls: dict = {}
    for d in deltas:
        for k in d.get("tool_calls") or []:
            c = calls.setdefault(k["index"], ["", "", ""])
            c[0] = k.get("id") or c[0]
            c[1] = k.get("function", {}).get("name") or c[1]
            c[2] += k.get("function", {}).get("arguments") or ""
    return [tuple(c) for _, c in sorted(calls.items())]


ARGS = '{"city": "o\\"s}lo", "n": [1, {"a": "]"}], "x": null}'  # (escaped quotes, brackets inside strings)


@pytest.mark.parametrize("size", [1, 2, 5, 11, 1000])
@pytest.mark.parametrize("text, want", [
    (f'<tool_call>{{"name": "weather", "arguments": {ARGS}}}</tool_call>', [("weather", ARGS)]),
    (f'Two. <tool_call>\n{{"name": "weather", "arguments": {{}}}}\n</tool_call>\n<tool_call>{{"name":"clock",'
     f'"arguments":{ARGS} }}</tool_call>', [("weather", "{}"), ("clock", ARGS)]),
    ('<tool_call>{"arguments": {"zone": "utc"}, "name": "clock"}</tool_call>',  # (arguments first: whole, at the end)
     [("clock", '{"zone": "utc"}')]),
    ('<tool_call>{"name": "clock", "arguments": "{}"}</tool_call>', [("clock", "{}")])])  # (a string: at the end)
def test_hermes_calls_stream_as_they_come_and_join_to_the_whole(programs, size, text, want):
    """Streamed in pieces of any size, a Hermes reply's calls join to what the whole reply's parse gives (the
    arguments' text as written where the call is written name first), ids in order."""
    api = importlib.import_module("tool_calls")
    names = ["weather", "clock"]
    assert api.parse_tool_calls(text, names)[1] == want
    s = api.AutoToolStream({"mode": "auto", "names": names, "parser": "hermes"}, "call-3")
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    outs = [s.delta({"content": p}, i == len(pieces) - 1, "stop") for i, p in enumerate(pieces)]
    assert joined_calls(d for d, _ in outs) == [(f"call-3-{k}", n, a) for k, (n, a) in enumerate(want)]
    assert outs[-1][1] == "tool_calls"
    content = "".join(d.get("content") or "" for d, _ in outs)
    assert content.strip() == (api.parse_tool_calls(text, names)[0] or "")


@pytest.mark.parametrize("parser, text", [
    ("hermes", '<tool_call>{"name": "clock", "arguments": {}}</tool_call><tool_call>{"name": "weather", "arguments": '
               '{"city": "oslo"}}</tool_call>'),
    ("mistral", '[TOOL_CALLS][{"name": "clock", "arguments": {}}, {"name": "weather", "arguments": {"city": "x"}}]')])
def test_parallel_tool_calls_false_keeps_the_first_call(programs, parser, text):
    """tool_choice "auto" with parallel_tool_calls false: the first call the model wrote, whole and streamed."""
    api, tools = importlib.import_module("tool_calls"), importlib.import_module("openai_api")
    spec = tools.tool_spec({"tools": [TIME, WEATHER], "parallel_tool_calls": False}, parser)
    msg, reason = api.tool_message(text, "eos", spec, "call-5")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["clock"] and reason == "tool_calls"
    s = api.AutoToolStream(spec, "call-5")
    outs = [s.delta({"content": text[i:i + 3]}, i + 3 >= len(text), "stop") for i in range(0, len(text), 3)]
    assert joined_calls(d for d, _ in outs) == [("call-5-0", "clock", "{}")]
    both = api.tool_message(text, "eos", tools.tool_spec({"tools": [TIME, WEATHER]}, parser), "call-5")[0]
    assert len(both["tool_calls"]) == 2  # (the default: every call)


def test_a_hermes_reply_that_breaks_after_its_call_began_keeps_what_streamed(programs):
    api = importlib.import_module("tool_calls")
    s = api.AutoToolStream({"mode": "auto", "names": ["clock"], "parser": "hermes"}, "call-4")
    outs = [s.delta({"content": '<tool_call>{"name": "clock", "arguments": {"zone": '}, False, None),
            s.delta({"content": '"utc"'}, True, "length")]  # (cut by max_tokens: no whole JSON)
    assert joined_calls(d for d, _ in outs) == [("call-4-0", "clock", '{"zone": "utc"')]
    assert outs[-1][1] == "tool_calls"


@pytest.fixture(scope="module")
def hermes_server(programs):
    """A tiny pair whose tokenizer can write Hermes' tool-call tags and JSON, served with --tool-call-parser hermes."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from bild_kernels import Engine

    from .engine.conftest import shallow_copy, tiny_llama
    from .engine.test_structured_outputs import EOS, PIECES, V
    vocab = {w: i for i, w in enumerate(dict.fromkeys(PIECES))}
    vocab.update({"<unk>": len(PIECES), "</s>": EOS, "<tool_call>": EOS + 1, "</tool_call>": EOS + 2})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    tok.chat_template = "{% if tools %}yes{% else %}no{% endif %}"
    large = tiny_llama(21, layers=3, vocab=V)
    large.config.eos_token_id = EOS
    small = shallow_copy(large, layers=2, noise=0.3)
    small.config.eos_token_id = EOS
    engine = Engine(large=large, small=small, tokenizer=tok, dtype=torch.float64, max_model_len=128, block_size=4)
    srv = programs["serve"].make_server(engine, port=0, max_pending=16, tool_call_parser="hermes")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_auto_reads_the_calls_the_model_writes(hermes_server, stream):
    """The model's reply held (by a guided regex) to content and then a Hermes call: the reply's message carries the
    content and the call, finish_reason "tool_calls"; held to plain text, it is a plain reply."""
    call = r'ok <tool_call>\{"name": "weather", "arguments": \{"city": "[a-z]{1,4}", "unit": "c"\}\}</tool_call>'
    base = {"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 60, "tools": [WEATHER, TIME],
            "stream": stream}
    code, r = _post(hermes_server, "/v1/chat/completions", {**base, "guided_regex": call})
    assert code == 200, r
    if stream:
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in r)
        calls = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                 for i, n, a in joined_calls(e["choices"][0]["delta"] for e in r)]
        reason = r[-1]["choices"][0]["finish_reason"]
    else:
        msg = r["choices"][0]["message"]
        content, calls, reason = msg["content"], msg["tool_calls"], r["choices"][0]["finish_reason"]
    assert content.strip() == "ok" and reason == "tool_calls" and len(calls) == 1
    assert calls[0]["function"]["name"] == "weather" and calls[0]["type"] == "function"
    args = json.loads(calls[0]["function"]["arguments"])
    assert set(args) == {"city", "unit"} and args["unit"] == "c"
    code, r = _post(hermes_server, "/v1/chat/completions", {**base, "guided_regex": "(yes|no)"})
    assert code == 200, r
    if stream:
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in r) in ("yes", "no")
        assert not any("tool_calls" in e["choices"][0]["delta"] for e in r)
    else:
        assert r["choices"][0]["message"]["content"] in ("yes", "no") and "tool_calls" not in r["choices"][0]["message"]
    _all_free(hermes_server.service.engine)


@pytest.mark.parametrize("size", [1, 4, 1000])
@pytest.mark.parametrize("parser, text, want", [
    ("mistral", 'Checking.[TOOL_CALLS][{"name": "weather", "arguments": {"city": "oslo"}}, '
                '{"name": "clock", "arguments": {"zone": "utc"}}]',
     ("Checking.", [("weather", '{"city": "oslo"}'), ("clock", '{"zone": "utc"}')])),
    ("mistral", '[TOOL_CALLS] {"name": "clock", "arguments": {}}', (None, [("clock", "{}")])),
    ("mistral", f'[TOOL_CALLS][{{"name":"weather","arguments":{ARGS.replace(", ", ",")}}},{{"arguments": '
                '{"zone":"utc"}, "name": "clock"}]',  # (the second written arguments first: re-serialised, at the end)
     (None, [("weather", ARGS.replace(", ", ",")), ("clock", '{"zone": "utc"}')])),
    ("mistral", "[TOOL_CALLS][{\"name\": \"clock\", \"argu", None),  # (cut inside the JSON)
    ("mistral", "no calls", None),
    ("llama3_json", '{"name": "weather", "parameters": {"city": "oslo"}}', (None, [("weather", '{"city": "oslo"}')])),
    ("llama3_json", '<|python_tag|>{"name": "clock", "parameters": {"zone": "utc"}}; {"name": "weather", '
                    '"parameters": {}}', (None, [("clock", '{"zone": "utc"}'), ("weather", "{}")])),
    ("llama3_json", 'It is {"name": "clock"}', None),  # (a call is the whole reply)
    ("llama3_json", '{"name": "rm", "parameters": {}}', None),
    ("granite", '<|tool_call|>[{"name": "weather", "arguments": {"city": "oslo"}}, {"name": "clock", "arguments": '
                '{"zone": "utc"}}]', (None, [("weather", '{"city": "oslo"}'), ("clock", '{"zone": "utc"}')])),
    ("granite", f' <tool_call>[{{"name":"weather","arguments":{ARGS.replace(", ", ",")}}}]',  # (Granite 3.1+)
     (None, [("weather", ARGS.replace(", ", ","))])),
    ("granite", 'Sure. <|tool_call|>[{"name": "clock", "arguments": {}}]', None),  # (the calls are the whole reply)
    ("granite", '<tool_call>{"name": "clock", "arguments": {}}</tool_call>', None)])  # (Hermes', not a list)
def test_mistral_and_llama3_tool_calls_are_read_from_a_reply(programs, parser, text, want, size):
    """Whole, and streamed in pieces: the content, then the calls as they come (those written name first; their
    arguments as written), joining to the whole reply's calls; or, where the text holds none, the text as content."""
    api = importlib.import_module("tool_calls")
    assert api.parse_tool_calls(text, ["weather", "clock"], parser) == want
    s = api.AutoToolStream({"mode": "auto", "names": ["weather", "clock"], "parser": parser}, "call-1")
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    outs = [s.delta({"content": p}, i == len(pieces) - 1, "stop") for i, p in enumerate(pieces)]
    content = "".join(d.get("content") or "" for d, _ in outs)
    if want is None:
        assert content == text and outs[-1][1] == "stop" and not joined_calls(d for d, _ in outs)
    else:
        assert content.strip() == (want[0] or "") and outs[-1][1] == "tool_calls"
        assert joined_calls(d for d, _ in outs) == [(f"call-1-{k}", n, a) for k, (n, a) in enumerate(want[1])]


def test_a_llama3_reply_that_goes_on_after_its_call_keeps_the_streamed_call(programs):
    """Llama's calls are the whole reply: one followed by text is no call whole, but streamed, the call went out
    before the text came (vLLM's streaming has it so too)."""
    api = importlib.import_module("tool_calls")
    text = '{"name": "clock", "parameters": {}} and more'
    assert api.parse_tool_calls(text, ["clock"], "llama3_json") is None
    s = api.AutoToolStream({"mode": "auto", "names": ["clock"], "parser": "llama3_json"}, "call-2")
    outs = [s.delta({"content": text[i:i + 4]}, i + 4 >= len(text), "stop") for i in range(0, len(text), 4)]
    assert joined_calls(d for d, _ in outs) == [("call-2-0", "clock", "{}")] and outs[-1][1] == "tool_calls"


def test_the_mistral_parser_keeps_special_tokens_in_the_text(programs, server):
    api = importlib.import_module("openai_api")
    svc = api.Service(server.service.engine, tool_call_parser="mistral")
    body = {"messages": CHAT, "max_tokens": 4, "tools": [WEATHER]}
    assert svc.parse(body, "chat")[1].skip_special_tokens is False
    assert svc.parse({"messages": CHAT, "max_tokens": 4}, "chat")[1].skip_special_tokens is True
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        api.Service(server.service.engine, tool_call_parser="xml")


def test_max_tokens_defaults_as_openai_s(server):
    """Absent: 16 for completions, the rest of the context for chat (OpenAI's defaults); null: the rest of the
    context (vLLM's reading), where the engine stops the request (finish_reason "length")."""
    eng, limit = server.service.engine, server.service.engine.max_model_len
    code, r = _post(server, "/v1/completions", {"prompt": [5, 17, 3]})
    assert code == 200 and r["usage"]["completion_tokens"] == 16
    for path, body in (("/v1/completions", {"prompt": [5, 17, 3], "max_tokens": None}),
                       ("/v1/chat/completions", {"messages": CHAT}),
                       ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": None})):
        code, r = _post(server, path, {**body, "ignore_eos": True})
        assert code == 200, r
        assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == limit
        assert r["choices"][0]["finish_reason"] == "length"
    _all_free(eng)

"""A small streaming HTTP service on bild_kernels' public API: OpenAI-style completions.

    python python/serve.py [--large DIR --small DIR] [--port 8000]     # default: Engine()'s default pair

Endpoints (JSON; errors are {"error": {"message", "type"}} with status 400 / 404 / 413 / 503):
  GET  /health            {"status": "ok", ...}
  GET  /v1/models         the served model (its name, max_model_len)
  GET  /metrics           Prometheus text: requests by finish reason, tokens, drafts kept (by accepted length),
                          vLLM's request histograms (TTFT, TPOT, queue time, ...), the engine's load and KV usage
                          (python/serve_metrics.py)
  GET  /tokenizer_info    the tokenizer's special tokens and chat template (as vLLM's)
  POST /tokenize          {prompt: str, add_special_tokens=true} | {messages: [...]} -> {tokens, count, max_model_len}
  POST /detokenize        {tokens: [ids]} -> {prompt: text}
  POST /v1/completions    {prompt: str | [token ids] | a list of those (a batch: one choice each),
                           max_tokens=16 (null: the rest of the context), temperature=0, top_p=1, top_k=0,
                           min_p=0 (vLLM's: keep tokens at least min_p times as likely as the most likely), seed
                           (absent or null: a random one),
                           stop: str | [str | id], stream=false, timeout: seconds, policy: {"name": "bild"|
                           "greedy"|"speculative-sampling"|"large-only"|"small-only"|"jacobi"|"shallow-deep"|
                           "ngram", ...the policy's keyword arguments; "lookup": {NGram's} for the drafting ones},
                           logprobs: null | 0..20, n=1..16: choices per prompt, the i-th sampled with seed + i;
                           several choices stream as OpenAI's do: an event a choice's delta, by index, then one
                           with no choice and the usage}
  POST /v1/chat/completions
                          {messages: [{role: "system"|"user"|"assistant"|"tool", content: str, ...}, ...],
                           max_tokens (or max_completion_tokens; absent or null: the rest of the context),
                           logprobs: bool, top_logprobs: 0..20, and the fields above
                           but prompt}: the messages through the model's chat template; OpenAI's chat.completion
                           reply (choices[0].message.content, or with "stream": true chat.completion.chunk events
                           whose choices[0].delta carries the new text); finish_reason "stop" for an EOS
  POST /v1/responses      OpenAI's Responses API, served as the chat request it asks for (python/responses_api.py):
                          {input: text | items, instructions, max_output_tokens, tools, tool_choice, text.format,
                           stream, ...} -> a response object, or its typed events
presence_penalty and frequency_penalty (OpenAI's, in [-2, 2]), vLLM's repetition_penalty (> 0) and min_tokens (EOS
and stop ids held back until the output has that many tokens), and logit_bias ({"token id": bias in [-100, 100]},
added first) shape the large model's distribution, what every policy verifies against (SamplingParams); vLLM's
include_stop_str_in_output and skip_special_tokens (default true) shape the text; an output constraint holds the
text to a pattern (SamplingParams.structured_outputs): OpenAI's response_format ({"type": "json_object"} or
{"type": "json_schema", "json_schema": {"name", "schema"}}), vLLM's structured_outputs ({"json" | "regex" | "choice" |
"json_object"}) or its guided_json / guided_regex / guided_choice (+ guided_whitespace_pattern); (chat) tools with
tool_choice naming a function (the reply is message.tool_calls: one call, its arguments held to the function's
parameters schema, finish_reason "stop") or "required" (one or more calls, finish_reason "tool_calls"; one with
parallel_tool_calls false), the tools shown to the chat template; "auto" (the model decides; its calls read by
--tool-call-parser hermes | mistral | llama3_json, refused without one), "none" ignores them; a named one streams
(delta.tool_calls[0].function.arguments), "auto" streams its content, then Hermes' calls as they come (others at the
end: python/tool_calls.py), "required" does not;
(completions) best_of 1 is accepted as the no-op it is, other values refused. stream_options is accepted (the last event carries the
usage either way). With "stream": true the reply is server-sent events, one `data: {...}` per committed run of tokens
and `data: [DONE]` at the end. Each choice carries, besides OpenAI's text and finish_reason, the token ids
("token_ids") and, at the end, the engine's "error" when the request ended early (finish_reason "error" or
"timeout"). With "logprobs": n, each choice also carries OpenAI's "logprobs" object for its tokens: "tokens" (each
token's own text), "token_logprobs" (under the model that decided it: the large one, SmallOnly's small one; before
temperature and the filters), "top_logprobs" (the n most likely tokens there, text -> logprob) and "text_offset"
(where each token's text starts in the completion, counting the tokens' own texts). "echo": true (not with
stream) puts the prompt before the text and, with logprobs, its tokens before the choice's, the first with logprob
null: what lm-evaluation-harness's loglikelihood requests read. Every request thread calls the one Engine:
requests join its running batch as they come. A client that goes away (mid-stream, or before a whole reply: its
connection is watched) cancels its requests, which frees their KV blocks at once. The request and reply formats
are python/openai_api.py's; this file is the HTTP.

Chat requests also take vLLM's chat_template_kwargs (the template's variables: Qwen3's {"enable_thinking": false}),
add_generation_prompt and continue_final_message (the assistant's last message left open: the reply goes on from
it). --reasoning-parser deepseek_r1 | qwen3 puts a reply's thinking in message.reasoning_content (streamed:
delta.reasoning_content) and the rest in content (python/reasoning.py); an output constraint then holds the answer
after the thinking, which stays free. --api-key (or $BILD_API_KEY) makes the /v1 routes ask for `Authorization: Bearer <key>` (401 otherwise;
/health, /metrics and the tokenizer routes stay open, as vLLM's); --served-model-name NAME names the model and refuses
requests naming another (404); --chat-template replaces the tokenizer's chat template; --allowed-origins lets browser
pages on those origins call it (CORS); usage carries
prompt_tokens_details.cached_tokens (the prefix cache's share of the prompt); GET /version. SIGTERM or Ctrl-C
drains: /health and new requests get a 503 at once, the requests in flight finish (up to --shutdown-timeout
seconds), then the server exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import bild_kernels
from bild_kernels import Engine
from openai_api import (MAX_BODY, ROUTES, TOKENIZER_ROUTES, BadRequest, Service, _chain, _refused, _usage, is_batch,
                        total_usage)
from reasoning import REASONING_PARSERS, ReasoningStream, reasoning_delta, reasoning_message
from responses_api import ResponseStream, chat_body, response_object
from tool_calls import AutoToolStream, tool_delta, tool_message

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may stall while sending its request (slow clients hold no engine state)
    service: Service  # set by make_server

    def log_message(self, fmt, *args):  # quiet by default; --log turns it on
        if getattr(self.server, "log", False):
            super().log_message(fmt, *args)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _cors_origin(self) -> str | None:
        """The request's Origin where the server lets browsers on it call (--allowed-origins), else None."""
        origin, allowed = self.headers.get("Origin"), getattr(self.server, "allowed_origins", ())
        return origin if origin and ("*" in allowed or origin in allowed) else None

    def end_headers(self) -> None:
        origin = self._cors_origin()
        if origin is not None:  # (CORS: a browser page on an allowed origin may read the reply)
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def do_OPTIONS(self):
        """A browser's CORS preflight (it carries no API key): the methods and headers a page may send, where its
        origin is allowed; a bare 204 (which the browser refuses) otherwise."""
        self.send_response(204)
        if self._cors_origin() is not None:
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers",
                             self.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type"))
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, status: int, data: bytes, content_type: str, headers: tuple = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind}})

    def _authorized(self) -> bool:
        """Whether the request may go on: the /v1 routes need `Authorization: Bearer <key>` when the server has an
        API key (vLLM's --api-key); otherwise a 401 is sent."""
        key = getattr(self.server, "api_key", None)
        if key is None or not self.path.startswith("/v1/"):
            return True
        if hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            return True
        self.close_connection = True  # (a body left unread)
        self._send(401, json.dumps({"error": {"message": "missing or wrong API key (Authorization: Bearer <key>)",
                                              "type": "authentication_error"}}).encode(), "application/json",
                   (("WWW-Authenticate", "Bearer"),))
        return False

    def do_GET(self):
        if not self._authorized():
            return
        if self.path == "/health":
            eng = self.service.engine
            draining = getattr(self.server, "draining", False)  # (a load balancer stops sending work here)
            self._json(503 if draining else 200, {
                "status": "draining" if draining else "ok", "max_batch_size": eng.max_batch_size,
                "kv_cache_blocks": eng.kv_cache_blocks, "load": eng.load()})
        elif self.path == "/version":
            self._json(200, {"version": bild_kernels.__version__})
        elif self.path == "/v1/models":
            svc = self.service
            self._json(200, {"object": "list", "data": [{
                "id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "bild",
                "max_model_len": svc.engine.max_model_len}]})
        elif self.path == "/metrics":
            text = self.service.metrics.render(self.service.engine.load())
            self._send(200, text.encode(), "text/plain; version=0.0.4")
        elif self.path == "/tokenizer_info" and self.service.engine.tokenizer is not None:
            self._json(200, self.service.tokenizer_info())
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
        if not self._authorized():
            return
        kind = ROUTES.get(self.path) or TOKENIZER_ROUTES.get(self.path)
        if kind is None:
            return self._error(404, f"no route {self.path}", "not_found")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "Content-Length required")
        if not 0 <= n <= MAX_BODY:
            self.close_connection = True
            return self._error(413, f"body over {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._error(400, f"invalid JSON: {e}")
        svc = self.service
        if kind in ("tokenize", "detokenize"):
            try:
                return self._json(200, svc.tokenize(body) if kind == "tokenize" else svc.detokenize(body))
            except (BadRequest, ValueError) as e:
                return self._error(400, str(e))
        responses = None  # (the Responses API's body: it is served as the chat request it asks for)
        try:
            if kind == "responses":
                responses, body, kind = body, chat_body(body), "chat"
            req = svc.parse(body, kind)
        except BadRequest as e:
            return self._error(e.status, str(e))
        if getattr(self.server, "draining", False):
            return self._error(503, "server shutting down", "unavailable")
        if not svc.admit():
            return self._error(503, "server busy: too many requests in flight", "overloaded")
        try:
            if req.stream:
                self._stream(req, kind, responses, n=body.get("n", 1))
            else:
                self._complete(req, kind, echo=kind == "text" and body.get("echo", False), n=body.get("n", 1),
                               responses=responses)
        except (TypeError, ValueError) as e:  # the engine's documented argument errors
            self._error(400, str(e))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client left before the reply
        except Exception as e:  # the engine re-raises a failed step here; the service goes on
            self._error(500, f"{type(e).__name__}: {e}", "server_error")
        finally:
            svc.done()

    def _count_tokens(self, text: str) -> int:
        return len(self.service.engine.tokenize(text, add_special_tokens=False))

    def _sse(self, data: dict, event: str | None = None) -> None:
        self.wfile.write((f"event: {event}\n" if event else "").encode() + b"data: " + json.dumps(data).encode()
                         + b"\n\n")
        self.wfile.flush()

    @staticmethod
    def _choices(req, kind: str, n: int) -> tuple[list, list]:
        """(prompts, SamplingParams) of a request's choices: each prompt n times, the i-th with seed + i (OpenAI's
        order: a prompt's n choices together). ValueError where a seed + i is no seed."""
        prompts = [p for p in (req.prompt if kind == "text" and is_batch(req.prompt) else [req.prompt])
                   for _ in range(n)]
        return prompts, [dataclasses.replace(req.params, seed=req.params.seed + i % n) for i in range(len(prompts))]

    def _complete(self, req, kind="text", echo=False, n=1, responses=None):
        svc, created = self.service, int(time.time())
        policy, tools = req.policy, req.tools
        try:
            prompts, per = self._choices(req, kind, n)
        except ValueError as e:
            return self._error(400, f"n = {n}: {e}")
        watch = self.server.client_watch(self.connection)  # (a client that leaves cancels its requests)
        try:  # (a batch joins the running batch together)
            outs = svc.engine.generate(prompts, per, policy=policy, on_submit=watch.start)
        finally:
            watch.stop()
        if watch.left:
            for o in outs:
                svc.metrics.observe(o)
            return
        for o in outs:
            svc.metrics.observe(o)
        refused = next((o for o in outs if _refused(o)), None)
        if refused is not None:  # (its error names its prompt's place in the batch)
            return self._error(400, refused.error)
        choices = []
        for i, (p, out) in enumerate(zip(prompts, outs)):
            choice = svc.choice(out.text or "", out.token_ids, out.finish_reason, out.error, out.logprobs,
                                out.top_logprobs, kind=kind)
            choice["index"] = i
            if req.reasoning is not None:  # (its thinking apart from its answer, before the answer's tool calls)
                choice["message"] = reasoning_message(choice["message"], req.reasoning)
            if tools is not None:  # (tool_choice: the reply's JSON as the calls' arguments)
                msg, choice["finish_reason"] = tool_message(
                    choice["message"]["content"] or "", out.finish_reason, tools, f"call-{out.request_id}")
                choice["message"] = {**choice["message"], **msg}
                if req.reasoning is not None and not msg["content"]:
                    choice["message"]["content"] = None  # (all thinking, or calls alone)
            if echo:
                svc.echo(choice, p, out)
            choices.append(choice)
        usage = total_usage(outs)
        reply = svc.envelope(outs[0].request_id, choices[0], created, usage, kind)
        reply["choices"] = choices
        if responses is not None:
            return self._json(200, response_object(reply, responses, svc.model_name, self._count_tokens))
        self._json(200, reply)

    def _stream(self, req, kind="text", responses=None, n=1):
        svc, created = self.service, int(time.time())
        try:
            prompts, per = self._choices(req, kind, n)
        except ValueError as e:
            return self._error(400, f"n = {n}: {e}")
        index: dict[int, int] = {}  # request id -> its choice's index
        if len(prompts) == 1:
            chunks = svc.engine.stream(prompts[0], per[0], policy=req.policy)
        else:  # (n choices, or a batch of prompts: their chunks as they come, each event one choice's)
            chunks = svc.engine.stream_many(prompts, per, policy=req.policy,
                                            on_submit=lambda ids: index.update((r, i) for i, r in enumerate(ids)))
        with closing(chunks):  # (closing cancels what still runs)
            first = next(chunks)
            out = first.output
            if first.finished and _refused(out):
                svc.metrics.observe(out)
                return self._error(400, out.error)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            typed = ResponseStream(responses, svc.model_name, self._count_tokens) if responses is not None else None
            choices: dict[int, _StreamedChoice] = {}
            usages = []
            try:
                for c in _chain(first, chunks):
                    o = c.output
                    if o is not None:
                        svc.metrics.observe(o)
                        usages.append(o)
                    choice = choices.setdefault(c.request_id, _StreamedChoice(req, c.request_id)).event(svc, c, kind)
                    choice["index"] = index.get(c.request_id, 0)
                    single = len(prompts) == 1  # (several choices: the usage of all in a last event of its own)
                    event = svc.envelope(min(index) if index else c.request_id, choice, created,
                                         _usage(o) if o and single else None, kind, stream=True)
                    for name, data in typed.feed(event) if typed is not None else [(None, event)]:
                        self._sse(data, name)
                if len(prompts) > 1:
                    last = svc.envelope(min(index), {}, created, total_usage(usages), kind, stream=True)
                    last["choices"] = []
                    self._sse(last)
                if typed is None:  # (the Responses API's stream ends with its response.completed event)
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                svc.metrics.ended("cancelled")  # the client left: closing the stream cancels it, frees its blocks
            except Exception as e:  # a failed engine step, after the headers went out: say so in the stream
                err = {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
                if typed is not None:
                    err = {"type": "error", "code": "server_error", "message": err["error"]["message"], "param": None,
                           "sequence_number": typed.seq}
                self._sse(err, "error" if typed is not None else None)


class _StreamedChoice:
    """One choice of a streamed reply: its events' deltas (the role in its first; its thinking apart, its tool calls
    read, with a reasoning or tool-call parser), and its completions logprobs' text offsets."""

    def __init__(self, req, request_id: int):
        tools = req.tools
        self.req, self.count, self.offset = req, 0, 0  # (events so far; tokens' texts so far)
        self.call_id = f"call-{request_id}"
        self.auto = AutoToolStream(tools, self.call_id) if tools is not None and tools["mode"] == "auto" else None
        self.thinking = ReasoningStream(req.reasoning) if req.reasoning is not None else None

    def event(self, svc, c, kind: str) -> dict:
        """The choice of chunk `c`'s event."""
        o, tools = c.output, self.req.tools
        choice = svc.choice(c.text, c.token_ids, c.finish_reason, o.error if o else None, c.logprobs,
                            c.top_logprobs, self.offset, kind, first=self.count == 0, stream=True)
        if c.logprobs and kind == "text":
            self.offset += sum(len(t) for t in choice["logprobs"]["tokens"])
        if self.thinking is not None:  # (reasoning_content until </think>, then content)
            choice["delta"] = reasoning_delta(self.thinking, choice["delta"], c.finished)
        if self.auto is not None:  # ("auto": content until a call begins, then the calls)
            choice["delta"], choice["finish_reason"] = self.auto.delta(choice["delta"], c.finished,
                                                                       choice["finish_reason"])
        elif tools is not None:  # (a named tool_choice: the text streams as the call's arguments)
            thought = {k: v for k, v in choice["delta"].items() if k == "reasoning_content"}
            choice["delta"] = {**thought, **tool_delta(choice["delta"], tools, self.call_id, self.count == 0)}
        self.count += 1
        return choice


class _Watched:
    """A non-streamed request's connection and its engine requests, while `_ClientWatch` watches them."""

    def __init__(self, watch, sock):
        self.watch, self.sock, self.request_ids, self.left = watch, sock, [], False

    def start(self, request_ids: list[int]) -> None:  # (Engine.generate's on_submit)
        self.request_ids = list(request_ids)
        self.watch.add(self)

    def stop(self) -> None:
        self.watch.discard(self)


class _ClientWatch:
    """Cancels a non-streamed request's engine requests when its client goes away before the reply (its socket reads
    as closed), as vLLM does: a client that timed out and retried would otherwise leave its first request running to
    the end. One thread a server polls every watched socket each `period` seconds (none while nothing is watched)."""

    def __init__(self, engine, period: float = 0.2):
        self.engine, self.period = engine, period
        self.cv = threading.Condition()
        self.watched: set[_Watched] = set()
        self.thread: threading.Thread | None = None

    def __call__(self, sock) -> _Watched:
        return _Watched(self, sock)

    def add(self, w: _Watched) -> None:
        with self.cv:
            if not self.watched:
                self.cv.notify()  # (wakes the thread from idle; more requests do not cut its period short)
            self.watched.add(w)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="bild-client-watch", daemon=True)
                self.thread.start()

    def discard(self, w: _Watched) -> None:
        with self.cv:
            self.watched.discard(w)

    def _gone(self, now: list[_Watched]) -> list[_Watched]:
        """Those of `now` whose client closed its side (poll: no limit on descriptor numbers, as select has)."""
        poller, by_fd, gone = select.poll(), {}, []
        for w in now:
            fd = w.sock.fileno()
            if fd < 0:
                gone.append(w)
            else:
                by_fd[fd] = w
                poller.register(fd, select.POLLIN | select.POLLPRI)
        for fd, ev in poller.poll(0):
            w = by_fd[fd]
            try:
                closed = bool(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL)) or \
                    w.sock.recv(1, socket.MSG_PEEK) == b""  # (EOF; a pipelined request is not)
            except (BlockingIOError, InterruptedError):
                closed = False
            except OSError:
                closed = True
            if closed:
                gone.append(w)
        return gone

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.watched:
                    self.cv.wait()
            time.sleep(self.period)
            with self.cv:
                now = list(self.watched)
            for w in self._gone(now):
                w.left = True
                self.discard(w)
                for rid in w.request_ids:
                    self.engine.cancel(rid)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: the default 5 resets connections under a burst of clients
    draining = False
    api_key: str | None = None
    service: Service

    def drain(self, timeout: float) -> int:
        """Shut down gracefully: new completions get a 503 and /health says "draining" (503) at once, the requests in
        flight go on until they end or `timeout` seconds pass, then serve_forever returns. The number of requests
        still in flight then (0: all finished)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.service.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        left = self.service.in_flight
        self.shutdown()
        return left


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                allowed_origins=(), **kw) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer serving `engine` (port 0: a free port, read it from server.server_address); with
    `api_key`, the /v1 routes need `Authorization: Bearer <api_key>`; browsers on `allowed_origins` ("*": any) may call
    it (CORS)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    svc = Service(engine, **kw)
    handler = type("BoundHandler", (Handler,), {"service": svc})
    server = _Server((host, port), handler)
    server.service, server.api_key, server.client_watch = svc, api_key, _ClientWatch(engine)
    server.allowed_origins = tuple(allowed_origins)
    return server


def _count_or(flag: str, value: str, *words: str):
    """A flag's value: a number >= 0, or one of `words` ("auto", "none": None), else a clear exit."""
    if value in words:
        return None if value == "none" else value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise SystemExit(f"{flag} must be a number >= 0 or {' / '.join(words)}, got {value!r}")
    return n


def build_engine(args) -> Engine:
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}[args.dtype]
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    kw = dict(device=args.device, dtype=dtype, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
              prefill_chunk=_count_or("--prefill-chunk", args.prefill_chunk, "auto"),
              prefix_cache=_count_or("--prefix-cache", args.prefix_cache, "auto"),
              draft_max_batch=_count_or("--draft-max-batch", args.draft_max_batch, "auto", "none"),
              large_weights=None if args.large_weights == "as-loaded" else args.large_weights,
              kv_admission=args.kv_admission)
    if kw["draft_max_batch"] == 0:
        raise SystemExit("--draft-max-batch must be a positive number, none or auto, got 0")
    if args.kv_cache_blocks:
        kw["kv_cache_blocks"] = args.kv_cache_blocks
    if args.large is None:
        if args.small is not None:
            raise SystemExit("--small needs --large")
        return Engine(**kw)
    return Engine(large=args.large, small=args.small, **kw)


def set_chat_template(engine: Engine, template: str) -> None:
    """The engine's tokenizer gets `template` (a file's path, or the Jinja text itself) as its chat template, checked
    by laying out a one-message conversation; a clear exit otherwise."""
    if engine.tokenizer is None:
        raise SystemExit("--chat-template needs a tokenizer, and the engine has none")
    path = os.path.expanduser(template)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            template = f.read()
    elif "{" not in template:
        raise SystemExit(f"--chat-template: {template!r} is neither a file nor a Jinja template")
    old = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = template
    try:
        engine.tokenize([{"role": "user", "content": "hi"}])
    except Exception as e:
        engine.tokenizer.chat_template = old
        raise SystemExit(f"--chat-template does not lay out a conversation: {type(e).__name__}: {e}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--large", help="large model: HF directory or .gguf (default: the engine's default pair)")
    ap.add_argument("--small", help="small model: HF directory or draft directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-blocks", type=int, default=None)
    ap.add_argument("--kv-admission", default="preempt", choices=["preempt", "reserve"],
                    help="admit a request when its next step fits and preempt the newest when the pool runs short "
                         "(it recomputes its KV when re-admitted), or reserve each request's worst case "
                         "(Engine's kv_admission)")
    ap.add_argument("--prefill-chunk", default="auto", metavar="TOKENS",
                    help="prefill prompts longer than this a chunk of TOKENS a step, so that running streams go on "
                         "between the chunks (Engine's prefill_chunk): TOKENS, 0 (whole prompts), or auto")
    ap.add_argument("--prefix-cache", default="auto", metavar="TOKENS",
                    help="keep the large model's KV of up to TOKENS recent prompt positions for prompts that open "
                         "alike (Engine's prefix_cache): TOKENS, 0 (off), or auto")
    ap.add_argument("--draft-max-batch", default="auto", metavar="N",
                    help="draft only while at most N requests run together (Engine's draft_max_batch): N, none (no "
                         "limit: BiLD's text then does not depend on the load), or auto (the draft's recommendation)")
    ap.add_argument("--large-weights", default="as-loaded", choices=["as-loaded", "int8"],
                    help="the large model's weights: as loaded, or int8 per output channel (a float checkpoint on a "
                         "CPU: a quarter of the bytes a step reads; Engine's large_weights)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    ap.add_argument("--max-pending", type=int, default=256, help="requests in flight before 503")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="default per-request timeout, seconds")
    ap.add_argument("--tool-call-parser", default=None, choices=["hermes", "mistral", "llama3_json"],
                    help='read the tool calls a model writes in its own format, for tool_choice "auto" (the default '
                         'with tools): hermes, <tool_call>{"name": ..., "arguments": ...}</tool_call> blocks (Qwen 2.5 '
                         '/ 3, Hermes and SmolLM3 chat templates); mistral, [TOOL_CALLS][{"name": ..., "arguments": '
                         '...}]; llama3_json, a reply of {"name": ..., "parameters": ...} objects (Llama 3.1+)')
    ap.add_argument("--reasoning-parser", default=None, choices=list(REASONING_PARSERS),
                    help="put a chat reply's thinking (<think> ... </think>) in message.reasoning_content (streamed: "
                         "delta.reasoning_content) and the rest in content: deepseek_r1, everything before </think> "
                         "(DeepSeek-R1 and its distillations, QwQ, Qwen3 2507 thinking models, whose templates open "
                         "<think> in the prompt); qwen3, a reply that opens with <think> (Qwen3's hybrid models)")
    ap.add_argument("--chat-template", default=None, metavar="FILE_OR_TEXT",
                    help="the chat template (a Jinja file, or the template itself) in place of the tokenizer's: for a "
                         "base model that has none, or to change how conversations are laid out (vLLM's)")
    ap.add_argument("--served-model-name", default=None, metavar="NAME",
                    help='the model name replies carry and /v1/models lists; given, a request naming another model '
                         'gets a 404, as vLLM\'s (default: "bild", and any name a request gives is accepted)')
    ap.add_argument("--api-key", default=os.environ.get("BILD_API_KEY"),
                    help="require `Authorization: Bearer KEY` on the /v1 routes (default: $BILD_API_KEY; none: open)")
    ap.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                    help="let browser pages on these origins call the API (CORS), comma-separated, or * for any "
                         "(default: none)")
    ap.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="on SIGTERM or Ctrl-C, refuse new requests (503) and let those in flight finish for up to "
                         "SECONDS before exiting (a second signal exits at once)")
    ap.add_argument("--log", action="store_true", help="log every HTTP request to stderr")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.shutdown_timeout < 0:
        raise SystemExit(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key == "":
        raise SystemExit("--api-key must not be empty")
    engine = build_engine(args)
    if args.chat_template is not None:
        set_chat_template(engine, args.chat_template)
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    server = make_server(engine, args.host, args.port, api_key=args.api_key, allowed_origins=origins,
                         max_pending=args.max_pending,
                         default_timeout=args.request_timeout, tool_call_parser=args.tool_call_parser,
                         reasoning_parser=args.reasoning_parser,
                         **({} if args.served_model_name is None else
                            {"model_name": args.served_model_name, "strict_model": True}))
    server.log = args.log
    left = []

    def stop(signum, frame):
        if server.draining:  # (a second signal: now)
            raise KeyboardInterrupt
        print(f"{signal.Signals(signum).name}: draining ({server.service.in_flight} requests in flight, at most "
              f"{args.shutdown_timeout:g} s)", file=sys.stderr, flush=True)
        threading.Thread(target=lambda: left.append(server.drain(args.shutdown_timeout)), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port}/v1/completions", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 1
    finally:
        server.server_close()
    if left and left[0]:
        print(f"stopped with {left[0]} requests unfinished", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

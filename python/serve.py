"""A small streaming HTTP service on bild_kernels' public API: OpenAI-style completions.

    python python/serve.py [--large DIR --small DIR] [--port 8000]     # default: Engine()'s default pair

Endpoints (JSON; errors are {"error": {"message", "type"}} with status 400 / 404 / 413 / 503):
  GET  /health            {"status": "ok", ...}
  GET  /v1/models         the loaded pair
  GET  /tokenizer_info    the tokenizer's special tokens and chat template (as vLLM's)
  POST /tokenize          {prompt: str, add_special_tokens=true} | {messages: [...]} -> {tokens, count, max_model_len}
  POST /detokenize        {tokens: [ids]} -> {prompt: text}
  POST /v1/completions    {prompt: str | [token ids] | a list of those (a batch: one choice each, not streamed),
                           max_tokens=16, temperature=0, top_p=1, top_k=0, seed=0,
                           stop: str | [str | id], stream=false, timeout: seconds, policy: {"name": "bild"|
                           "greedy"|"speculative-sampling"|"large-only"|"small-only"|"jacobi"|"shallow-deep"|
                           "ngram", ...the policy's keyword arguments; "lookup": {NGram's} for the drafting ones},
                           logprobs: null | 0..20, n=1..16: choices per prompt, the i-th sampled with seed + i,
                           not streamed}
  POST /v1/chat/completions
                          {messages: [{role: "system"|"user"|"assistant", content: str}, ...], max_tokens (or
                           max_completion_tokens)=16, logprobs: bool, top_logprobs: 0..20, and the fields above
                           but prompt}: the messages through the model's chat template; OpenAI's chat.completion
                           reply (choices[0].message.content, or with "stream": true chat.completion.chunk events
                           whose choices[0].delta carries the new text); finish_reason "stop" for an EOS
presence_penalty / frequency_penalty 0, logit_bias null or {}, and (completions) best_of 1 are accepted as the
no-ops they are; other values are refused. stream_options is accepted (the last event carries the
usage either way). With "stream": true the reply is server-sent events, one `data: {...}` per committed run of tokens and
`data: [DONE]` at the end. Each choice carries, besides OpenAI's text and finish_reason, the token ids
("token_ids") and, at the end, the engine's "error" when the request ended early (finish_reason "error" or
"timeout"). With "logprobs": n, each choice also carries OpenAI's "logprobs" object for its tokens: "tokens" (each
token's own text), "token_logprobs" (under the model that decided it: the large one, SmallOnly's small one; before
temperature, top-k and top-p), "top_logprobs" (the n most likely tokens there, text -> logprob) and "text_offset"
(where each token's text starts in the completion, counting the tokens' own texts). "echo": true (not with
stream) puts the prompt before the text and, with logprobs, its tokens before the choice's, the first with logprob
null: what lm-evaluation-harness's loglikelihood requests read. Every request thread calls the one Engine: requests join its running batch as they come. A
client that goes away mid-stream cancels its request, which frees its KV blocks at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from bild_kernels import (BiLD, Engine, Greedy, Jacobi, LargeOnly, NGram, SamplingParams, ShallowDeep, SmallOnly,
                          SpeculativeSampling)
from bild_kernels.engine.policies import with_lookup

POLICIES = {"bild": BiLD, "greedy": Greedy, "speculative-sampling": SpeculativeSampling, "large-only": LargeOnly,
            "small-only": SmallOnly, "jacobi": Jacobi, "shallow-deep": ShallowDeep, "ngram": NGram}
MAX_BODY = 1 << 20  # bytes
FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "timeout", "policy",
          "model", "n", "user", "ignore_eos", "logprobs"}
# Fields clients send at their neutral values: accepted there (they change nothing), refused otherwise
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {}), "best_of": (1,)}
CHAT_NEUTRAL = {k: v for k, v in NEUTRAL.items() if k != "best_of"}
FIELDS |= set(NEUTRAL) | {"stream_options", "echo"}
CHAT_FIELDS = FIELDS - {"prompt", "echo", "best_of"} | {"messages", "max_completion_tokens", "top_logprobs"}
ROUTES = {"/v1/completions": "text", "/v1/chat/completions": "chat"}
TOKENIZER_ROUTES = {"/tokenize": "tokenize", "/detokenize": "detokenize"}
MAX_N = 16  # completions one request may ask for per prompt (n)
MAX_BATCH_PROMPTS = 64  # prompts one completions request may carry (each a choice of the reply)


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Service:
    """The engine plus what the HTTP layer needs: request parsing, a policy cache, an admission bound."""

    def __init__(self, engine: Engine, *, model_name: str = "bild", max_pending: int = 256,
                 default_timeout: float | None = 600.0):
        self.engine, self.model_name, self.default_timeout = engine, model_name, default_timeout
        self.slots = threading.BoundedSemaphore(max_pending)
        self._policies: dict[str, object] = {}
        self._lock = threading.Lock()

    def policy(self, spec):
        """One policy object per distinct spec: equal requests share a batch, and "auto" thresholds keep
        calibrating across requests. The cache is bounded (hostile clients could send endless specs)."""
        if spec is None:
            return None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest('policy must be an object with a "name", e.g. {"name": "greedy", "max_draft_len": 4}')
        kw = {k: v for k, v in spec.items() if k != "name"}
        cls = POLICIES.get(spec["name"])
        if cls is None:
            raise BadRequest(f"unknown policy {spec['name']!r}; one of {sorted(POLICIES)}")
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            if key in self._policies:
                return self._policies[key]
        try:
            pol = cls(**with_lookup(kw))  # {"name": "greedy", "lookup": {"max_draft_len": 3, ...}}
        except (TypeError, ValueError) as e:
            raise BadRequest(f"policy: {e}") from None
        with self._lock:
            if len(self._policies) >= 128:
                self._policies.pop(next(iter(self._policies)))
            return self._policies.setdefault(key, pol)

    def parse(self, body: dict, kind: str = "text"):
        """(prompt, SamplingParams, policy, stream) of a completions body (kind "text") or a chat completions one
        ("chat": the prompt is its messages, which the engine puts through the chat template)."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        unknown = set(body) - (FIELDS if kind == "text" else CHAT_FIELDS)
        if unknown:
            raise BadRequest(f"unsupported field(s): {sorted(unknown)}")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise BadRequest(f"n must be an int in [1, {MAX_N}]")
        if n > 1 and body.get("stream"):
            raise BadRequest("stream takes n = 1")
        for k, ok in (NEUTRAL if kind == "text" else CHAT_NEUTRAL).items():
            if k in body and not any(body[k] == v and type(body[k]) is type(v) for v in ok):
                raise BadRequest(f"{k} is not supported (only {' or '.join(json.dumps(v) for v in ok)}, which "
                                 f"changes nothing), got {json.dumps(body[k])}")
        opts = body.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}
                                 or not isinstance(opts.get("include_usage", True), bool)):
            raise BadRequest('stream_options must be {"include_usage": true|false} (the last event carries the '
                             'usage either way)')
        if kind == "chat":
            prompt, body = self._chat_body(body)
        else:
            prompt = body.get("prompt")
            if is_batch(prompt):
                if len(prompt) > MAX_BATCH_PROMPTS or not all(_one_prompt(p) for p in prompt):
                    raise BadRequest(f"a batch prompt must be a list of up to {MAX_BATCH_PROMPTS} prompts, each a "
                                     f"string or a list of token ids")
                if body.get("stream"):
                    raise BadRequest("stream takes one prompt, not a batch")
            elif not _one_prompt(prompt):
                raise BadRequest("prompt must be a string, a list of token ids, or a list of those (a batch)")
            if not isinstance(body.get("echo", False), bool):
                raise BadRequest("echo must be true or false")
            if body.get("echo") and body.get("stream"):
                raise BadRequest("echo is not supported with stream")
        stop = body.get("stop")
        stop = () if stop is None else (stop,) if isinstance(stop, (str, int)) else stop
        if not isinstance(stop, list | tuple):
            raise BadRequest("stop must be a string, a token id, or a list of them")
        timeout = body.get("timeout", self.default_timeout)
        try:
            params = SamplingParams(max_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 0.0),
                                    top_p=body.get("top_p", 1.0), top_k=body.get("top_k", 0),
                                    seed=body.get("seed", 0), stop=tuple(stop),
                                    ignore_eos=bool(body.get("ignore_eos", False)), timeout_s=timeout,
                                    logprobs=body.get("logprobs"),
                                    prompt_logprobs=body.get("logprobs") if body.get("echo") else None)
        except (TypeError, ValueError) as e:
            raise BadRequest(str(e)) from None
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("stream must be true or false")
        return prompt, params, self.policy(body.get("policy")), body.get("stream", False)

    def _chat_body(self, body: dict):
        """The messages of a chat body, and the body in the completions fields the rest of `parse` reads."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest('messages must be a non-empty list of {"role": ..., "content": ...} objects')
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise BadRequest("give max_tokens or max_completion_tokens, not both")
        logprobs, top = body.get("logprobs", False), body.get("top_logprobs")
        if not isinstance(logprobs, bool):
            raise BadRequest("logprobs must be true or false (top_logprobs says how many alternatives)")
        if top is not None and not logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        rest = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens", "top_logprobs")}
        if "max_completion_tokens" in body:
            rest["max_tokens"] = body["max_completion_tokens"]
        rest["logprobs"] = (0 if top is None else top) if logprobs else None
        return messages, rest

    def choice(self, text, token_ids, finish_reason, error=None, logprobs=None, top_logprobs=None,
               offset: int = 0, kind: str = "text", first: bool = True, stream: bool = False) -> dict:
        """One choice of a reply: completions' {text, ...}; chat's {message: {role, content}, ...}, or in a stream
        {delta: {content}} (with the role in the first event)."""
        if kind == "text":
            c = {"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish_reason}
            if logprobs is not None:
                c["logprobs"] = self.logprobs(token_ids, logprobs, top_logprobs, offset)
        else:
            if stream:
                c = {"index": 0, "delta": ({"role": "assistant", "content": text} if first else {"content": text})}
            else:
                c = {"index": 0, "message": {"role": "assistant", "content": text}}
            c.update(token_ids=token_ids, finish_reason="stop" if finish_reason == "eos" else finish_reason)
            if logprobs is not None:
                c["logprobs"] = {"content": self.chat_logprobs(token_ids, logprobs, top_logprobs)}
        if error:
            c["error"] = error
        return c

    def tokenizer_info(self) -> dict:
        """The tokenizer's special tokens and chat template (vLLM's /tokenizer_info, which lm-evaluation-harness's
        remote tokenizer reads)."""
        tok, eng = self.engine.tokenizer, self.engine
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": eng.max_model_len, "vocab_size": eng.vocab_size}

    def tokenize(self, body) -> dict:
        """{prompt: str, add_special_tokens=true} or {messages: [...]} -> {tokens, count, max_model_len}."""
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body) \
                or set(body) - {"prompt", "messages", "add_special_tokens", "model"}:
            raise BadRequest('tokenize takes {"prompt": str, "add_special_tokens": bool} or {"messages": [...]}')
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise BadRequest("add_special_tokens must be true or false")
        if "prompt" in body and not isinstance(body["prompt"], str):
            raise BadRequest("prompt must be a string")
        if "messages" in body and not (isinstance(body["messages"], list) and body["messages"]
                                       and all(isinstance(m, dict) for m in body["messages"])):
            raise BadRequest('messages must be a non-empty list of {"role": ..., "content": ...} objects')
        ids = self.engine.tokenize(body.get("prompt", body.get("messages")), add_special_tokens=special)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    def detokenize(self, body) -> dict:
        """{tokens: [ids]} -> {prompt: their text}."""
        if not isinstance(body, dict) or set(body) - {"tokens", "model"} or not isinstance(body.get("tokens"), list):
            raise BadRequest('detokenize takes {"tokens": [token ids]}')
        return {"prompt": self.engine.detokenize(body["tokens"])}

    def echo(self, choice: dict, prompt, out) -> None:
        """Put the prompt before a completions choice's text (as given, or its ids' text) and, with logprobs, its
        tokens before the choice's: the first with logprob null (nothing predicts it), as OpenAI's echo does."""
        eng = self.engine
        head = prompt if isinstance(prompt, str) else eng.tokenizer.decode(prompt) if eng.tokenizer else ""
        choice["text"] = head + choice["text"]
        if "logprobs" not in choice:
            return
        lp = self.logprobs(out.prompt_token_ids, out.prompt_logprobs,
                           [[] if row is None else row for row in out.prompt_top_logprobs], 0)
        lp["top_logprobs"][0] = None
        rest, end = choice["logprobs"], sum(len(t) for t in lp["tokens"])
        choice["logprobs"] = {"tokens": lp["tokens"] + rest["tokens"],
                              "token_logprobs": lp["token_logprobs"] + rest["token_logprobs"],
                              "top_logprobs": lp["top_logprobs"] + rest["top_logprobs"],
                              "text_offset": lp["text_offset"] + [end + o for o in rest["text_offset"]]}

    def chat_logprobs(self, token_ids, logprobs, top_logprobs) -> list[dict]:
        """The chat API's logprobs.content: per token its text, logprob, UTF-8 bytes and top alternatives."""
        eng = self.engine
        texts = eng.token_texts(token_ids)
        alts = eng.token_texts([t for row in top_logprobs for t, _ in row])
        out, k = [], 0
        for text, lp, row in zip(texts, logprobs, top_logprobs):
            top = [{"token": alts[k + j], "logprob": v, "bytes": list(alts[k + j].encode())}
                   for j, (_, v) in enumerate(row)]
            k += len(row)
            out.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": top})
        return out

    def logprobs(self, token_ids, logprobs, top_logprobs, offset: int) -> dict:
        """OpenAI's completions "logprobs" object for `token_ids`, their texts counted from `offset`."""
        eng = self.engine
        texts = eng.token_texts(token_ids)
        alts = eng.token_texts([t for row in top_logprobs for t, _ in row])
        top, k = [], 0
        for row in top_logprobs:
            top.append({alts[k + j]: v for j, (_, v) in enumerate(row)})
            k += len(row)
        starts = []
        for t in texts:
            starts.append(offset)
            offset += len(t)
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": starts}

    def envelope(self, request_id: int, choice: dict, created: int, usage=None, kind: str = "text",
                 stream: bool = False) -> dict:
        obj = "text_completion" if kind == "text" else "chat.completion.chunk" if stream else "chat.completion"
        out = {"id": f"{'cmpl' if kind == 'text' else 'chatcmpl'}-{request_id}", "object": obj, "created": created,
               "model": self.model_name, "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out


def _usage(out) -> dict:
    p, g = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may stall while sending its request (slow clients hold no engine state)
    service: Service  # set by make_server

    def log_message(self, fmt, *args):  # quiet by default; --log turns it on
        if getattr(self.server, "log", False):
            super().log_message(fmt, *args)

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind}})

    def do_GET(self):
        if self.path == "/health":
            eng = self.service.engine
            self._json(200, {"status": "ok", "max_batch_size": eng.max_batch_size,
                             "kv_cache_blocks": eng.kv_cache_blocks})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.service.model_name, "object": "model"}]})
        elif self.path == "/tokenizer_info" and self.service.engine.tokenizer is not None:
            self._json(200, self.service.tokenizer_info())
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
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
        try:
            prompt, params, policy, stream = svc.parse(body, kind)
        except BadRequest as e:
            return self._error(e.status, str(e))
        if not svc.slots.acquire(blocking=False):
            return self._error(503, "server busy: too many requests in flight", "overloaded")
        try:
            if stream:
                self._stream(prompt, params, policy, kind)
            else:
                self._complete(prompt, params, policy, kind, echo=kind == "text" and body.get("echo", False),
                               n=body.get("n", 1))
        except (TypeError, ValueError) as e:  # the engine's documented argument errors
            self._error(400, str(e))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client left before the reply
        except Exception as e:  # the engine re-raises a failed step here; the service goes on
            self._error(500, f"{type(e).__name__}: {e}", "server_error")
        finally:
            svc.slots.release()

    def _complete(self, prompt, params, policy, kind="text", echo=False, n=1):
        svc, created = self.service, int(time.time())
        # each prompt n times, the i-th with seed + i (OpenAI's order: a prompt's n choices together)
        prompts = [p for p in (prompt if kind == "text" and is_batch(prompt) else [prompt]) for _ in range(n)]
        try:
            per = [dataclasses.replace(params, seed=params.seed + i % n) for i in range(len(prompts))]
        except ValueError as e:
            return self._error(400, f"n = {n}: {e}")
        outs = svc.engine.generate(prompts, per, policy=policy)  # (a batch joins the running batch together)
        refused = next((o for o in outs if _refused(o)), None)
        if refused is not None:  # (its error names its prompt's place in the batch)
            return self._error(400, refused.error)
        choices = []
        for i, (p, out) in enumerate(zip(prompts, outs)):
            choice = svc.choice(out.text or "", out.token_ids, out.finish_reason, out.error, out.logprobs,
                                out.top_logprobs, kind=kind)
            choice["index"] = i
            if echo:
                svc.echo(choice, p, out)
            choices.append(choice)
        usage = {k: sum(_usage(o)[k] for o in outs) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        reply = svc.envelope(outs[0].request_id, choices[0], created, usage, kind)
        reply["choices"] = choices
        self._json(200, reply)

    def _stream(self, prompt, params, policy, kind="text"):
        svc, created = self.service, int(time.time())
        with closing(svc.engine.stream(prompt, params, policy=policy)) as chunks:  # closing cancels the request
            first = next(chunks)
            out = first.output
            if first.finished and _refused(out):
                return self._error(400, out.error)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                offset = 0  # tokens' texts so far (completions' logprobs text_offset)
                for i, c in enumerate(_chain(first, chunks)):
                    o = c.output
                    choice = svc.choice(c.text, c.token_ids, c.finish_reason, o.error if o else None, c.logprobs,
                                        c.top_logprobs, offset, kind, first=i == 0, stream=True)
                    if c.logprobs and kind == "text":
                        offset += sum(len(t) for t in choice["logprobs"]["tokens"])
                    event = svc.envelope(c.request_id, choice, created, _usage(o) if o else None, kind, stream=True)
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the client left: closing the stream cancels the request and frees its blocks
            except Exception as e:  # a failed engine step, after the headers went out: say so in the stream
                err = {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
                self.wfile.write(b"data: " + json.dumps(err).encode() + b"\n\n")


def _one_prompt(p) -> bool:
    return isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p))


def is_batch(prompt) -> bool:
    """OpenAI's batch form of a completions prompt: a non-empty list of strings or of token-id lists."""
    return isinstance(prompt, list) and len(prompt) > 0 and all(isinstance(p, (str, list)) for p in prompt)


def _refused(out) -> bool:
    """The engine refused the request before any model ran (a bad prompt, too long, ...): a client error."""
    m = out.metrics
    return out.finish_reason == "error" and m.large_passes == 0 and m.small_steps == 0


def _chain(first, rest):
    yield first
    yield from rest


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: the default 5 resets connections under a burst of clients


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, **kw) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer serving `engine` (port 0: a free port, read it from server.server_address)."""
    svc = Service(engine, **kw)
    handler = type("BoundHandler", (Handler,), {"service": svc})
    server = _Server((host, port), handler)
    server.service = svc
    return server


def build_engine(args) -> Engine:
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}[args.dtype]
    kw = dict(device=args.device, dtype=dtype, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len)
    if args.kv_cache_blocks:
        kw["kv_cache_blocks"] = args.kv_cache_blocks
    if args.large is None:
        if args.small is not None:
            raise SystemExit("--small needs --large")
        return Engine(**kw)
    return Engine(large=args.large, small=args.small, **kw)


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
    ap.add_argument("--max-pending", type=int, default=256, help="requests in flight before 503")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="default per-request timeout, seconds")
    ap.add_argument("--log", action="store_true", help="log every HTTP request to stderr")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    engine = build_engine(args)
    server = make_server(engine, args.host, args.port, max_pending=args.max_pending,
                         default_timeout=args.request_timeout)
    server.log = args.log
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port}/v1/completions", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

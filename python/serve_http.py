"""python/serve.py's HTTP: the request handler (routes, the API key, CORS, the replies whole and streamed) and the
server (its graceful drain). The request and reply formats are python/openai_api.py's, the Responses API's
python/responses_api.py's; what a streamed choice or a watched connection holds is python/serve_streams.py's."""
from __future__ import annotations

import dataclasses
import hmac
import json
import re
import ssl
import time
import urllib.parse
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import bild_kernels
from bild_kernels import Engine
from openai_api import (MAX_BODY, ROUTES, TOKENIZER_ROUTES, BadRequest, Service, _chain, _refused, _usage, is_batch,
                        total_usage)
from reasoning import reasoning_message
from responses_api import ResponseStream, chat_body, response_object
from serve_streams import ClientWatch, StreamedChoice
from tool_calls import tool_message


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


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

    request_id: str | None = None  # (the reply's X-Request-Id header: the client's, else the reply's id)

    def parse_request(self) -> bool:
        self.request_id = None  # (each request on a kept-alive connection names its own reply)
        return super().parse_request()

    def end_headers(self) -> None:
        if self.request_id is not None:
            self.send_header("X-Request-Id", self.request_id)
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
            self._json(200, {"object": "list", "data": [self._model()]})
        elif self.path.startswith("/v1/models/"):  # (OpenAI's retrieve: the served model, by its name)
            name = urllib.parse.unquote(self.path[len("/v1/models/"):])
            if name == self.service.model_name:
                self._json(200, self._model())
            else:
                self._error(404, f"the model {name[:80]!r} does not exist (this server serves "
                                 f"{self.service.model_name!r})", "not_found")
        elif self.path == "/metrics":
            text = self.service.metrics.render(self.service.engine.load())
            self._send(200, text.encode(), "text/plain; version=0.0.4")
        elif self.path == "/tokenizer_info" and self.service.engine.tokenizer is not None:
            self._json(200, self.service.tokenizer_info())
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def _model(self) -> dict:
        svc = self.service
        return {"id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "bild",
                "max_model_len": svc.engine.max_model_len}

    def do_POST(self):
        given = self.headers.get("X-Request-Id")  # (a proxy's or client's id for the request: the reply's id too)
        self.request_id = given if given is not None and REQUEST_ID.fullmatch(given) else None
        if not self._authorized():
            return
        if given is not None and self.request_id is None:
            return self._error(400, "X-Request-Id must be 1 to 128 letters, digits or ._:- characters")
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
            req = svc.parse(body, kind, truncate=responses is not None and responses.get("truncation") == "auto")
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
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
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
        for o in outs:
            svc.metrics.observe(o)
        if watch.left:  # (nobody to reply to)
            return
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
        reply = svc.envelope(self.request_id or outs[0].request_id, choices[0], created, usage, kind)
        reply["choices"] = choices
        if responses is not None:
            reply = response_object(reply, responses, svc.model_name, self._count_tokens)
        self.request_id = self.request_id or reply["id"]
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
            reply_id = self.request_id or (min(index) if index else first.request_id)  # (every event's id)
            if self.request_id is None:  # (the header: the reply's id, the response's for the Responses API)
                self.request_id = svc.reply_id(reply_id, "responses" if responses is not None else kind)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            typed = ResponseStream(responses, svc.model_name, self._count_tokens, parsed=req.reasoning is not None) \
                if responses is not None else None
            single = len(prompts) == 1  # (several choices: the usage of all in a last event of its own)
            choices: dict[int, StreamedChoice] = {}
            usages = []
            try:
                for c in _chain(first, chunks):
                    o = c.output
                    if o is not None:
                        svc.metrics.observe(o)
                        usages.append(o)
                    choice = choices.setdefault(c.request_id, StreamedChoice(req, c.request_id)).event(svc, c, kind)
                    choice["index"] = index.get(c.request_id, 0)
                    event = svc.envelope(reply_id, choice, created, _usage(o) if o and single else None, kind,
                                         stream=True)
                    for name, data in typed.feed(event) if typed is not None else [(None, event)]:
                        self._sse(data, name)
                if not single:
                    last = svc.envelope(reply_id, {}, created, total_usage(usages), kind, stream=True)
                    last["choices"] = []
                    self._sse(last)
                if typed is None:  # (the Responses API's stream ends with its response.completed event)
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
                svc.metrics.ended("cancelled")  # the client left: closing the stream cancels it, frees its blocks
            except Exception as e:  # a failed engine step, after the headers went out: say so in the stream
                err = {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
                if typed is not None:
                    err = {"type": "error", "code": "server_error", "message": err["error"]["message"], "param": None,
                           "sequence_number": typed.seq}
                self._sse(err, "error" if typed is not None else None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: the default 5 resets connections under a burst of clients
    draining = False
    api_key: str | None = None
    ssl_context: ssl.SSLContext | None = None
    service: Service

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_context is not None:  # (the handshake runs in the request's own thread: finish_request)
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request, client_address):
        if self.ssl_context is not None:  # (a client that stalls or fails its handshake holds no other one up)
            request.settimeout(Handler.timeout)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError):  # (plain HTTP to a TLS port, an untrusted client certificate, ...)
                return
        super().finish_request(request, client_address)

    def shutdown_request(self, request):
        if isinstance(request, ssl.SSLSocket):  # (TLS's close_notify first: a bare EOF reads as a truncated reply)
            try:
                request.setblocking(False)  # (send ours; do not wait for the client's)
                request.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
        super().shutdown_request(request)

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
                allowed_origins=(), ssl_context: ssl.SSLContext | None = None, **kw) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer serving `engine` (port 0: a free port, read it from server.server_address); with
    `api_key`, the /v1 routes need `Authorization: Bearer <api_key>`; browsers on `allowed_origins` ("*": any) may call
    it (CORS); with `ssl_context` (a server-side ssl.SSLContext holding its certificate) it speaks HTTPS only."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if ssl_context is not None and not (isinstance(ssl_context, ssl.SSLContext) and ssl_context.protocol in
                                        (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS)):
        raise TypeError(f"ssl_context must be a server-side ssl.SSLContext or None, got {ssl_context!r}")
    svc = Service(engine, **kw)
    handler = type("BoundHandler", (Handler,), {"service": svc})
    server = _Server((host, port), handler)
    server.service, server.api_key, server.client_watch = svc, api_key, ClientWatch(engine)
    server.allowed_origins, server.ssl_context = tuple(allowed_origins), ssl_context
    return server

"""A small streaming HTTP service on bild_kernels' public API: OpenAI-style completions.

    python python/serve.py [--large DIR --small DIR] [--port 8000]     # default: Engine()'s default pair

Endpoints (JSON; errors are {"error": {"message", "type"}} with status 400 / 404 / 413 / 503):
  GET  /health            {"status": "ok", ...}
  GET  /v1/models         the served model (its name, max_model_len); /v1/models/NAME: it, by name (404 otherwise)
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
presence_penalty and frequency_penalty (OpenAI's, in [-2, 2]), vLLM's repetition_penalty (> 0) and min_tokens (EOS and
stop ids held back until the output has that many tokens), and logit_bias ({"token id": bias in [-100, 100]}, added
first) shape the large model's distribution, what every policy verifies against (SamplingParams); vLLM's
include_stop_str_in_output and skip_special_tokens (default true) shape the text; an output constraint holds the text
to a pattern (SamplingParams.structured_outputs): OpenAI's response_format ({"type": "json_object"} or {"type":
"json_schema", "json_schema": {"name", "schema"}}), vLLM's structured_outputs ({"json" | "regex" | "choice" |
"json_object"}) or its guided_json / guided_regex / guided_choice (+ guided_whitespace_pattern); (chat) tools with
tool_choice naming a function (the reply is message.tool_calls: one call, its arguments held to the function's
parameters schema, finish_reason "stop") or "required" (one or more calls, finish_reason "tool_calls"; one with
parallel_tool_calls false), the tools shown to the chat template; "auto" (the model decides; its calls read by
--tool-call-parser hermes | mistral | llama3_json | granite, refused without one), "none" ignores them; a named one
streams (delta.tool_calls[0].function.arguments), "auto" streams its content, then the calls as they come
(python/tool_calls.py), and so does "required" (its list's calls);
(completions) best_of 1 is accepted as the no-op it is, other values refused. stream_options is accepted (the last
event carries the usage either way). With "stream": true the reply is server-sent events, one `data: {...}` per
committed run of tokens and `data: [DONE]` at the end. Each choice carries, besides OpenAI's text and finish_reason,
the token ids ("token_ids") and, at the end, the engine's "error" when the request ended early (finish_reason "error"
or "timeout"). With "logprobs": n, each choice also carries OpenAI's "logprobs" object for its tokens: "tokens" (each
token's own text), "token_logprobs" (under the model that decided it: the large one, SmallOnly's small one; before
temperature and the filters), "top_logprobs" (the n most likely tokens there, text -> logprob) and "text_offset"
(where each token's text starts in the completion, counting the tokens' own texts). "echo": true (not with stream)
puts the prompt before the text and, with logprobs, its tokens before the choice's, the first with logprob null: what
lm-evaluation-harness's loglikelihood requests read. Every request thread calls the one Engine: requests join its
running batch as they come. A client that goes away (mid-stream, or before a whole reply: its connection is watched)
cancels its requests, which frees their KV blocks at once. The request and reply formats are python/openai_api.py's.

Chat requests also take vLLM's chat_template_kwargs (the template's variables: Qwen3's {"enable_thinking": false}),
add_generation_prompt and continue_final_message (the assistant's last message left open: the reply goes on from
it). --reasoning-parser deepseek_r1 | qwen3 puts a reply's thinking in message.reasoning_content (streamed:
delta.reasoning_content) and the rest in content (python/reasoning.py); an output constraint then holds the answer
after the thinking, which stays free. --api-key (or $BILD_API_KEY) makes the /v1 routes ask for `Authorization:
Bearer <key>` (401 otherwise; /health, /metrics and the tokenizer routes stay open, as vLLM's); --served-model-name
NAME names the model and refuses requests naming another (404); --chat-template replaces the tokenizer's chat
template; --allowed-origins lets browser pages on those origins call it (CORS); usage carries
prompt_tokens_details.cached_tokens (the prefix cache's share of the prompt); GET /version; a request's
X-Request-Id header is its reply's id and comes back as a header (the reply's own id without one). SIGTERM or Ctrl-C
drains: /health and new requests get a 503 at once, the requests in flight finish (up to --shutdown-timeout
seconds), then the server exits 0. --ssl-certfile / --ssl-keyfile serve HTTPS (--ssl-ca-certs and --ssl-cert-reqs 2:
clients must show a certificate that CA signed), vLLM's flags.

This file is the program (its flags, the engine, the signals); the HTTP is python/serve_http.py's.
"""
from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import threading

import torch

from bild_kernels import Engine
from reasoning import REASONING_PARSERS
from serve_http import make_server


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


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _memory(value: str):
    """--kv-cache-memory's value: a fraction in (0, 1] of the GPU's free memory (a float), or bytes (an int, or a
    number with a unit: 512MiB, 4GiB, 2GB); else a clear exit."""
    text = value.strip().upper()
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    try:
        n = float(number)
    except ValueError:
        n = -1.0
    if unit in _UNITS and n > 0:
        if unit == "" and "." in number and n <= 1:
            return n  # (a fraction)
        if n * _UNITS[unit] >= 1:
            return int(n * _UNITS[unit])
    raise SystemExit(f"--kv-cache-memory must be a fraction in (0, 1] of the GPU's free memory or a size in bytes "
                     f"(e.g. 4GiB), got {value!r}")


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
    if args.kv_cache_blocks and args.kv_cache_memory:
        raise SystemExit("give --kv-cache-blocks or --kv-cache-memory, not both")
    if args.kv_cache_blocks:
        kw["kv_cache_blocks"] = args.kv_cache_blocks
    if args.kv_cache_memory:
        kw["kv_cache_memory"] = _memory(args.kv_cache_memory)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser (how to read the calls a model writes)")
    if args.large is None and args.small is not None:
        raise SystemExit("--small needs --large")
    try:
        return Engine(**kw) if args.large is None else Engine(large=args.large, small=args.small, **kw)
    except (ValueError, TypeError, OSError) as e:  # (the engine's own checks of what the flags gave it)
        raise SystemExit(f"cannot build the engine: {e}") from None


def ssl_context(args) -> ssl.SSLContext | None:
    """The server's TLS context from --ssl-certfile / --ssl-keyfile (and --ssl-ca-certs / --ssl-cert-reqs for client
    certificates), or None for plain HTTP; a clear exit, before any model loads, for files it cannot use."""
    if args.ssl_certfile is None:
        given = [f for f in ("keyfile", "ca_certs", "cert_reqs") if getattr(args, f"ssl_{f}")]
        if given:
            raise SystemExit(f"--ssl-{given[0].replace('_', '-')} needs --ssl-certfile (the server's certificate)")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    except (OSError, ssl.SSLError) as e:
        key = f" / --ssl-keyfile {args.ssl_keyfile!r}" if args.ssl_keyfile else ""
        raise SystemExit(f"--ssl-certfile {args.ssl_certfile!r}{key}: not a certificate and its private key ({e})") \
            from None
    if args.ssl_ca_certs:
        try:
            ctx.load_verify_locations(args.ssl_ca_certs)
        except (OSError, ssl.SSLError) as e:
            raise SystemExit(f"--ssl-ca-certs {args.ssl_ca_certs!r}: not a file of CA certificates ({e})") from None
    elif args.ssl_cert_reqs:
        raise SystemExit("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs (whom to trust for client certificates)")
    ctx.verify_mode = (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED)[args.ssl_cert_reqs]
    return ctx


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
    ap.add_argument("--max-batch-size", "--max-num-seqs", type=int, default=8,
                    help="requests decoded together (--max-num-seqs: vLLM's name)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-blocks", type=int, default=None)
    ap.add_argument("--kv-cache-memory", default=None, metavar="FRACTION_OR_BYTES",
                    help="one memory budget for both models' KV caches instead of --kv-cache-blocks: a fraction of "
                         "the GPU's free memory once the models are loaded (0.9), or a size (4GiB); Engine's "
                         "kv_cache_memory")
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
    ap.add_argument("--seed", type=int, default=None,
                    help="draw the sampling seeds of requests that give none from a generator seeded with SEED, so "
                         "that a restarted server samples alike for the same requests in the same order (vLLM's "
                         "flag; default: a fresh random seed each)")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="default per-request timeout, seconds")
    ap.add_argument("--tool-call-parser", default=None, choices=["hermes", "mistral", "llama3_json", "granite"],
                    help='read the tool calls a model writes in its own format, for tool_choice "auto" (the default '
                         'with tools): hermes, <tool_call>{"name": ..., "arguments": ...}</tool_call> blocks (Qwen 2.5 '
                         '/ 3, Hermes and SmolLM3 chat templates); mistral, [TOOL_CALLS][{"name": ..., "arguments": '
                         '...}]; llama3_json, a reply of {"name": ..., "parameters": ...} objects (Llama 3.1+); '
                         'granite, <|tool_call|> or <tool_call> and a JSON list of calls (Granite 3.x)')
    ap.add_argument("--enable-auto-tool-choice", action="store_true",
                    help='vLLM\'s flag for tool_choice "auto", taken for compatibility: here --tool-call-parser alone '
                         'turns it on (it needs one)')
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
    ap.add_argument("--ssl-certfile", default=None, metavar="FILE",
                    help="serve HTTPS with this certificate (PEM; its chain after it), vLLM's flag")
    ap.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                    help="the certificate's private key (PEM; default: in --ssl-certfile)")
    ap.add_argument("--ssl-ca-certs", default=None, metavar="FILE",
                    help="CA certificates (PEM) that clients' certificates are checked against")
    ap.add_argument("--ssl-cert-reqs", type=int, default=0, choices=[0, 1, 2],
                    help="client certificates: 0 not asked for, 1 checked when given, 2 required (mutual TLS)")
    ap.add_argument("--log", action="store_true", help="log every HTTP request to stderr")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.shutdown_timeout < 0:
        raise SystemExit(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.seed is not None and args.seed < 0:
        raise SystemExit(f"--seed must be >= 0, got {args.seed}")
    if args.api_key == "":
        raise SystemExit("--api-key must not be empty")
    tls = ssl_context(args)
    engine = build_engine(args)
    if args.chat_template is not None:
        set_chat_template(engine, args.chat_template)
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    server = make_server(engine, args.host, args.port, api_key=args.api_key, allowed_origins=origins,
                         max_pending=args.max_pending,
                         default_timeout=args.request_timeout, tool_call_parser=args.tool_call_parser,
                         reasoning_parser=args.reasoning_parser, ssl_context=tls, seed=args.seed,
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
    print(f"serving on {'https' if tls else 'http'}://{host}:{port}/v1/completions", file=sys.stderr, flush=True)
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

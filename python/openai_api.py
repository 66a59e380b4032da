"""OpenAI's completions and chat completions in bild_kernels' terms, for python/serve.py: what a request body asks
for (a prompt, SamplingParams, a policy, the tools: `tool_spec`), and the reply's choices (text or message, logprobs,
echo) from the engine's outputs; vLLM's tokenizer routes. No HTTP here: serve.py's handler calls `Service`; the fields
a body may hold are python/openai_fields.py's, the tool calls' formats python/tool_calls.py's."""
from __future__ import annotations

import json
import random
import threading
import time
from typing import NamedTuple

from bild_kernels import (BiLD, Engine, Greedy, Jacobi, LargeOnly, NGram, SamplingParams, ShallowDeep, SmallOnly,
                          SpeculativeSampling)
from bild_kernels.engine.policies import with_lookup
from openai_fields import (CHAT_FIELDS, CHAT_NEUTRAL, EFFORTS, FIELDS, MAX_BATCH_PROMPTS, MAX_N, NEUTRAL,
                           TEMPLATE_FIELDS, BadRequest, checked_messages, float_field, is_batch, logit_bias_of,
                           one_prompt, output_constraint, seed_of, tool_spec)
from reasoning import REASONING_PARSERS
from serve_metrics import ServiceMetrics
from tool_calls import TOOL_CALL_PARSERS

POLICIES = {"bild": BiLD, "greedy": Greedy, "speculative-sampling": SpeculativeSampling, "large-only": LargeOnly,
            "small-only": SmallOnly, "jacobi": Jacobi, "shallow-deep": ShallowDeep, "ngram": NGram}
MAX_BODY = 1 << 20  # bytes
ROUTES = {"/v1/completions": "text", "/v1/chat/completions": "chat", "/v1/responses": "responses"}
TOKENIZER_ROUTES = {"/tokenize": "tokenize", "/detokenize": "detokenize"}
REPLY_ID_PREFIX = {"text": "cmpl-", "chat": "chatcmpl-", "responses": "resp_"}  # (OpenAI's ids' forms)


class Request(NamedTuple):
    """What a request body asks for, in the engine's terms and the reply's."""
    prompt: object  # a string, token ids, a batch of those, or chat messages
    params: SamplingParams
    policy: object
    stream: bool
    tools: dict | None  # tool_spec's: how the reply's calls are read (chat)
    reasoning: str | None  # the reasoning parser that splits the reply's thinking from its answer (chat)


class Service:
    """The engine plus what the HTTP layer needs: request parsing, a policy cache, an admission bound."""

    def __init__(self, engine: Engine, *, model_name: str = "bild", strict_model: bool = False, max_pending: int = 256,
                 default_timeout: float | None = 600.0, tool_call_parser: str | None = None,
                 reasoning_parser: str | None = None, seed: int | None = None):
        if tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_CALL_PARSERS)} or None, got "
                             f"{tool_call_parser!r}")
        if reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {list(REASONING_PARSERS)} or None, got "
                             f"{reasoning_parser!r}")
        self.engine, self.model_name, self.default_timeout = engine, model_name, default_timeout
        self.strict_model = strict_model  # a request's "model" must then be model_name (404 otherwise, as vLLM's)
        self.tool_call_parser, self.reasoning_parser = tool_call_parser, reasoning_parser
        self.created = int(time.time())
        self.max_pending, self.in_flight = max_pending, 0  # requests being served (admit / done)
        self.metrics = ServiceMetrics()
        self._policies: dict[str, object] = {}
        self._lock = threading.Lock()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        # (with a seed, the requests that give none draw theirs from it: a restarted server samples alike)
        self._draw = None if seed is None else random.Random(seed).randrange

    def admit(self) -> bool:
        """Count a request in, unless max_pending are in flight already."""
        with self._lock:
            if self.in_flight >= self.max_pending:
                return False
            self.in_flight += 1
            return True

    def done(self) -> None:
        with self._lock:
            self.in_flight -= 1

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

    def parse(self, body: dict, kind: str = "text", truncate: bool = False) -> Request:
        """What a completions body (kind "text") or a chat completions one ("chat": the prompt is its messages,
        which the engine puts through the chat template) asks for; `truncate` (the Responses API's truncation
        "auto"): a conversation too long for the context loses its earliest turns (`_fit`)."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        unknown = set(body) - (FIELDS if kind == "text" else CHAT_FIELDS)
        if unknown:
            raise BadRequest(f"unsupported field(s): {sorted(unknown)}")
        if self.strict_model and body.get("model", self.model_name) != self.model_name:
            raise BadRequest(f"the model {str(body['model'])[:80]!r} does not exist (this server serves "
                             f"{self.model_name!r})", 404)
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise BadRequest(f"n must be an int in [1, {MAX_N}]")
        for k, ok in (NEUTRAL if kind == "text" else CHAT_NEUTRAL).items():
            if k in body and not any(body[k] == v and type(body[k]) is type(v) for v in ok):
                raise BadRequest(f"{k} is not supported (only {' or '.join(json.dumps(v) for v in ok)}, which "
                                 f"changes nothing), got {json.dumps(body[k])}")
        opts = body.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}
                                 or not isinstance(opts.get("include_usage", True), bool)):
            raise BadRequest('stream_options must be {"include_usage": true|false} (the last event carries the '
                             'usage either way)')
        tools = tool_spec(body, self.tool_call_parser) if kind == "chat" else None
        structured = output_constraint(body)
        if tools is not None and tools["mode"] != "auto":
            if structured is not None:
                raise BadRequest("tool_choice holds the reply to its functions' schemas: no other output constraint")
        if kind == "chat":
            template = self._template_options(body)
            prompt, body = self._chat_body(body)
            if truncate:
                prompt = self._fit(prompt, tools, template)
            if tools is not None or template:
                try:  # (the template shows the tools where it can)
                    prompt = self.engine.tokenize(prompt, tools=tools and tools["tools"], **template)
                except ValueError as e:
                    raise BadRequest(str(e)) from None
        else:
            prompt = body.get("prompt")
            if is_batch(prompt):
                if len(prompt) > MAX_BATCH_PROMPTS or not all(one_prompt(p) for p in prompt):
                    raise BadRequest(f"a batch prompt must be a list of up to {MAX_BATCH_PROMPTS} prompts, each a "
                                     f"string or a list of token ids")
            elif not one_prompt(prompt):
                raise BadRequest("prompt must be a string, a list of token ids, or a list of those (a batch)")
            if not isinstance(body.get("echo", False), bool):
                raise BadRequest("echo must be true or false")
            if body.get("echo") and body.get("stream"):
                raise BadRequest("echo is not supported with stream")
        stop = body.get("stop")
        stop = () if stop is None else (stop,) if isinstance(stop, (str, int)) else stop
        if not isinstance(stop, list | tuple):
            raise BadRequest("stop must be a string, a token id, or a list of them")
        stop_ids = body.get("stop_token_ids") or []  # (vLLM's: ids that end the request, as ints in `stop` do)
        if not isinstance(stop_ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in stop_ids):
            raise BadRequest("stop_token_ids must be a list of token ids")
        stop = list(stop) + stop_ids
        timeout = body.get("timeout", self.default_timeout)
        constraint = structured if tools is None or "json" not in tools else {"json": tools["json"]}
        reasoning = self.reasoning_parser if kind == "chat" else None
        if constraint is not None and reasoning is not None:  # (its thinking free, the constraint on its answer)
            constraint = {"reasoning": reasoning, **constraint}
        try:
            # max_tokens absent: OpenAI's defaults, 16 for completions, the rest of the context for chat (the engine
            # stops a request at max_model_len); null: the rest of the context (vLLM's reading)
            max_tokens = body.get("max_tokens", 16 if kind == "text" else None)
            max_tokens = self.engine.max_model_len if max_tokens is None else max_tokens
            params = SamplingParams(max_tokens=max_tokens, temperature=body.get("temperature", 0.0),
                                    top_p=body.get("top_p", 1.0), top_k=body.get("top_k", 0),
                                    min_p=body.get("min_p", 0.0),
                                    include_stop_str_in_output=body.get("include_stop_str_in_output", False),
                                    # (a format whose marker is a special token keeps them in the text, as vLLM's
                                    # Mistral and Granite parsers do)
                                    skip_special_tokens=body.get("skip_special_tokens", True) and not (
                                        tools is not None and tools.get("parser") in ("mistral", "granite")),
                                    seed=seed_of(body, self._draw), stop=tuple(stop),
                                    ignore_eos=bool(body.get("ignore_eos", False)), timeout_s=timeout,
                                    presence_penalty=float_field(body, "presence_penalty", 0.0),
                                    frequency_penalty=float_field(body, "frequency_penalty", 0.0),
                                    repetition_penalty=float_field(body, "repetition_penalty", 1.0),
                                    min_tokens=body.get("min_tokens", 0), logit_bias=logit_bias_of(body),
                                    priority=body.get("priority", 0),
                                    allowed_token_ids=body.get("allowed_token_ids"),
                                    bad_words=body.get("bad_words") or (),
                                    truncate_prompt_tokens=body.get("truncate_prompt_tokens"),
                                    logprobs=body.get("logprobs"),
                                    prompt_logprobs=body.get("logprobs") if body.get("echo") else None,
                                    structured_outputs=constraint)
        except (TypeError, ValueError) as e:
            raise BadRequest(str(e)) from None
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("stream must be true or false")
        return Request(prompt, params, self.policy(body.get("policy")), body.get("stream", False), tools, reasoning)

    def _fit(self, messages: list[dict], tools, template: dict) -> list[dict]:
        """`messages` without their earliest turns, as few dropped as leave the prompt room for a token (OpenAI's
        truncation "auto"): system messages stay, the last message stays, and a tool call's replies go with it."""
        def fits(ms) -> bool:
            try:
                ids = self.engine.tokenize(ms, tools=tools and tools["tools"], **template)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            return len(ids) < self.engine.max_model_len
        system = [m for m in messages if m.get("role") == "system"]
        turns = [m for m in messages if m.get("role") != "system"]
        while len(turns) > 1 and not fits(system + turns):
            turns = turns[1:]
            while len(turns) > 1 and turns[0].get("role") == "tool":  # (replies to a call that went)
                turns = turns[1:]
        return system + turns

    def _template_options(self, body: dict) -> dict:
        """The chat template's options a chat body gives (vLLM's), its `reasoning_effort` (OpenAI's) among the
        template's variables where the template reads one; `metadata` checked (tags, as OpenAI takes them)."""
        meta = body.get("metadata")
        if meta is not None and not (isinstance(meta, dict) and len(meta) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
            raise BadRequest("metadata must be an object of up to 16 string values")
        template = {k: body[k] for k in TEMPLATE_FIELDS if k in body}
        effort = body.get("reasoning_effort")
        if effort is None:
            return template
        if effort not in EFFORTS:
            raise BadRequest(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {json.dumps(effort)[:40]}")
        kwargs = template.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BadRequest("chat_template_kwargs must be an object")
        if "reasoning_effort" not in str(getattr(self.engine.tokenizer, "chat_template", None) or ""):
            raise BadRequest("reasoning_effort is not supported: this model's chat template has no reasoning effort "
                             "(chat_template_kwargs sets the variables it has, e.g. enable_thinking)")
        template["chat_template_kwargs"] = {"reasoning_effort": effort, **kwargs}
        return template

    def _chat_body(self, body: dict):
        """The messages of a chat body, and the body in the completions fields the rest of `parse` reads."""
        messages = checked_messages(body.get("messages"))
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise BadRequest("give max_tokens or max_completion_tokens, not both")
        logprobs, top = body.get("logprobs", False), body.get("top_logprobs")
        if not isinstance(logprobs, bool):
            raise BadRequest("logprobs must be true or false (top_logprobs says how many alternatives)")
        if top is not None and not logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise BadRequest(f"top_logprobs must be an int in [0, 20], got {json.dumps(top)[:40]}")
        rest = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens", "top_logprobs",
                                                           "metadata", "reasoning_effort", *TEMPLATE_FIELDS,
                                                           *CHAT_NEUTRAL)}
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
        """{prompt: str, add_special_tokens=true} or {messages: [...], tools, chat_template_kwargs,
        add_generation_prompt, continue_final_message} -> {tokens, count, max_model_len}."""
        chat = {"tools", *TEMPLATE_FIELDS}
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body) \
                or set(body) - {"prompt", "messages", "add_special_tokens", "model", *chat} \
                or ("prompt" in body and chat & set(body)):
            raise BadRequest('tokenize takes {"prompt": str, "add_special_tokens": bool} or {"messages": [...], and '
                             'optionally "tools", "chat_template_kwargs", "add_generation_prompt", '
                             '"continue_final_message"}')
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise BadRequest("add_special_tokens must be true or false")
        if "prompt" in body and not isinstance(body["prompt"], str):
            raise BadRequest("prompt must be a string")
        prompt = body["prompt"] if "prompt" in body else checked_messages(body["messages"])
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            raise BadRequest("tools must be a list of OpenAI's function specs")
        ids = self.engine.tokenize(prompt, add_special_tokens=special, **{k: body[k] for k in chat if k in body})
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

    def _texts(self, token_ids, top_logprobs) -> tuple[list[str], list[list[tuple[str, float]]]]:
        """Each token's own text, and each position's alternatives as (text, logprob), in one decoding."""
        texts = self.engine.token_texts(list(token_ids) + [t for row in top_logprobs for t, _ in row])
        alts, k = [], len(token_ids)
        for row in top_logprobs:
            alts.append([(texts[k + j], v) for j, (_, v) in enumerate(row)])
            k += len(row)
        return texts[:len(token_ids)], alts

    def chat_logprobs(self, token_ids, logprobs, top_logprobs) -> list[dict]:
        """The chat API's logprobs.content: per token its text, logprob, UTF-8 bytes and top alternatives."""
        texts, alts = self._texts(token_ids, top_logprobs)
        return [{"token": text, "logprob": lp, "bytes": list(text.encode()),
                 "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in row]}
                for text, lp, row in zip(texts, logprobs, alts)]

    def logprobs(self, token_ids, logprobs, top_logprobs, offset: int) -> dict:
        """OpenAI's completions "logprobs" object for `token_ids`, their texts counted from `offset`."""
        texts, alts = self._texts(token_ids, top_logprobs)
        top = [dict(row) for row in alts]
        starts = []
        for t in texts:
            starts.append(offset)
            offset += len(t)
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": starts}

    @staticmethod
    def reply_id(request_id: int | str, kind: str = "text") -> str:
        """A reply's id: cmpl-, chatcmpl- or (kind "responses": the Responses API's, from its chat reply's) resp_."""
        return f"{REPLY_ID_PREFIX[kind]}{request_id}"

    def envelope(self, request_id: int | str, choice: dict, created: int, usage=None, kind: str = "text",
                 stream: bool = False) -> dict:
        obj = "text_completion" if kind == "text" else "chat.completion.chunk" if stream else "chat.completion"
        out = {"id": self.reply_id(request_id, kind), "object": obj, "created": created,
               "model": self.model_name, "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out


def _usage(out) -> dict:
    """OpenAI's usage of one output: its prompt positions the prefix cache served as prompt_tokens_details'
    cached_tokens."""
    p, g = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g,
            "prompt_tokens_details": {"cached_tokens": out.metrics.cached_prompt_tokens}}


def total_usage(outs) -> dict:
    """The usage of a reply of several outputs (a batch, n choices): the sums."""
    usages = [_usage(o) for o in outs]
    total = {k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    total["prompt_tokens_details"] = {"cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"]
                                                           for u in usages)}
    return total


def _refused(out) -> bool:
    """The engine refused the request before any model ran (a bad prompt, too long, ...): a client error."""
    m = out.metrics
    return out.finish_reason == "error" and m.large_passes == 0 and m.small_steps == 0


def _chain(first, rest):
    yield first
    yield from rest

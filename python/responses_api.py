"""OpenAI's Responses API (POST /v1/responses) over the chat completions path, for python/serve.py: a request becomes a
chat body (`chat_body`), which the service parses and serves as any chat request; its chat reply, whole or streamed,
becomes a `response` object (`response_object`) or the Responses API's typed stream events (`ResponseStream`).

The subset served: `input` as text or a list of items (messages whose content is text or input_text / output_text
parts, function_call and function_call_output items; reasoning items are dropped), `instructions`,
`max_output_tokens`, `temperature`, `top_p`, function `tools` with `tool_choice` and `parallel_tool_calls`,
`text.format` (text, json_object, json_schema), `stream`, `metadata`, `user`, `reasoning.effort` (the chat template's
`reasoning_effort`, where it reads one), `truncation: "auto"` (a conversation too long for the context loses its
earliest turns), `include: ["message.output_text.logprobs"]` and `top_logprobs` (the answer's
token log-probabilities in its output_text part and text deltas), and the extras vLLM takes (`top_k`,
`min_p`, `seed`, penalties, `priority`, `chat_template_kwargs`) and this runtime's `policy`. Nothing is stored:
`store: true` is taken as vLLM takes it without a store (the response says `"store": false`), and what would need a
stored response (`previous_response_id`, `conversation`) or a background run is refused rather than ignored.
"""
from __future__ import annotations

import copy
import json

from openai_api import REPLY_ID_PREFIX
from openai_fields import BadRequest
from reasoning import THINK_CLOSE

FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
          "parallel_tool_calls", "text", "stream", "metadata", "user", "store", "truncation", "include", "reasoning",
          "background", "previous_response_id", "conversation", "top_logprobs"}
LOGPROBS = "message.output_text.logprobs"  # (the one `include` value served)
EXTRAS = ("top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "priority",
          "chat_template_kwargs", "policy", "timeout", "ignore_eos", "min_tokens")  # (vLLM's extras, and ours)
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"{where}: content must be text or a list of input_text / output_text parts (no images or files)")


def _messages(body: dict) -> list[dict]:
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("input must be text or a non-empty list of items")
    out = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") is not None else []
    if out and not isinstance(out[0]["content"], str):
        raise BadRequest("instructions must be text")
    for i, it in enumerate(items):
        kind = it.get("type", "message") if isinstance(it, dict) else None
        if kind == "message" and it.get("role") in ROLES:
            out.append({"role": ROLES[it["role"]], "content": _text(it.get("content"), f"input[{i}]")})
        elif kind == "function_call" and all(isinstance(it.get(k), str) for k in ("call_id", "name", "arguments")):
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # (parallel calls: one assistant turn)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output" and isinstance(it.get("call_id"), str):
            output = it.get("output")
            out.append({"role": "tool", "tool_call_id": it["call_id"],
                        "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind != "reasoning":  # (a model's earlier thinking is not shown to it again)
            raise BadRequest(f"input[{i}] must be a message ({{role: user | system | developer | assistant, "
                             f"content}}), a function_call, a function_call_output or a reasoning item")
    return out


def chat_body(body) -> dict:
    """The chat completions body that asks what a Responses body asks (BadRequest names what cannot be served)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = set(body) - FIELDS - set(EXTRAS)
    if unknown:
        raise BadRequest(f"unsupported field(s): {sorted(unknown)}")
    if not isinstance(body.get("store", False), bool):
        raise BadRequest("store must be true or false")
    if body.get("truncation", "disabled") not in ("disabled", "auto"):
        raise BadRequest(f'truncation must be "disabled" or "auto", got {json.dumps(body["truncation"])[:40]}')
    for key, neutral in (("previous_response_id", None), ("conversation", None), ("background", False)):
        if body.get(key, neutral) != neutral:
            raise BadRequest(f"{key} is not supported (nothing is stored: send the whole conversation as input), got "
                             f"{json.dumps(body[key])[:80]}")
    reasoning = body.get("reasoning") or {}
    if not isinstance(reasoning, dict) or set(reasoning) - {"effort", "summary", "generate_summary"} or \
            reasoning.get("summary") is not None or reasoning.get("generate_summary") is not None:
        raise BadRequest('reasoning must be {"effort": ...} (a summary of the thinking is not written; '
                         f'--reasoning-parser puts the thinking itself in a reasoning item), got '
                         f'{json.dumps(body.get("reasoning"))[:80]}')
    include = body.get("include") or []
    if not isinstance(include, list) or set(include) - {LOGPROBS}:
        raise BadRequest(f'include must be a list of "{LOGPROBS}" (the output text\'s token log-probabilities; '
                         f'nothing else is kept to include), got {json.dumps(include)[:80]}')
    top = body.get("top_logprobs")
    chat = {"messages": _messages(body), "max_completion_tokens": body.get("max_output_tokens"),
            **{k: body[k] for k in ("model", "temperature", "top_p", "stream", "user", "parallel_tool_calls",
                                    *EXTRAS) if k in body}}
    if reasoning.get("effort") is not None:  # (to the chat template, where it reads one: Service.parse checks)
        chat["reasoning_effort"] = reasoning["effort"]
    if wants_logprobs(body):  # (the chat reply's logprobs, then those of its answer's text go to its output_text)
        chat["logprobs"] = True
        if top is not None:
            chat["top_logprobs"] = top
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" for t in tools):
            raise BadRequest('tools must be a list of {"type": "function", "name": ..., "parameters": {...}} (no '
                             'built-in tools)')
        chat["tools"] = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                         for t in tools] or None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or set(choice) != {"type", "name"}:
            raise BadRequest('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}')
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text") or {}, dict) else False
    if fmt is False or (fmt is not None and not isinstance(fmt, dict)):
        raise BadRequest('text must be {"format": {"type": "text" | "json_object" | "json_schema", ...}}')
    if fmt and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items()
                                                                          if k != "type"}}
    elif fmt:
        chat["response_format"] = fmt
    return chat


def wants_logprobs(body: dict) -> bool:
    """Whether a Responses body asks for its output text's log-probabilities (include's value, or top_logprobs)."""
    return LOGPROBS in (body.get("include") or []) or body.get("top_logprobs") is not None


def _think_end(entries: list[dict]) -> int | None:
    """The index of the `</think>` token among chat logprobs entries (the tag is a single token), or None."""
    return next((i for i, e in enumerate(entries) if e["token"] == THINK_CLOSE), None)


def answer_logprobs(entries: list[dict], parsed: bool, thinking: bool, text: str | None,
                    whole: bool = True) -> list[dict]:
    """The chat logprobs `entries` of a reply's answer: with a reasoning parser (`parsed`), those after its
    `</think>` token (the tags are single tokens; none while a `thinking` was cut before it), and, before tool calls
    (`text` the answer's content, `whole` false), those whose texts cover `text`."""
    if parsed:
        end = _think_end(entries)
        entries = entries[end + 1:] if end is not None else [] if thinking else entries
    if whole or text is None:
        return entries
    out, n = [], 0
    for e in entries:
        if n >= len(text.rstrip()):
            break
        out.append(e)
        n += len(e["token"])
    return out


def _response_usage(usage: dict, reasoning_tokens: int) -> dict:
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"], "input_tokens_details": usage["prompt_tokens_details"],
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def _shell(body: dict, rid: str, created: int, model: str) -> dict:
    """A response object's fields that echo the request, with no output yet."""
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    return {"id": rid, "object": "response", "created_at": created, "status": "in_progress", "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "temperature": body.get("temperature", 0.0),
            "top_p": body.get("top_p", 1.0), "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "text": {"format": fmt}, "metadata": body.get("metadata") or {},
            "store": False, "truncation": body.get("truncation", "disabled"), "usage": None,
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None}}


def _finish(resp: dict, finish_reason: str | None, error: str | None) -> dict:
    if finish_reason == "error":
        resp.update(status="failed", error={"code": "server_error", "message": error or "the request failed"})
    elif finish_reason in ("length", "timeout", "cancelled"):
        reason = "max_output_tokens" if finish_reason == "length" else finish_reason
        resp.update(status="incomplete", incomplete_details={"reason": reason})
    else:
        resp["status"] = "completed"
    return resp


def _out_id(rid: str, kind: str) -> str:
    """The id of a response's reasoning or message item."""
    return f"{'rs' if kind == 'reasoning' else 'msg'}_{rid}"


def _reasoning_item(rid: str, text: str) -> dict:
    return {"type": "reasoning", "id": _out_id(rid, "reasoning"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(rid: str, text: str, logprobs: list | None = None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"type": "message", "id": _out_id(rid, "message"), "status": "completed", "role": "assistant",
            "content": [part]}


def _call_item(call: dict) -> dict:
    """A function_call output item of a chat tool call."""
    return {"type": "function_call", "id": f"fc_{call['id']}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


def _items(rid: str, reasoning: str | None, content: str | None, calls: list[dict], logprobs=None) -> list[dict]:
    """A reply's output items: its thinking, its text (an empty one where there is nothing else), its calls."""
    items = [_reasoning_item(rid, reasoning)] if reasoning else []
    if content or not calls:
        items.append(_message_item(rid, content or "", logprobs))
    return items + [_call_item(c) for c in calls]


def response_object(chat: dict, body: dict, model: str, count_tokens) -> dict:
    """The Responses API's response object of a whole chat reply (`count_tokens(text)`: the reasoning's tokens)."""
    choice, rid = chat["choices"][0], chat["id"].removeprefix(REPLY_ID_PREFIX["chat"])
    msg = choice["message"]
    resp = _shell(body, f"{REPLY_ID_PREFIX['responses']}{rid}", chat["created"], model)
    reasoning, calls = msg.get("reasoning_content"), msg.get("tool_calls") or []
    logprobs = None
    if wants_logprobs(body):
        logprobs = answer_logprobs((choice.get("logprobs") or {}).get("content") or [], "reasoning_content" in msg,
                                   bool(reasoning), msg.get("content"), whole=not calls)
    resp["output"] = _items(rid, reasoning, msg.get("content"), calls, logprobs)
    resp["usage"] = _response_usage(chat["usage"], count_tokens(reasoning) if reasoning else 0)
    return _finish(resp, choice["finish_reason"], choice.get("error"))


class ResponseStream:
    """A streamed chat reply's events, as the Responses API's typed events: response.created, then the reasoning's,
    the message's and the calls' items with their deltas, then response.completed (or incomplete, or failed), whose
    response is what `response_object` gives for the whole reply."""

    def __init__(self, body: dict, model: str, count_tokens, parsed: bool = False):
        self.body, self.model, self.count_tokens, self.seq = body, model, count_tokens, 0
        self.logprobs = [] if wants_logprobs(body) else None  # (the answer's, so far)
        self.pending: list = []  # (answer logprobs whose text has not gone out yet)
        self.answering = not parsed  # (with a reasoning parser, the answer's logprobs follow its </think>)
        self.undecided: list = []  # (logprobs of a reply's opening that the parser held back: thinking or answer)
        self.rid = self.resp = None
        self.texts = {"reasoning": "", "message": ""}  # (each streamed item's text so far)
        self.calls: dict = {}  # (by index: id, name, arguments)
        self.open: str | None = None  # the item whose deltas are streaming: "reasoning" | "message"
        self.items: list[dict] = []

    def _ev(self, kind: str, **data) -> tuple[str, dict]:
        self.seq += 1
        return kind, {"type": kind, "sequence_number": self.seq - 1, **data}

    def _close(self) -> list:
        """End the item that was streaming (its done events)."""
        out, idx = [], len(self.items)
        if self.open == "reasoning":
            item = _reasoning_item(self.rid, self.texts["reasoning"])
            out += [self._ev("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0,
                             text=self.texts["reasoning"]),
                    self._ev("response.output_item.done", output_index=idx, item=item)]
        elif self.open == "message":
            lps = None if self.logprobs is None else answer_logprobs(
                self.logprobs + self.pending, False, False, self.texts["message"], whole=not self.calls)
            item = _message_item(self.rid, self.texts["message"], lps)
            part = item["content"][0]
            out += [self._ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                             text=self.texts["message"], logprobs=lps or []),
                    self._ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                             part=part), self._ev("response.output_item.done", output_index=idx, item=item)]
        if self.open is not None:
            self.items.append(item)
        self.open = None
        return out

    def _open(self, kind: str) -> list:
        out, idx = self._close(), len(self.items)
        self.open = kind
        if kind == "reasoning":
            item = {**_reasoning_item(self.rid, ""), "content": []}
            return out + [self._ev("response.output_item.added", output_index=idx, item=item)]
        item = {**_message_item(self.rid, ""), "status": "in_progress", "content": []}
        part = _message_item(self.rid, "", None if self.logprobs is None else [])["content"][0]
        return out + [self._ev("response.output_item.added", output_index=idx, item=item),
                      self._ev("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                               part=part)]

    def _take_logprobs(self, choice: dict, delta: dict) -> None:
        """Keep the answer's share of a chunk's logprobs (those after </think> where the reply thinks)."""
        entries = (choice.get("logprobs") or {}).get("content") or []
        if self.logprobs is None or not entries:
            return
        if not self.answering:
            end = _think_end(entries)
            if end is not None:
                self.answering, entries = True, entries[end + 1:]
            elif self.texts["reasoning"] or delta.get("reasoning_content"):
                self.undecided = []  # (thinking)
                return
            elif delta.get("content"):
                self.answering, entries = True, self.undecided + entries  # (a reply that does not think)
            else:
                self.undecided += entries
                return
        self.pending += entries

    def feed(self, event: dict) -> list[tuple[str, dict]]:
        """The Responses events of one chat.completion.chunk event."""
        out = []
        if self.rid is None:
            self.rid = event["id"].removeprefix(REPLY_ID_PREFIX["chat"])
            self.resp = _shell(self.body, f"{REPLY_ID_PREFIX['responses']}{self.rid}", event["created"], self.model)
            out += [self._ev("response.created", response=copy.deepcopy(self.resp)),
                    self._ev("response.in_progress", response=copy.deepcopy(self.resp))]
        choice = event["choices"][0]
        delta = choice.get("delta", {})
        self._take_logprobs(choice, delta)
        for key, kind in (("reasoning_content", "reasoning"), ("content", "message")):
            text = delta.get(key)
            if text:
                if self.open != kind:
                    out += self._open(kind)
                self.texts[kind] += text
                name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                extra = {} if kind == "reasoning" else {"logprobs": self.pending}
                if kind == "message" and self.logprobs is not None:
                    self.logprobs, self.pending = self.logprobs + self.pending, []
                out.append(self._ev(name, item_id=_out_id(self.rid, kind), output_index=len(self.items),
                                    content_index=0, delta=text, **extra))
        for c in delta.get("tool_calls") or []:  # (named: the arguments in pieces; auto: whole, at the end)
            call = self.calls.setdefault(c["index"], {"id": None, "name": None, "arguments": ""})
            call["id"] = c.get("id") or call["id"]
            call["name"] = c.get("function", {}).get("name") or call["name"]
            call["arguments"] += c.get("function", {}).get("arguments") or ""
        if choice.get("finish_reason") is not None:
            out += self._end(choice, event.get("usage"))
        return out

    def _end(self, choice: dict, usage: dict | None) -> list:
        if not self.items and self.open is None and not self.calls:
            out = self._open("message")  # (an empty reply is an empty message)
        else:
            out = []
        out += self._close()
        for c in (self.calls[i] for i in sorted(self.calls)):
            call = {"id": c["id"], "function": {"name": c["name"], "arguments": c["arguments"]}}
            item, idx = _call_item(call), len(self.items)
            out += [self._ev("response.output_item.added", output_index=idx, item={**item, "arguments": "",
                                                                                   "status": "in_progress"}),
                    self._ev("response.function_call_arguments.delta", item_id=item["id"], output_index=idx,
                             delta=c["arguments"]),
                    self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                             arguments=c["arguments"]),
                    self._ev("response.output_item.done", output_index=idx, item=item)]
            self.items.append(item)
        self.resp["output"] = self.items
        if usage is not None:
            thinking = self.texts["reasoning"]
            self.resp["usage"] = _response_usage(usage, self.count_tokens(thinking) if thinking else 0)
        _finish(self.resp, choice["finish_reason"], choice.get("error"))
        return out + [self._ev(f"response.{self.resp['status']}", response=self.resp)]

"""Tool calls in a chat reply, for python/serve.py: the calls a model writes in its own format (`--tool-call-parser`:
hermes, mistral, llama3_json, granite, vLLM's names) read whole or as its reply streams, and a tool_choice's reply (its
JSON as the calls' arguments) as OpenAI's message.tool_calls. No HTTP here."""
from __future__ import annotations

import json
import re

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"  # Hermes' (Qwen 2.5 / 3, Hermes, SmolLM3 templates write it)
MISTRAL_CALLS = "[TOOL_CALLS]"  # Mistral's (a special token: its replies keep special tokens in their text)
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1+'s, before a JSON call (a special token, skipped from the text by default)
GRANITE_CALLS = ("<|tool_call|>", "<tool_call>")  # Granite 3.0's (a special token) and 3.1+'s, before a JSON list


def _call_of(doc, names) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call object {"name", "arguments" | "parameters"} of one of `names`."""
    if not isinstance(doc, dict) or doc.get("name") not in names:
        return None
    args = doc.get("arguments", doc.get("parameters", {}))
    return doc["name"], args if isinstance(args, str) else json.dumps(args)


# A call written name first, up to its arguments object: what lets the arguments stream as they come (Llama's name
# them "parameters")
_HEADERS = {key: re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"' + key + r'"\s*:\s*(?=\{)')
            for key in ("arguments", "parameters")}


class _Scan:
    """Where a JSON object or array ends, found as its text grows: `run` goes on from where the last call stopped."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.pos, self.end = 0, False, False, 0, None

    def run(self, text: str) -> int | None:
        """The index after the value that opens text[0] (the same text, longer), or None where it has not ended."""
        for i in range(self.pos, len(text) if self.end is None else self.pos):
            c = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = i + 1
                    break
        self.pos = len(text) if self.end is None else self.end
        return self.end


def _header(body: str, key: str) -> tuple[str, int] | None:
    """(name, where its arguments object starts) of a call's JSON written name first; None where it is not (yet)."""
    m = _HEADERS[key].match(body)
    return None if m is None else (json.loads(f'"{m.group(1)}"'), m.end())


def _raw_arguments(body: str, key: str = "arguments") -> tuple[str, int, int] | None:
    """(name, where its arguments object starts, where it ends or -1) of a call's JSON written name first; None where
    it is not (yet) written so."""
    head = _header(body, key)
    if head is None:
        return None
    end = _Scan().run(body[head[1]:])
    return head[0], head[1], -1 if end is None else head[1] + end


def _hermes(text: str, names):
    """Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, one a call, after the content; a last
    block the reply ended inside (no closing tag) is read as far as its JSON goes. A call written name first keeps its
    arguments' text as the model wrote it (what streams as it comes), others get it as JSON re-serialises it."""
    start = text.find(TOOL_OPEN)
    if start < 0:
        return None
    calls, raws = [], []
    for block in text[start:].split(TOOL_OPEN)[1:]:
        body = block.split(TOOL_CLOSE)[0].strip()
        try:
            call = _call_of(json.loads(body), names)
        except ValueError:
            return None
        if call is None:
            return None
        calls.append(call)
        raws += (_raw_sequence(body, "arguments") + [None])[:1]  # (the block's one object)
    return (text[:start].strip() or None), _as_written(calls, raws)


def _raw_sequence(region: str, key: str) -> list[str | None]:
    """Each call object's arguments text as written, in a whole sequence of them (a JSON list's, or `;`-separated):
    None for one not written name first."""
    dec, out, p = json.JSONDecoder(), [], 0
    while True:
        while p < len(region) and region[p] in " \n\t\r,;[]":
            p += 1
        if p >= len(region) or region[p] != "{":
            return out
        try:
            _, end = dec.raw_decode(region, p)
        except ValueError:
            return out
        raw = _raw_arguments(region[p:end], key)
        ok = raw is not None and raw[2] > 0 and region[p + raw[2]:end].strip() == "}"
        out.append(region[p + raw[1]:p + raw[2]] if ok else None)
        p = end


def _as_written(calls: list[tuple[str, str]], raws: list[str | None]) -> list[tuple[str, str]]:
    """The calls with their arguments' texts as the model wrote them, where it wrote them name first."""
    return [(n, raws[i] if i < len(raws) and raws[i] is not None else a) for i, (n, a) in enumerate(calls)]


def _call_list(region: str, names, key: str = "arguments", one: bool = True) -> list[tuple[str, str]] | None:
    """The calls `region` writes as a JSON list of {"name", key} objects (or, with `one`, as a single such object),
    their arguments as written where written name first; None where it is not calls of `names`."""
    try:
        docs = json.loads(region)
    except ValueError:
        return None
    calls = [_call_of(d, names) for d in (docs if isinstance(docs, list) else [docs] if one else [])]
    if not calls or None in calls:
        return None
    return _as_written(calls, _raw_sequence(region, key))


def _mistral(text: str, names):
    """Mistral: `[TOOL_CALLS]` and a JSON list of {"name", "arguments"} after the content."""
    start = text.find(MISTRAL_CALLS)
    calls = None if start < 0 else _call_list(text[start + len(MISTRAL_CALLS):], names)
    return None if calls is None else ((text[:start].strip() or None), calls)


def _granite_region(text: str) -> str | None:
    """What follows Granite's marker where the reply opens with it (its calls, a JSON list), else None."""
    head = text.lstrip()
    marker = next((m for m in GRANITE_CALLS if head.startswith(m)), None)
    return None if marker is None else head[len(marker):]


def _granite(text: str, names):
    """Granite 3.x: the whole reply `<|tool_call|>` (3.0) or `<tool_call>` (3.1+) and a JSON list of {"name",
    "arguments"}, and no other content."""
    region = _granite_region(text)
    calls = None if region is None else _call_list(region, names)
    return None if calls is None else (None, calls)


def _llama3_json(text: str, names):
    """Llama 3.1+'s JSON calls: the whole reply (after an optional `<|python_tag|>`) one or more {"name", "parameters"}
    objects separated by `;`, and no other content."""
    body = text.strip()
    body = body[len(PYTHON_TAG):].strip() if body.startswith(PYTHON_TAG) else body
    if not body.startswith("{"):
        return None
    dec, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            doc, end = dec.raw_decode(body, at)
        except ValueError:
            return None
        call = _call_of(doc, names)
        if call is None:
            return None
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \n\t;":
            at += 1
    return None, _as_written(calls, _raw_sequence(body, "parameters"))


def _required(text: str, names):
    """tool_choice "required"'s reply, which structured outputs hold to a JSON list of {"name", "parameters"}."""
    calls = _call_list(text, names, "parameters", one=False)
    return None if calls is None else (None, calls)


TOOL_CALL_PARSERS = {"hermes": _hermes, "mistral": _mistral, "llama3_json": _llama3_json,  # serve.py --tool-call-parser
                     "granite": _granite}
_FORMATS = {**TOOL_CALL_PARSERS, "required": _required}  # (and tool_choice "required"'s list, read alike)


def parse_tool_calls(text: str, names, parser: str = "hermes") -> tuple[str | None, list[tuple[str, str]]] | None:
    """The tool calls a reply wrote in `parser`'s format: (the content before them, or None where there is none;
    [(name, arguments as JSON text)]). None where the text holds no call, or one that is not a JSON call of one of
    `names` (the reply is then its text, as vLLM's parsers have it)."""
    return _FORMATS[parser](text, names)


def call_start(text: str, parser: str) -> int:
    """Where a tool call may begin in a reply streamed so far (its content goes out before that), in `parser`'s
    format: the marker, or the start of a tail that could be the marker's beginning; len(text) where none may."""
    if parser == "required":  # (the whole reply is the list of calls)
        return 0
    if parser == "llama3_json":  # (a call is the whole reply: it may begin only at its start)
        head = text.lstrip()
        return 0 if head.startswith(("{", PYTHON_TAG)) or (PYTHON_TAG.startswith(head)) else len(text)
    if parser == "granite":  # (so are Granite's, after the marker)
        head = text.lstrip()
        return 0 if any(head.startswith(m) or m.startswith(head) for m in GRANITE_CALLS) else len(text)
    marker = TOOL_OPEN if parser == "hermes" else MISTRAL_CALLS
    at = text.find(marker)
    if at >= 0:
        return at
    return len(text) - next((n for n in range(min(len(marker) - 1, len(text)), 0, -1)
                             if marker.startswith(text[-n:])), 0)


def _calls(calls: list[tuple[str, str]], call_id: str, stream: bool = False) -> list[dict]:
    return [{**({"index": i} if stream else {}), "id": f"{call_id}-{i}", "type": "function",
             "function": {"name": n, "arguments": a}} for i, (n, a) in enumerate(calls)]


def tool_message(text: str, finish_reason: str, spec: dict, call_id: str) -> tuple[dict, str]:
    """(the chat message, finish_reason) of a tool-call reply: the calls, once the JSON was finished (by EOS); the text
    as content otherwise (the request ended first: max_tokens, a timeout; or the model's tokens could not write the
    rest, where structured outputs let it end). "auto": the calls the model wrote in its format, after its content."""
    if spec["mode"] == "auto":
        got = parse_tool_calls(text, spec["names"], spec["parser"])
        if got is None:
            return {"role": "assistant", "content": text}, "stop" if finish_reason == "eos" else finish_reason
        calls = got[1] if spec.get("parallel", True) else got[1][:1]  # (parallel_tool_calls false: the first)
        return {"role": "assistant", "content": got[0], "tool_calls": _calls(calls, call_id)}, "tool_calls"
    got = None
    if finish_reason == "eos":
        if spec["mode"] == "named":
            try:
                json.loads(text)
                got = [(spec["name"], text)]
            except ValueError:  # (json.JSONDecodeError included)
                pass
        else:
            got = (_required(text, spec["names"]) or (None, None))[1]
    if got is None:
        return {"role": "assistant", "content": text}, "stop" if finish_reason == "eos" else finish_reason
    reason = "stop" if spec["mode"] == "named" else "tool_calls"  # (OpenAI's finish_reason for a named tool_choice)
    return {"role": "assistant", "content": None, "tool_calls": _calls(got, call_id)}, reason



class AutoToolStream:
    """A streamed "auto" reply (or a "required" one, its whole text the list of calls): its text streams as content
    until a tool call may begin (a tail that could start the opening tag is held back). The calls written name first
    stream as they come, as vLLM streams them: a call's id and name once its arguments begin, then their text piece
    by piece (`tool_calls` deltas by index); the rest is held, and the last event carries what remains of the calls
    (finish_reason "tool_calls"), or, where the text held no well-formed call and none had begun to stream, the rest
    as content. A reply that turns malformed after a call began to stream ends with the calls as they went out."""

    def __init__(self, spec: dict, call_id: str):
        self.spec, self.call_id, self.text, self.sent = spec, call_id, "", 0
        self.streamed: list[dict] = []  # per call streamed so far: where its arguments start, their scan, what went out
        self.limit = None if spec.get("parallel", True) else 1  # (parallel_tool_calls false: the first call alone)

    def _objects(self) -> list[str]:
        """The call objects' texts so far, each from its opening brace, in order (the last may be unfinished): Hermes'
        blocks, or the objects after Mistral's marker or in Llama's reply (their ends found by the calls' scans)."""
        parser, text = self.spec["parser"], self.text
        if parser == "hermes":
            start = text.find(TOOL_OPEN)
            return [] if start < 0 else [b.split(TOOL_CLOSE)[0] for b in text[start:].split(TOOL_OPEN)[1:]]
        if parser == "mistral":
            start = text.find(MISTRAL_CALLS)
            region = "" if start < 0 else text[start + len(MISTRAL_CALLS):]
        elif parser == "required":
            region = text.lstrip()
        elif parser == "granite":  # (a JSON list after the marker: not Hermes' single object after <tool_call>)
            region = _granite_region(text) or ""
            region = region if region.lstrip().startswith("[") else ""
        else:
            region = text.lstrip()
            region = region[len(PYTHON_TAG):] if region.startswith(PYTHON_TAG) else region
        objs, p = [], 0
        for call in [*self.streamed, None]:
            while p < len(region) and region[p] in " \n\t\r,;[":
                p += 1
            if p >= len(region) or call is None:
                objs += [region[p:]] if p < len(region) else []
                break
            end = call["scan"].run(region[p + call["at"]:])
            q = len(region) if end is None else p + call["at"] + end
            while q < len(region) and region[q].isspace():
                q += 1
            if q >= len(region) or region[q] != "}":
                objs.append(region[p:])
                break
            objs.append(region[p:q + 1])
            p = q + 1
        return objs

    def _stream_calls(self) -> list[dict]:
        """The tool_calls deltas of what the calls hold now beyond what went out (each call's arguments scanned once,
        however many pieces they come in)."""
        key = "parameters" if self.spec["parser"] in ("llama3_json", "required") else "arguments"
        out, grew = [], True
        while grew:  # (a piece may finish one call and begin the next)
            grew = False
            for k, body in enumerate(self._objects()[:self.limit]):
                if k == len(self.streamed):
                    head = _header(body, key)
                    if head is None or head[0] not in self.spec["names"]:
                        break  # (not written name first, or not yet: it goes out whole at the end, and those after)
                    self.streamed.append({"at": head[1], "scan": _Scan(), "sent": ""})
                    out.append({"index": k, "id": f"{self.call_id}-{k}", "type": "function",
                                "function": {"name": head[0], "arguments": ""}})
                    grew = True
                call = self.streamed[k]
                args = body[call["at"]:]
                end = call["scan"].run(args)
                args = args if end is None else args[:end]
                if len(args) > len(call["sent"]):
                    out.append({"index": k, "function": {"arguments": args[len(call["sent"]):]}})
                    call["sent"] = args
        return out

    def delta(self, delta: dict, finished: bool, finish_reason: str | None) -> tuple[dict, str | None]:
        self.text += delta.get("content") or ""
        out = {k: v for k, v in delta.items() if k != "content"}
        parser = self.spec["parser"]
        if finished:
            got = parse_tool_calls(self.text, self.spec["names"], parser)
            if got is None and not self.streamed:
                out["content"], self.sent = self.text[self.sent:], len(self.text)
                return out, finish_reason
            content = self.text[:call_start(self.text, parser)].rstrip()[self.sent:]
            calls = self._stream_calls()
            if got is not None:  # (what did not stream: the arguments' rest, the calls written otherwise)
                for k, (name, args) in enumerate(got[1][:self.limit]):
                    if k < len(self.streamed):
                        sent = self.streamed[k]["sent"]
                        rest = args[len(sent):] if args.startswith(sent) else ""
                        calls += [{"index": k, "function": {"arguments": rest}}] if rest else []
                    else:
                        calls.append({"index": k, "id": f"{self.call_id}-{k}", "type": "function",
                                      "function": {"name": name, "arguments": args}})
            out.update(content=content or None, tool_calls=calls)
            return out, "tool_calls"
        at = max(call_start(self.text, parser), self.sent)
        out["content"], self.sent = self.text[self.sent:at], at
        calls = self._stream_calls()
        if calls:
            out["tool_calls"] = calls
        return out, finish_reason


def tool_delta(delta: dict, spec: dict, call_id: str, first: bool) -> dict:
    """A streamed chat delta of a named tool_choice's reply: its text as the call's arguments (the call's id, type
    and name in the first), as vLLM streams tool calls."""
    if first:
        return {"role": "assistant", "content": None,
                "tool_calls": _calls([(spec["name"], delta.get("content", ""))], call_id, stream=True)}
    return {"tool_calls": [{"index": 0, "function": {"arguments": delta.get("content", "")}}]}

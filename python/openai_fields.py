"""What an OpenAI request body may hold, checked, for python/openai_api.py's Service: the fields each API takes (and
those taken only at their neutral values), the sampling fields' readings (logit_bias, seed, numbers), the output
constraint (`response_format`, vLLM's structured_outputs and guided_*), the tools (`tool_spec`), the prompt's and the
messages' shapes. Each problem is a `BadRequest` naming the field."""
from __future__ import annotations

import re
import secrets


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream", "timeout",
          "policy", "model", "n", "user", "ignore_eos", "logprobs", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "min_tokens", "logit_bias", "include_stop_str_in_output", "skip_special_tokens",
          "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
          "guided_whitespace_pattern", "priority", "allowed_token_ids", "bad_words", "stop_token_ids",
          "truncate_prompt_tokens"}
# Fields clients send at their neutral values: accepted there (they change nothing), refused otherwise
NEUTRAL = {"best_of": (1,), "suffix": (None,)}
CHAT_NEUTRAL = {"store": (False,), "service_tier": ("auto", "default", None), "modalities": (["text"],),
                "audio": (None,), "prediction": (None,), "web_search_options": (None,), "verbosity": ("medium", None)}
FIELDS |= set(NEUTRAL) | {"stream_options", "echo"}
TEMPLATE_FIELDS = ("chat_template_kwargs", "add_generation_prompt", "continue_final_message")  # vLLM's
CHAT_FIELDS = FIELDS - {"prompt", "echo", *NEUTRAL} | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "metadata",
    "reasoning_effort", *TEMPLATE_FIELDS, *CHAT_NEUTRAL}
EFFORTS = ("none", "minimal", "low", "medium", "high")  # OpenAI's reasoning_effort values
MAX_N = 16  # completions one request may ask for per prompt (n)
MAX_BATCH_PROMPTS = 64  # prompts one completions request may carry (each a choice of the reply)


def logit_bias_of(body: dict) -> dict:
    """OpenAI's logit_bias: {"token id": bias} (JSON keys are strings), or null."""
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict) or not all(isinstance(k, str) and k.isdigit() for k in bias):
        raise BadRequest('logit_bias must be an object {"token id": bias}, e.g. {"50256": -100}')
    return {int(k): float(x) if isinstance(x, int) and not isinstance(x, bool) else x for k, x in bias.items()}


def output_constraint(body: dict):
    """The body's output constraint as a dict of StructuredOutputs' fields, or None: OpenAI's response_format
    ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}), vLLM's structured_outputs
    ({"json" | "regex" | "choice" | "json_object": ...}) or its older guided_json / guided_regex / guided_choice
    (with guided_whitespace_pattern). At most one of them."""
    given = [k for k in ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice")
             if body.get(k) is not None]
    if len(given) > 1:
        raise BadRequest(f"give one output constraint, not {' and '.join(given)}")
    ws = body.get("guided_whitespace_pattern")
    if ws is not None and given[:1] not in (["guided_json"], ["response_format"]):
        raise BadRequest("guided_whitespace_pattern goes with guided_json or a JSON response_format")
    extra = {} if ws is None else {"whitespace_pattern": ws}
    if not given:
        return None
    key, value = given[0], body[given[0]]
    if key == "response_format":
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "text" and set(value) == {"type"}:
            return None
        if kind == "json_object" and set(value) == {"type"}:
            return {"json_object": True, **extra}
        schema = value.get("json_schema") if kind == "json_schema" else None
        if (isinstance(schema, dict) and isinstance(schema.get("schema"), dict)
                and set(value) == {"type", "json_schema"}
                and not set(schema) - {"name", "description", "schema", "strict"}):
            return {"json": schema["schema"], **extra}
        raise BadRequest('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                         '"json_schema": {"name": ..., "schema": {...}}}')
    if key == "structured_outputs":
        if not isinstance(value, dict):
            raise BadRequest("structured_outputs must be an object (json, regex, choice or json_object)")
        return value
    return {{"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice"}[key]: value, **extra}


def tool_spec(body: dict, parser: str | None = None) -> dict | None:
    """What a chat body's tools and tool_choice ask for: None (no tool call: no tools, or tool_choice "none"), or
    {"mode": "named", "name": the function, "json": its parameters' schema, "tools": [...]} (tool_choice naming a
    function: the reply is one call of it) or {"mode": "required", "json": a schema of a list of calls, "tools": [...]}
    (tool_choice "required": one or more calls of any of them; one with parallel_tool_calls false). The arguments are
    held to the functions' parameter schemas by structured outputs. "auto" (OpenAI's default with tools): the model
    decides, and `parser` reads the calls it writes in its own format ({"mode": "auto", "names": [...], "tools": [...],
    "parser": parser}); refused without one."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools")
        return None
    if not isinstance(tools, list) or not tools:
        raise BadRequest('tools must be a non-empty list of {"type": "function", "function": {"name": ..., '
                         '"parameters": {...}}}')
    specs = {}
    for t in tools:
        ok = isinstance(t, dict) and t.get("type") == "function" and set(t) == {"type", "function"}
        fn = t.get("function") if ok else None
        if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fn["name"])
                or set(fn) - {"name", "description", "parameters", "strict"}
                or not isinstance(fn.get("parameters", {}), dict)):
            raise BadRequest('each tool must be {"type": "function", "function": {"name": letters, digits, _ or - (at '
                             'most 64), "description": ..., "parameters": a JSON Schema}}')
        if fn["name"] in specs:
            raise BadRequest(f"tools name the function {fn['name']!r} twice")
        specs[fn["name"]] = fn.get("parameters") or {"type": "object"}
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be true or false")
    if (choice is None or choice == "auto") and parser is not None:
        return {"mode": "auto", "names": list(specs), "tools": tools, "parser": parser, "parallel": parallel}
    if choice is None or choice == "auto":
        raise BadRequest('tool_choice "auto" (the default with tools) needs a parser of the model\'s own tool-call '
                         'format (serve.py --tool-call-parser hermes, for models that write <tool_call> blocks): '
                         'name a function ({"type": "function", "function": {"name": ...}}), or say "required" or '
                         '"none"')
    if choice == "none":
        return None
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": p},
                  "required": ["name", "parameters"]} for n, p in specs.items()]
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return {"mode": "required", "json": schema, "tools": tools, "names": list(specs), "parser": "required",
                "parallel": parallel}
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if name not in specs:
        raise BadRequest(f'tool_choice must be "none", "required", or {{"type": "function", "function": {{"name": one '
                         f'of {sorted(specs)}}}}}')
    return {"mode": "named", "name": name, "json": specs[name], "tools": tools}


def seed_of(body: dict, draw=None):
    """The request's sampling seed; absent or null, a fresh random one (OpenAI's and vLLM's meaning: two such requests
    sample independently), below 2^63 - MAX_N so that the n choices' seed + i stay seeds; `draw(n)` draws it (a
    server's seeded generator, serve.py --seed), else the system's randomness. Give one to reproduce."""
    seed = body.get("seed")
    return (draw or secrets.randbelow)(2 ** 63 - MAX_N) if seed is None else seed


def float_field(body: dict, key: str, default: float):
    """A float field of the body (JSON's integers too); anything else is left for SamplingParams to refuse."""
    x = body.get(key, default)
    return float(x) if isinstance(x, int) and not isinstance(x, bool) else x


def checked_messages(messages) -> list[dict]:
    """A chat body's messages, as far as their shape goes (the engine checks each message's role and content)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest('messages must be a non-empty list of {"role": ..., "content": ...} objects')
    return messages


def one_prompt(p) -> bool:
    return isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p))


def is_batch(prompt) -> bool:
    """OpenAI's batch form of a completions prompt: a non-empty list of strings or of token-id lists."""
    return isinstance(prompt, list) and len(prompt) > 0 and all(isinstance(p, (str, list)) for p in prompt)

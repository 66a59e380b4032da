"""Prompts in, text out: tokenisation with per-prompt errors, and incremental detokenisation."""
from __future__ import annotations

import functools
import inspect
import json

from bild_kernels.engine.sequence import Sequence


ROLES = ("system", "user", "assistant", "tool")
_SHAPE = ("{'role': system | user | assistant | tool, 'content': a string} (an assistant's content may be None beside "
          "its 'tool_calls': [{'id', 'type': 'function', 'function': {'name', 'arguments'}}]; a tool's message may "
          "carry its 'tool_call_id' and 'name')")


def checked_message(m: dict) -> dict | None:
    """A chat message as the template gets it (OpenAI's shape; an assistant's calls' arguments, JSON text in OpenAI's
    messages, as the objects Hugging Face's templates read, as vLLM hands them), or None where it is malformed."""
    role = m.get("role")
    if role not in ROLES or set(m) - {"role", "content", "tool_calls", "tool_call_id", "name"}:
        return None
    calls = m.get("tool_calls")
    if not isinstance(m.get("content"), str) and not (role == "assistant" and calls and m.get("content", 0) is None):
        return None
    if ("tool_call_id" in m and (role != "tool" or not isinstance(m["tool_call_id"], str))) or (
            "name" in m and not isinstance(m["name"], str)):
        return None
    if "tool_calls" not in m:
        return dict(m)
    if role != "assistant" or not isinstance(calls, list) or not calls:
        return None
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if (not isinstance(fn, dict) or c.get("type", "function") != "function" or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("arguments", "{}"), (str, dict))):
            return None
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            args = parsed if isinstance(parsed, dict) else args
        out.append({**c, "type": "function", "function": {**fn, "arguments": args}})
    return {**m, "tool_calls": out}


def is_conversation(p) -> bool:
    """A prompt given as chat messages: a non-empty list of dicts ({"role": ..., "content": ...})."""
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(m, dict) for m in p)


def conversation_ids(tokenizer, messages, tools=None, template=None) -> tuple[list[int] | None, str | None]:
    """(token ids, None) of chat messages through the tokenizer's chat template, with the assistant's generation
    prompt appended (and `tools`, OpenAI's function specs, handed to the template as Hugging Face's `tools`;
    `template`, a checked `template_options` dict, its other arguments); (None, why) when the messages or the
    tokenizer cannot make one."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None, "a conversation needs a chat template, and the tokenizer has none (pass a string or token ids)"
    checked = [checked_message(m) for m in messages]
    for j, m in enumerate(checked):
        if m is None:
            return None, f"message {j} must be {_SHAPE}, got {str(messages[j])[:80]}"
    messages = checked
    if (template or {}).get("continue_final_message") and messages[-1]["role"] != "assistant":
        return None, "continue_final_message continues the last message, which must be the assistant's"
    try:
        ids = template_ids(tokenizer, messages, tools, template)
    except Exception as e:  # the template's own checks (roles out of order, say) raise from Jinja
        return None, f"the chat template refused these messages: {type(e).__name__}: {e}"
    return (ids, None) if ids else (None, "the chat template made no tokens of these messages")


def template_ids(tokenizer, messages, tools=None, template=None) -> list[int]:
    """The chat template's token ids for `messages`, the assistant's generation prompt appended (unless `template`,
    a checked `template_options` dict, says otherwise)."""
    template = template or {}
    kw = dict(template.get("chat_template_kwargs") or {})
    if tools is not None:
        kw["tools"] = list(tools)
    if template.get("continue_final_message"):
        kw["continue_final_message"] = True
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=template.get("add_generation_prompt",
                                                                                            True),
                                        tokenize=True, **kw)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@functools.lru_cache(maxsize=16)
def _template_parameters(cls) -> frozenset:
    """apply_chat_template's own parameters for a tokenizer class (read once a class, not once a request)."""
    return frozenset(inspect.signature(cls.apply_chat_template).parameters)


def template_options(tokenizer, chat_template_kwargs=None, add_generation_prompt=None,
                     continue_final_message=False) -> dict:
    """How a conversation goes through the chat template, checked (vLLM's request fields): `chat_template_kwargs`,
    variables the template reads (Qwen3's {"enable_thinking": False}, say); `add_generation_prompt` (default: True,
    False with continue_final_message), the assistant's header after the messages; `continue_final_message`, the
    last (assistant's) message left open for the model to go on with. ValueError names what is wrong."""
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, dict) or not all(isinstance(k, str) for k in chat_template_kwargs):
            raise ValueError("chat_template_kwargs must be an object of the template's variables, e.g. "
                             '{"enable_thinking": false}')
        own = _template_parameters(type(tokenizer)) if tokenizer is not None else frozenset()
        clash = sorted(own & set(chat_template_kwargs) | {"tools", "messages"} & set(chat_template_kwargs))
        if clash:
            raise ValueError(f"chat_template_kwargs may not set {clash}: the request's own fields say those")
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt exclude each other: the first goes on "
                         "with the last message, the second opens a new one")
    return {"chat_template_kwargs": dict(chat_template_kwargs or {}),
            "add_generation_prompt": not continue_final_message if add_generation_prompt is None
            else add_generation_prompt, "continue_final_message": bool(continue_final_message)}


def resolve_prompts(prompts, tokenizer, vocab_size: int, chat_template: bool):
    """Yield (token_ids, None) for each valid prompt, or (None, error message) for a bad one. A prompt is a string
    (with chat_template: one user message through the tokenizer's chat template), a list of token ids, or a
    conversation (a list of {"role", "content"} messages, always through the chat template)."""
    for i, p in enumerate(prompts):
        if is_conversation(p):
            ids, why = conversation_ids(tokenizer, p)
            yield (ids, None) if why is None else (None, f"prompt {i}: {why}")
        elif isinstance(p, str):
            if not p:
                yield None, f"prompt {i} is empty"
                continue
            if tokenizer is None:
                yield None, f"prompt {i} is a string but the engine has no tokenizer: pass token ids"
                continue
            if chat_template and getattr(tokenizer, "chat_template", None):
                ids = template_ids(tokenizer, [{"role": "user", "content": p}])
            else:
                ids = tokenizer(p)["input_ids"]
            yield list(ids), None
        elif isinstance(p, (list, tuple)) or (hasattr(p, "tolist") and not isinstance(p, str)):
            ids = p.tolist() if hasattr(p, "tolist") else list(p)
            if not ids:
                yield None, f"prompt {i} is empty"
            elif not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                yield None, f"prompt {i} must hold int token ids"
            elif min(ids) < 0 or max(ids) >= vocab_size:
                bad = next(t for t in ids if t < 0 or t >= vocab_size)
                yield None, f"prompt {i} holds token id {bad}, outside the vocabulary [0, {vocab_size})"
            else:
                yield ids, None
        else:
            yield None, (f"prompt {i} must be a string, a list of token ids or a list of chat messages, "
                         f"got {type(p).__name__}")


def _stop_prefix_len(text: str, stops) -> int:
    """The longest tail of `text` that is a proper start of one of the stop strings among `stops` (0: none)."""
    best = 0
    for s in stops:
        if isinstance(s, str):
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
    return best


class Detokenizer:
    """Turns each request's committed tokens into text, streaming only what is new and stable."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, seq: Sequence) -> str | None:
        """The output's text: its tokens decoded, ending where a stop string begins (`truncate_at_stop`)."""
        if self.tokenizer is None:
            return None
        full = self.tokenizer.decode(seq.output_ids, skip_special_tokens=seq.params.skip_special_tokens)
        return full if seq.text_cut is None else full[:seq.text_cut]

    def delta(self, seq: Sequence) -> str:
        """The text committed since the last call that can no longer change: while the request runs, a trailing
        replacement char (the next token may complete a multi-byte character) and a tail that could be the start of
        one of its stop strings (it is not returned if the stop string completes) are held back."""
        if self.tokenizer is None:
            return ""
        full = self.text(seq)
        stable = full[:-1] if full.endswith("\ufffd") else full
        if seq.finish_reason is None:
            stable = stable[:len(stable) - _stop_prefix_len(stable, seq.params.stop)]
        new = stable[seq.text_len:] if len(stable) > seq.text_len else ""
        seq.text_len = max(seq.text_len, len(stable))
        return new

    @staticmethod
    def text_before_last(tokenizer, seq: Sequence) -> int:
        """The length of the output's text without its last token: where the text of a request that EOS or a stop id
        ended ends (that token's text, shown where skip_special_tokens is off or the stop id is an ordinary token, is
        not part of it unless include_stop_str_in_output; vLLM's rule)."""
        return len(tokenizer.decode(seq.output_ids[:-1], skip_special_tokens=seq.params.skip_special_tokens))

    @staticmethod
    def truncate_at_stop(tokenizer, seq: Sequence, stops: list[str], first_new: int) -> bool:
        """If a stop string appears in the output, end the request at the token that completes it (kept, as vLLM
        keeps it) and its text where the earliest such stop string begins, or ends with include_stop_str_in_output
        (`text_cut`); True if so. With `min_tokens`, only an occurrence that ends past the text of the output's first
        min_tokens tokens counts."""
        out, special = seq.output_ids, seq.params.skip_special_tokens
        floor = seq.params.min_tokens
        base = max(first_new - seq.prompt_len, floor, 0)
        if base >= len(out):
            return False
        skip = len(tokenizer.decode(out[:floor], skip_special_tokens=special)) if floor > 0 else 0
        for n in range(base + 1, len(out) + 1):
            text = tokenizer.decode(out[:n], skip_special_tokens=special)
            found = [(i, s) for i, s in ((text.find(s, max(skip - len(s) + 1, 0)), s) for s in stops) if i >= 0]
            if found:
                del seq.tokens[seq.prompt_len + n:]
                at, stop = min(found, key=lambda f: (f[0], -len(f[1])))
                seq.text_cut = at + len(stop) if seq.params.include_stop_str_in_output else at
                return True
        return False


class TokenizerMethods:
    """Engine methods on the tokenizer, each under the engine's tokenizer lock (mixed into `Engine`)."""

    def token_texts(self, ids) -> list[str]:
        """Each token id's own text, as the tokenizer decodes it alone (a piece of a multi-byte character reads as
        U+FFFD): to show a request's `top_logprobs`, say. str(id) when the engine has no tokenizer."""
        ids = self._checked_ids(ids)
        if self.tokenizer is None:
            return [str(t) for t in ids]
        with self._scheduler.tok_lock:  # (the tokenizer is not shared across threads)
            return [self.tokenizer.decode([t]) for t in ids]

    def tokenize(self, prompt, *, add_special_tokens: bool = True, tools=None, chat_template_kwargs=None,
                 add_generation_prompt: bool | None = None, continue_final_message: bool = False) -> list[int]:
        """The token ids `generate` would run for `prompt`: a string (with add_special_tokens, the tokenizer's own
        BOS and the like, as generate adds them), or a conversation (a list of {"role", "content"} messages, through
        the chat template with the assistant's generation prompt; `tools`, OpenAI's function specs, go to the template
        too, for the templates that show them; `chat_template_kwargs`, the template's own variables such as Qwen3's
        {"enable_thinking": False}; `continue_final_message`, the last assistant message left open for the model to
        go on with, vLLM's and Hugging Face's meanings). ValueError for what generate would refuse."""
        if self.tokenizer is None:
            raise ValueError("the engine has no tokenizer: it takes token ids only")
        template = template_options(self.tokenizer, chat_template_kwargs, add_generation_prompt,
                                    continue_final_message)
        given = tools is not None or chat_template_kwargs is not None or add_generation_prompt is not None \
            or continue_final_message
        if given and not is_conversation(prompt):
            raise ValueError("tools and the chat template's options go with a conversation (a list of chat messages)")
        if is_conversation(prompt):
            with self._scheduler.tok_lock:
                ids, why = conversation_ids(self.tokenizer, prompt, tools, template)
            if why is not None:
                raise ValueError(why)
            return ids
        if not isinstance(prompt, str):
            raise ValueError(f"tokenize takes a string or a list of chat messages, got {type(prompt).__name__}")
        with self._scheduler.tok_lock:
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, ids) -> str:
        """The text of token ids (special tokens included), as one piece."""
        ids = self._checked_ids(ids)
        if self.tokenizer is None:
            raise ValueError("the engine has no tokenizer: it cannot turn ids into text")
        with self._scheduler.tok_lock:
            return self.tokenizer.decode(ids)

    def _checked_ids(self, ids) -> list[int]:
        ids = list(ids)
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be ints in [0, {self.vocab_size}), got {bad[:5]}")
        return ids

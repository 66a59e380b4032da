"""Reasoning models' thinking, apart from their answer: `serve.py --reasoning-parser` (vLLM's names) puts what a chat
reply wrote inside <think> ... </think> in the message's `reasoning_content` and the rest in its `content`, whole or
streamed. No HTTP here.

Two formats, each read the same way whole and streamed:
  deepseek_r1  everything up to the first </think> is reasoning (an opening <think> at the start dropped), the rest
               the answer; a reply without </think> is all reasoning (it was cut while thinking). For models whose
               template opens the <think> in the prompt: DeepSeek-R1 and its distillations, QwQ, Qwen3's thinking-only
               2507 models.
  qwen3        a reply that opens with <think> reasons until </think> (or its end); any other reply is all answer
               (Qwen3's hybrid models with thinking turned off: chat_template_kwargs {"enable_thinking": false}).
"""
from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def _partial(text: str, marker: str) -> int:
    """The length of the longest tail of `text` that is a proper start of `marker` (0: none)."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if marker.startswith(text[-n:])), 0)


def split_reasoning(text: str, parser: str) -> tuple[str | None, str | None]:
    """(reasoning, answer) of a whole reply in `parser`'s format; None for a part that is empty."""
    if parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning parser must be one of {list(REASONING_PARSERS)}, got {parser!r}")
    opened = text.lstrip().startswith(THINK_OPEN)
    if parser == "qwen3" and not opened:
        return None, text or None
    body = text.lstrip()[len(THINK_OPEN):] if opened else text
    at = body.find(THINK_CLOSE)
    if at < 0:
        return body or None, None
    return body[:at] or None, body[at + len(THINK_CLOSE):] or None


class ReasoningStream:
    """A streamed reply's text split as `split_reasoning` splits it whole: feed each piece of text, get (reasoning,
    answer) pieces to send; a tail that could begin a tag is held until the next piece shows what it is (or the
    last, `finished`), so that a tag never reaches the client. The pieces joined equal the whole split."""

    def __init__(self, parser: str):
        split_reasoning("", parser)  # (checks the name)
        self.parser = parser
        self.state = "start"  # start: whether the reply opens with <think> is not known yet | think | answer
        self.held = ""

    def feed(self, text: str, finished: bool = False) -> tuple[str, str]:
        self.held += text
        reasoning, answer = "", ""
        if self.state == "start":
            head = self.held.lstrip()
            if head.startswith(THINK_OPEN):
                self.held, self.state = head[len(THINK_OPEN):], "think"
            elif (THINK_OPEN.startswith(head) or not head) and not finished:
                return "", ""  # (it may still open with <think>)
            else:
                self.state = "think" if self.parser == "deepseek_r1" else "answer"
        if self.state == "think":
            at = self.held.find(THINK_CLOSE)
            if at >= 0:
                reasoning, self.held = self.held[:at], self.held[at + len(THINK_CLOSE):]
                self.state = "answer"
            else:
                keep = 0 if finished else _partial(self.held, THINK_CLOSE)
                reasoning, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                return reasoning, ""
        answer, self.held = self.held, ""
        return reasoning, answer


def reasoning_message(message: dict, parser: str) -> dict:
    """A whole chat message with its content split into reasoning_content and content (vLLM's field names)."""
    reasoning, answer = split_reasoning(message.get("content") or "", parser)
    return {**message, "reasoning_content": reasoning, "content": answer}


def reasoning_delta(stream: ReasoningStream, delta: dict, finished: bool) -> dict:
    """A streamed chat delta with its content split: reasoning_content and content, each present where not empty."""
    reasoning, answer = stream.feed(delta.get("content") or "", finished)
    out = {k: v for k, v in delta.items() if k != "content"}
    if reasoning:
        out["reasoning_content"] = reasoning
    if answer or "role" in delta:
        out["content"] = answer
    return out

"""Structured outputs: a request's text held to a regular expression, a JSON Schema, a list of choices or any JSON
object (vLLM's `structured_outputs` / guided decoding, OpenAI's `response_format`).

The large model's distribution is masked to the tokens that keep the text on the pattern at every position it
scores (`ops.apply_token_bitmask`), so every policy verifies against the constrained distribution: `Greedy()` is
exact against the constrained greedy text, `SpeculativeSampling()` samples the constrained distribution, and a draft
token the pattern does not allow is rejected where it stands. The small model drafts from its own distribution under
the same masks (the eager draft loop), so it proposes what the constrained large model keeps.
"""
from __future__ import annotations

import functools
import json as _json
import re
from dataclasses import dataclass

from bild_kernels.structured.json_schema import DEFAULT_DEPTH, any_json_object, schema_to_regex
from bild_kernels.structured.regex import RegexDFA, compile_regex

__all__ = ["StructuredOutputs", "compile_regex", "schema_to_regex", "RegexDFA"]
REASONING = ("deepseek_r1", "qwen3")  # how a reply's thinking stands before its answer (StructuredOutputs.reasoning)
THINK_TAGS = ("<think>", "</think>")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of: `json` (a JSON Schema, as a dict or a JSON string, or a pydantic model: the text is a JSON
    document it accepts),
    `regex` (the text fully matches it), `choice` (the text is one of these strings), `json_object=True` (the text
    is a JSON object, nested at most `DEFAULT_DEPTH` deep). `whitespace_pattern` (a regex; default `[ ]?`) is what
    may stand between JSON tokens. The request ends (EOS) once the text is complete and nothing may follow; it may
    also end with max_tokens before that, as in vLLM. See `bild_kernels.structured.json_schema` for the schema
    keywords supported (any other is refused, not ignored).

    `reasoning` ("deepseek_r1" or "qwen3", the formats of `python/serve.py --reasoning-parser`): a reasoning model's
    thinking goes free and the pattern holds its answer after `</think>` (vLLM's structured outputs with a reasoning
    parser). "deepseek_r1" thinks from the first token (its template opened `<think>` in the prompt); "qwen3" thinks
    where the reply opens with `<think>`, and otherwise holds the reply to the pattern from its first token (thinking
    turned off). Both tags must be tokens of the tokenizer's own."""

    json: object = None
    regex: str | None = None
    choice: tuple | None = None
    json_object: bool = False
    whitespace_pattern: str | None = None
    reasoning: str | None = None

    def __post_init__(self):
        if callable(getattr(self.json, "model_json_schema", None)):  # a pydantic model (class): its schema
            object.__setattr__(self, "json", self.json.model_json_schema())
        if isinstance(self.json, dict):  # (kept as its JSON text: hashable, and the property order stays)
            object.__setattr__(self, "json", _json.dumps(self.json))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        self.validate()

    def validate(self) -> None:
        given = [n for n, v in (("json", self.json is not None), ("regex", self.regex is not None),
                                ("choice", self.choice is not None), ("json_object", self.json_object is True)) if v]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of json, regex, choice and json_object, got "
                             f"{given or 'none'}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be True or False, got {self.json_object!r}")
        if self.choice is not None and (not isinstance(self.choice, tuple) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"structured_outputs.regex must be a string, got {type(self.regex).__name__}")
        if self.json is not None and not isinstance(self.json, str):
            raise ValueError(f"structured_outputs.json must be a JSON Schema (a dict or its JSON text), "
                             f"got {type(self.json).__name__}")
        if self.reasoning not in (None, *REASONING):
            raise ValueError(f"structured_outputs.reasoning must be one of {list(REASONING)} or None, got "
                             f"{self.reasoning!r}")
        w = self.whitespace_pattern
        if w is not None and not isinstance(w, str):
            raise ValueError(f"structured_outputs.whitespace_pattern must be a string, got {type(w).__name__}")
        dfa(self.pattern())  # (a pattern it cannot compile is refused here, before any request runs)

    def pattern(self) -> str:
        """The regular expression the output text must match in full."""
        if self.regex is not None:
            return self.regex
        if self.choice is not None:
            return "(?:" + "|".join(re.escape(c) for c in self.choice) + ")"
        ws = self.whitespace_pattern
        if self.json_object:
            return any_json_object(DEFAULT_DEPTH, r"[ ]?" if ws is None else ws)
        return schema_to_regex(self.json, ws)

    @classmethod
    def of(cls, value) -> "StructuredOutputs | None":
        """None, a StructuredOutputs, or a dict of its fields."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"json", "regex", "choice", "json_object", "whitespace_pattern",
                                           "reasoning"})
            if unknown:
                raise ValueError(f"structured_outputs has no field {unknown[0]!r} (json, regex, choice, json_object, "
                                 "whitespace_pattern, reasoning)")
            return cls(**value)
        raise ValueError(f"structured_outputs must be a StructuredOutputs or a dict of its fields, "
                         f"got {type(value).__name__}")


@functools.lru_cache(maxsize=64)
def dfa(pattern: str) -> RegexDFA:
    """compile_regex, cached."""
    return compile_regex(pattern)

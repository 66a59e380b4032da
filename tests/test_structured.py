"""The structured-output automata on their own: the regex DFA against Python's re, JSON Schemas as regexes against
json / the schema's meaning, and the vocabulary walk's token masks against a token-by-token walk."""
import json
import random
import re

import numpy as np
import pytest

from bild_kernels.structured import StructuredOutputs, compile_regex, schema_to_regex
from bild_kernels.structured.guide import Grammar, Guide, Vocabulary
from bild_kernels.structured.json_schema import any_json_object

PATTERNS = [r"\d+", r"(ab|a)*c?", r"[a-z]{2,4}x", r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?", r'"([^"\\]|\\["\\nt])*"',
            r"(yes|no|maybe)", r"[^a-c]+", r"a{3}", r"x{0,2}y", r"\w+@\w+\.com", r"(?:ab)+", r"[\d\-]+", r"[a\]]*",
            r".{1,3}", r"(?P<n>q)r", r"^a|b$", r"a{2,}", r"[\x41-\x43]\u00e9?", r"(a|)b", r"\s*x\S?", r"a++b*?"]
ALPHABET = 'abcqrxyz0129.-+eE"\\/nt@om] \tA\u00e9'


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_dfa_accepts_what_re_fullmatch_accepts(pattern):
    d = compile_regex(pattern)
    rng = random.Random(hash(pattern) % 1000)
    py = pattern.replace("a++", "a+")  # (possessive: the same language under fullmatch)
    for _ in range(2000):
        t = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6)))
        assert d.fullmatch(t) == bool(re.fullmatch(py, t)), t


@pytest.mark.parametrize("pattern", [r"[a-c]x{1,2}", r"(ab|ac)d", r"\d{2}-\d"])
def test_a_live_state_is_exactly_a_prefix_of_a_match(pattern):
    # every string over a small alphabet: walk(prefix) != dead iff some extension of it (up to 4 more) matches
    d = compile_regex(pattern)
    alphabet = "abcdx0-"
    words = [""]
    for _ in range(4):
        words += [w + c for w in words if len(w) == _ for c in alphabet]
    for w in words:
        extendable = any(re.fullmatch(pattern, w + e) for e in words)
        assert (d.walk(d.start, w) != 0) == extendable, w


@pytest.mark.parametrize("pattern,what", [(r"(?=a)", "lookarounds"), (r"\b", r"\b"), (r"(a", "missing ')'"),
                                          (r"a)", "unbalanced"), (r"*a", "nothing to repeat"), (r"\1", r"\1"),
                                          (r"[z-a]", "bad character range"), (r"[ab", "unterminated"),
                                          (r"a{3,1}", "max < min"), (r"a{0,300000}", "too large")])
def test_unsupported_or_broken_patterns_are_refused_with_what_is_wrong(pattern, what):
    with pytest.raises(ValueError, match=re.escape(what)):
        compile_regex(pattern)


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}, "ok": {"type": "boolean"},
    "when": {"type": "string", "format": "date"}, "score": {"type": ["number", "null"]},
    "kind": {"$ref": "#/$defs/kind"}}, "required": ["name", "age"], "$defs": {"kind": {"const": "x"}}}


@pytest.mark.parametrize("doc,ok", [
    ('{"name":"Bob","age":3}', True), ('{"name": "Bob", "age": -3, "ok": true}', True),
    ('{"name":"x","age":0,"tags":["a","b"],"when":"2024-01-31","score":null,"kind":"x"}', True),
    ('{"name":"x","age":0,"score":1.5e3}', True), ('{ "name":"B" , "age":1 }', True),
    ('{"age":3}', False), ('{"name":"Bob"}', False), ('{"name":"Bob","age":03}', False),
    ('{"name":"Bob","age":3,"tags":["c"]}', False), ('{"name":"abcdefghi","age":1}', False),
    ('{"name":"Bob","ok":true,"age":3}', False), ('{"name":"B","age":1,"tags":["a","a","a"]}', False),
    ('{"name":"B","age":1,"when":"2024-13-01"}', False), ('{"name":"B","age":1,"extra":1}', False)])
def test_a_json_schema_becomes_the_regex_of_its_documents(doc, ok):
    r = schema_to_regex(SCHEMA)
    assert compile_regex(r).fullmatch(doc) == ok
    assert bool(re.fullmatch(r, doc)) == ok
    if ok:
        json.loads(doc)


def test_json_object_is_any_object_nested_up_to_the_depth():
    d = compile_regex(any_json_object(3, r"[ ]?"))
    for doc in ['{}', '{"a": [1, 2, {"b": null}]}', '{"a":{"b":{"c":"\\u00e9"}}}', '{"x":-0.5e-3,"y":[]}']:
        json.loads(doc)
        assert d.fullmatch(doc), doc
    for doc in ['[1]', '{"a":}', '{"a":1,}', '{a:1}', '{"a":{"b":{"c":{"d":1}}}}', '"s"']:
        assert not d.fullmatch(doc), doc


@pytest.mark.parametrize("lo,hi", [(0, None), (1, None), (5, 5), (-5, 5), (None, -3), (None, 0), (17, 1234),
                                   (-1000, -7), (99, 101), (-12, None), (None, 250), (3, 3000000)])
def test_integer_bounds_become_exactly_the_integers_between_them(lo, hi):
    schema = {"type": "integer", **({} if lo is None else {"minimum": lo}), **({} if hi is None else {"maximum": hi})}
    d = compile_regex(schema_to_regex(schema))
    rng = random.Random(lo or 0)
    for v in list(range(-1100, 1200)) + [rng.randint(-10**7, 10**7) for _ in range(500)]:
        assert d.fullmatch(str(v)) == ((lo is None or v >= lo) and (hi is None or v <= hi)), v
    for bad in ["-0", "007", "01", "+5", "", "-", "1.0"]:
        assert not d.fullmatch(bad), bad
    strict = compile_regex(schema_to_regex({"type": "integer", "exclusiveMinimum": 2.5, "exclusiveMaximum": 7}))
    assert [v for v in range(-3, 12) if strict.fullmatch(str(v))] == [3, 4, 5, 6]


def test_a_pydantic_model_is_taken_by_its_schema():
    pydantic = pytest.importorskip("pydantic")
    from enum import Enum
    from typing import Literal, Optional

    class Color(str, Enum):
        red = "red"
        blue = "blue"

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        age: int = pydantic.Field(ge=0, le=30)
        color: Color
        kind: Literal["cat", "dog"]
        owner: Optional[str] = None
        tags: list[str] = []

    d = compile_regex(StructuredOutputs(json=Pet).pattern())
    for doc, ok in [('{"name": "Tom", "age": 3, "color": "red", "kind": "cat"}', True),
                    ('{"name": "Tom", "age": 3, "color": "red", "kind": "cat", "owner": null, "tags": ["a"]}', True),
                    ('{"name": "Tom", "age": 31, "color": "red", "kind": "cat"}', False),
                    ('{"name": "Tom", "age": 3, "color": "green", "kind": "cat"}', False)]:
        assert d.fullmatch(doc) == ok, doc
        if ok:
            Pet.model_validate_json(doc)


@pytest.mark.parametrize("schema,what", [
    ({"type": "number", "minimum": 0}, "'minimum'"), ({"type": "integer", "minimum": 3, "maximum": 2}, "no integer"),
    ({"type": "string", "format": "email"}, "'email'"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, "recursive"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b'"), ({"type": "wat"}, "'wat'"),
    ({"type": "array", "prefixItems": []}, "'prefixItems'"), ("{not json", "not valid JSON")])
def test_schema_keywords_it_cannot_enforce_are_refused_not_ignored(schema, what):
    with pytest.raises(ValueError, match=re.escape(what)):
        schema_to_regex(schema)


def test_structured_outputs_take_exactly_one_kind_and_check_it_up_front():
    assert StructuredOutputs(choice=["yes", "no"]).pattern() == "(?:yes|no)"
    assert StructuredOutputs.of({"regex": "a+"}).regex == "a+"
    assert hash(StructuredOutputs(json={"type": "boolean"}))  # (a dict schema is kept as its JSON text)
    for kw, what in [({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                     ({"choice": []}, "non-empty"), ({"choice": ["a", ""]}, "non-empty"),
                     ({"regex": "(?!x)"}, "lookaround"),
                     ({"json": {"type": "number", "maximum": 3}}, "'maximum'"), ({"regex": 5}, "string")]:
        with pytest.raises(ValueError, match=re.escape(what)):
            StructuredOutputs(**kw)
    with pytest.raises(ValueError, match="no field 'grammar'"):
        StructuredOutputs.of({"grammar": "root ::= x"})


TEXTS = ["a", "b", "ab", "abc", "1", "12", "-", '"', '{"', '":', ",", " ", "}", "yes", "no", "y", None, "", "é", "a1"]


def _brute_mask(dfa, state, texts):
    return np.array([bool(t) and dfa.walk(state, t) != 0 for t in texts])


@pytest.mark.parametrize("pattern", [r"(ab|a)*c?1?", r'\{"[a-z]+":-?\d+\}', r"(yes|no)", r"[^1]{0,3}"])
def test_the_vectorised_token_walk_equals_one_token_at_a_time(pattern):
    vocab = Vocabulary(TEXTS)
    g = Grammar(compile_regex(pattern), vocab)
    states = {g.start}
    frontier = [g.start]
    while frontier:  # every state reachable through tokens
        s = frontier.pop()
        bits, _ = g.allowed(s)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:len(TEXTS)].astype(bool)
        assert (allowed == _brute_mask(g.dfa, s, TEXTS)).all()
        for t in np.flatnonzero(allowed).tolist():
            n = g.step(s, t)
            assert n == g.dfa.walk(s, TEXTS[t]) != 0
            if n not in states:
                states.add(n)
                frontier.append(n)


def test_a_guide_allows_the_end_ids_exactly_where_the_pattern_may_end():
    vocab = Vocabulary(TEXTS + [None])  # id 20: the end-of-sequence token (special: no text)
    guide = Guide(Grammar(compile_regex(r"ab?"), vocab), {20})

    def allowed(bits):
        return set(np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")).tolist())

    assert allowed(guide.mask(guide.state)) == {0, 2}  # "a", "ab"; not the end yet
    masks = guide.masks_along([0, 1], 3)  # "a" then "b"
    assert allowed(masks[0]) == {0, 2} and allowed(masks[1]) == {1, 20} and allowed(masks[2]) == {20}
    masks = guide.masks_along([3, 1], 3)  # "abc" is not allowed: the positions after it are left open
    assert (masks[1] == -1).all() and (masks[2] == -1).all()
    guide.advance([2])
    assert allowed(guide.mask(guide.state)) == {20}


def test_a_reasoning_guide_leaves_the_thinking_free_and_holds_the_answer():
    """Guide(think=(mode, open, close)): deepseek_r1 thinks from the first token (every token allowed, the end too)
    until the close id, then holds to the pattern; qwen3 may open its thinking at the first token (the open id beside
    the pattern's first tokens) and otherwise is held from there."""
    texts = TEXTS + [None, "<think>", "</think>"]  # ids 20: end, 21: open, 22: close
    vocab = Vocabulary(texts)
    grammar = Grammar(compile_regex(r"ab?"), vocab)

    def allowed(bits):
        return set(np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")).tolist()) & set(range(23))

    r1 = Guide(grammar, {20}, think=("deepseek_r1", 21, 22))
    assert allowed(r1.mask(r1.state)) == set(range(23))
    masks = r1.masks_along([4, 13, 22, 0, 1], 6)  # "1", "yes", </think>, then "a", "b"
    assert [allowed(m) == set(range(23)) for m in masks[:3]] == [True] * 3
    assert allowed(masks[3]) == {0, 2} and allowed(masks[4]) == {1, 20} and allowed(masks[5]) == {20}
    assert r1.allowed_prefix([4, 22, 1]) == 2  # ("b" cannot begin the answer)
    qwen = Guide(grammar, {20}, think=("qwen3", 21, 22))
    assert allowed(qwen.mask(qwen.state)) == {0, 2, 21}
    masks = qwen.masks_along([21, 13, 22, 2], 5)
    assert allowed(masks[1]) == set(range(23)) and allowed(masks[3]) == {0, 2} and allowed(masks[4]) == {20}
    masks = qwen.masks_along([0, 1], 3)  # no thinking: held from the first token, as without `think`
    assert allowed(masks[1]) == {1, 20} and allowed(masks[2]) == {20}
    copy = qwen.copy()
    copy.advance([21, 4])
    assert allowed(copy.mask(copy.state)) == set(range(23)) and copy.think == qwen.think
    with pytest.raises(ValueError, match="reasoning must be one of"):
        StructuredOutputs(regex="a", reasoning="o1")
    assert StructuredOutputs.of({"choice": ["x"], "reasoning": "qwen3"}).reasoning == "qwen3"

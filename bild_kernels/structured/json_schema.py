"""A JSON Schema as a regular expression (the approach of Outlines), for `compile_regex`.

Properties come in the schema's order; a property outside "required" may be left out; no property the schema does
not name (unless "additionalProperties" is a schema, or the object names none: then any keys). Whitespace between
tokens follows `whitespace` (default `[ ]?`: compact JSON, one optional space). A schema, or part of one, that allows
any JSON value is any JSON value nested at most `max_depth` deep (a regular expression cannot count brackets). What
is supported: "type" (one or a list), "enum", "const", "anyOf" / "oneOf", "allOf" of one schema, "$ref" to "#/$defs/..."
or "#/definitions/..." (not recursive), strings' "minLength" / "maxLength" / "pattern" / "format" (date, time,
date-time, uuid), integers' "minimum" / "maximum" / "exclusiveMinimum" / "exclusiveMaximum", arrays' "items" /
"minItems" / "maxItems", objects' "properties" / "required" /
"additionalProperties". Any other constraint keyword raises a ValueError naming it rather than being ignored;
annotations (title, description, examples, ...) are ignored.
"""
from __future__ import annotations

import json
import math
import re

STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
BOOLEAN = r"(?:true|false)"
NULL = "null"
FORMATS = {
    "date": r'"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"',
    "time": r'"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?"',
    "date-time": (r'"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]'
                  r'(?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?"'),
    "uuid": r'"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"',
}
ANNOTATIONS = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "$defs", "definitions",
               "readOnly", "writeOnly", "deprecated"}
DEFAULT_DEPTH = 3


def _same_length(a: str, b: str) -> str:
    """A regex of the digit strings of len(a) from a to b (a <= b; leading zeros allowed: a suffix's range)."""
    if a == b:
        return a
    i = 0
    while a[i] == b[i]:
        i += 1
    if i:
        return a[:i] + _same_length(a[i:], b[i:])
    if len(a) == 1:
        return f"[{a}-{b}]"
    rest = len(a) - 1
    parts, lo, hi = [], int(a[0]), int(b[0])
    if a[1:] != "0" * rest:  # a[0] then a[1:] .. 9...9
        parts.append(a[0] + _same_length(a[1:], "9" * rest))
        lo += 1
    upper = None
    if b[1:] != "9" * rest:  # b[0] then 0...0 .. b[1:]
        upper = b[0] + _same_length("0" * rest, b[1:])
        hi -= 1
    if lo <= hi:
        parts.append(f"{lo}[0-9]{{{rest}}}" if lo == hi else f"[{lo}-{hi}][0-9]{{{rest}}}")
    if upper is not None:
        parts.append(upper)
    return "(?:" + "|".join(parts) + ")"


def _natural(lo: int, hi: int | None) -> str:
    """A regex of the decimal integers lo..hi (0 <= lo; hi None: no bound), no leading zeros."""
    parts = []
    d = len(str(lo))
    top = hi if hi is not None else 10 ** d - 1
    while lo <= top:
        end = min(top, 10 ** len(str(lo)) - 1)
        parts.append(_same_length(str(lo), str(end)))
        lo = end + 1
    if hi is None:  # every number with more digits
        parts.append(f"[1-9][0-9]{{{len(str(top))},}}")
    return "(?:" + "|".join(parts) + ")"


def integer_range(lo: int | None, hi: int | None) -> str:
    """A regex of the JSON integers in [lo, hi] (None: unbounded on that side)."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(_natural(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:  # "-" and a magnitude from |the largest negative| to |lo|
        parts.append("-" + _natural(1 if hi is None or hi >= 0 else -hi, None if lo is None else -lo))
    return "(?:" + "|".join(parts) + ")"


def any_json(depth: int, ws: str) -> str:
    """Any JSON value with arrays / objects nested at most `depth` deep."""
    value = f"(?:{STRING}|{NUMBER}|{BOOLEAN}|{NULL})"
    for _ in range(depth):
        value = f"(?:{STRING}|{NUMBER}|{BOOLEAN}|{NULL}|{_object_of(value, ws)}|{_array_of(value, ws)})"
    return value


def any_json_object(depth: int, ws: str) -> str:
    """A JSON object (OpenAI's response_format "json_object") whose values nest at most depth - 1 deep."""
    return _object_of(any_json(max(depth - 1, 0), ws), ws)


def _object_of(value: str, ws: str) -> str:
    member = f"{STRING}{ws}:{ws}{value}"
    return rf"\{{{ws}(?:{member}(?:{ws},{ws}{member})*)?{ws}\}}"


def _array_of(item: str, ws: str, lo: int = 0, hi: int | None = None) -> str:
    if hi is not None and hi == 0:
        return rf"\[{ws}\]"
    more = "*" if hi is None and lo <= 1 else f"{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
    body = f"{item}(?:{ws},{ws}{item}){more}"
    return rf"\[{ws}{body}{ws}\]" if lo >= 1 else rf"\[{ws}(?:{body})?{ws}\]"


def _literal(value) -> str:
    return re.escape(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


class _Converter:
    def __init__(self, root: dict, ws: str, max_depth: int):
        self.root, self.ws, self.max_depth = root, ws, max_depth
        self.refs: list[str] = []

    def error(self, path: str, what: str) -> ValueError:
        return ValueError(f"json schema at {path or '/'}: {what}")

    def convert(self, schema, path: str = "", depth: int = 0) -> str:
        if schema is True or schema == {}:
            return any_json(max(self.max_depth - depth, 0), self.ws)
        if not isinstance(schema, dict):
            raise self.error(path, f"a schema must be an object (or true), got {schema!r}")
        if depth > 32:
            raise self.error(path, "nested too deep")
        if "$ref" in schema:
            return self._ref(schema, path, depth)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                self._only(schema, path, {key})
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise self.error(path, f"{key} must be a non-empty list")
                return "(?:" + "|".join(self.convert(s, f"{path}/{key}/{i}", depth)
                                        for i, s in enumerate(options)) + ")"
        if "allOf" in schema:
            self._only(schema, path, {"allOf"})
            if not isinstance(schema["allOf"], list) or len(schema["allOf"]) != 1:
                raise self.error(path, "allOf is supported with exactly one schema")
            return self.convert(schema["allOf"][0], f"{path}/allOf/0", depth)
        if "const" in schema:
            self._only(schema, path, {"const", "type"})
            return _literal(schema["const"])
        if "enum" in schema:
            self._only(schema, path, {"enum", "type"})
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise self.error(path, "enum must be a non-empty list")
            return "(?:" + "|".join(_literal(v) for v in schema["enum"]) + ")"
        kind = schema.get("type")
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema:
                kind = "array"
            else:
                self._only(schema, path, set())
                return any_json(max(self.max_depth - depth, 0), self.ws)
        if isinstance(kind, list):
            if not kind:
                raise self.error(path, "type must not be an empty list")
            return "(?:" + "|".join(self.convert({**schema, "type": k}, path, depth) for k in kind) + ")"
        if kind == "string":
            return self._string(schema, path)
        if kind == "integer":
            return self._integer(schema, path)
        if kind in ("number", "boolean", "null"):
            self._only(schema, path, {"type"})
            return {"integer": INTEGER, "number": NUMBER, "boolean": BOOLEAN, "null": NULL}[kind]
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "object":
            return self._object(schema, path, depth)
        raise self.error(path, f"unknown type {kind!r}")

    def _only(self, schema: dict, path: str, allowed: set) -> None:
        extra = sorted(set(schema) - allowed - ANNOTATIONS)
        if extra:
            raise self.error(path, f"keyword {extra[0]!r} is not supported here (supported: "
                             f"{sorted(allowed) or 'annotations only'})")

    def _ref(self, schema: dict, path: str, depth: int) -> str:
        self._only(schema, path, {"$ref"})
        ref = schema["$ref"]
        m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if m is None or m.group(2) not in self.root.get(m.group(1), {}):
            raise self.error(path, f"$ref {ref!r} must name an entry of the root's $defs or definitions")
        if ref in self.refs:
            raise self.error(path, f"$ref {ref!r} is recursive: a regular expression cannot nest without bound")
        self.refs.append(ref)
        try:
            return self.convert(self.root[m.group(1)][m.group(2)], ref[1:], depth)
        finally:
            self.refs.pop()

    def _integer(self, schema: dict, path: str) -> str:
        bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
        self._only(schema, path, {"type", *bounds})
        for name in bounds:
            x = schema.get(name)
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)):
                raise self.error(path, f"{name} must be a finite number")
        los = [math.ceil(schema["minimum"])] if "minimum" in schema else []
        los += [math.floor(schema["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in schema else []
        his = [math.floor(schema["maximum"])] if "maximum" in schema else []
        his += [math.ceil(schema["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in schema else []
        lo, hi = max(los, default=None), min(his, default=None)
        if lo is not None and hi is not None and lo > hi:
            raise self.error(path, f"no integer lies in [{lo}, {hi}]")
        return INTEGER if lo is None and hi is None else integer_range(lo, hi)

    def _string(self, schema: dict, path: str) -> str:
        self._only(schema, path, {"type", "minLength", "maxLength", "pattern", "format"})
        if "pattern" in schema:
            if "minLength" in schema or "maxLength" in schema or "format" in schema:
                raise self.error(path, "pattern is supported without minLength, maxLength or format")
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise self.error(path, "pattern must be a string")
            inner = pattern[1:] if pattern.startswith("^") else pattern
            inner = inner[:-1] if inner.endswith("$") and not inner.endswith("\\$") else inner
            return f'"(?:{inner})"'
        if "format" in schema:
            if schema["format"] not in FORMATS:
                raise self.error(path, f"string format {schema['format']!r} is not supported "
                                 f"(supported: {sorted(FORMATS)})")
            if "minLength" in schema or "maxLength" in schema:
                raise self.error(path, "format is supported without minLength or maxLength")
            return FORMATS[schema["format"]]
        lo, hi = self._count_bounds(schema, path, "minLength", "maxLength")
        if lo == 0 and hi is None:
            return STRING
        return f'"{STRING_CHAR}{{{lo},{"" if hi is None else hi}}}"'

    def _count_bounds(self, schema: dict, path: str, low: str, high: str) -> tuple[int, int | None]:
        """(schema[low] or 0, schema[high] or None): counts (a string's length, an array's items), checked."""
        lo, hi = schema.get(low, 0), schema.get(high)
        for name, n in ((low, lo), (high, hi)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise self.error(path, f"{name} must be an int >= 0")
        if hi is not None and hi < lo:
            raise self.error(path, f"{high} < {low}")
        return lo, hi

    def _array(self, schema: dict, path: str, depth: int) -> str:
        self._only(schema, path, {"type", "items", "minItems", "maxItems"})
        lo, hi = self._count_bounds(schema, path, "minItems", "maxItems")
        item = self.convert(schema.get("items", True), f"{path}/items", depth + 1)
        return _array_of(item, self.ws, lo, hi)

    def _object(self, schema: dict, path: str, depth: int) -> str:
        self._only(schema, path, {"type", "properties", "required", "additionalProperties"})
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", not props)
        if not isinstance(props, dict) or not isinstance(required, list):
            raise self.error(path, "properties must be an object and required a list")
        missing = [r for r in required if r not in props]
        if missing:
            raise self.error(path, f"required names {missing[0]!r}, which properties lacks")
        ws = self.ws
        if not props:
            if extra is False:
                return rf"\{{{ws}\}}"
            value = self.convert(True if extra is True else extra, f"{path}/additionalProperties", depth + 1)
            return _object_of(value, ws)
        if extra not in (True, False):  # (true, the default: valid documents never need another key)
            raise self.error(path, "additionalProperties beside properties is supported only as true or false")
        members = [f"{_literal(k)}{ws}:{ws}{self.convert(v, f'{path}/properties/{k}', depth + 1)}"
                   for k, v in props.items()]
        needed = [k in required for k in props]
        # tails[i]: the members from i on after one was written (each then needs a comma first)
        tails = [""] * (len(members) + 1)
        for i in range(len(members) - 1, -1, -1):
            m = members[i]
            tails[i] = f"{ws},{ws}{m}{tails[i + 1]}" if needed[i] else f"(?:{ws},{ws}{m})?{tails[i + 1]}"
        # head(i): the members from i on when none was written yet
        head = ""
        for i in range(len(members) - 1, -1, -1):
            first = f"{members[i]}{tails[i + 1]}"
            head = first if needed[i] else (f"(?:{first}|{head})" if head else f"(?:{first})?")
        return rf"\{{{ws}{head}{ws}\}}"


def schema_to_regex(schema, whitespace: str | None = None, max_depth: int = DEFAULT_DEPTH) -> str:
    """The regular expression of JSON texts that `schema` (a dict, or a JSON string of one) accepts."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json schema is not valid JSON: {e}") from None
    if not (isinstance(schema, dict) or schema is True):
        raise ValueError(f"json schema must be an object, got {type(schema).__name__}")
    root = schema if isinstance(schema, dict) else {}
    return _Converter(root, r"[ ]?" if whitespace is None else whitespace, max_depth).convert(schema)

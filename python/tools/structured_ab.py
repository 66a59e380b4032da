"""Structured outputs on a real pair: each policy's tokens/s against LargeOnly() in the same run, with and without the
constraint, its acceptance, and whether every constrained answer is what its pattern asks for (JSON that parses and
holds to the schema, one of the choices, a full regex match) and every lossless answer LargeOnly()'s.

    python python/tools/structured_ab.py [--large GGUF-or-dir --small DIR] [--repeat 2] [--threads 2] [--csv FILE]

Requests run one at a time (the latency-critical use); each policy's time is its fastest of --repeat interleaved runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch

from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
from bild_kernels.structured import StructuredOutputs

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                           "city": {"type": "string", "maxLength": 40}},
          "required": ["name", "age", "city"]}
ANIMAL = {"type": "object", "properties": {"species": {"type": "string", "maxLength": 40},
                                           "legs": {"type": "integer"}, "can_fly": {"type": "boolean"},
                                           "habitat": {"enum": ["land", "water", "air"]}},
          "required": ["species", "legs", "can_fly", "habitat"]}
CASES = [
    ("Make up a person and describe them as JSON with name, age and city.", {"json": PERSON}),
    ("Describe a famous scientist as JSON with name, age and city.", {"json": PERSON}),
    ("Describe a penguin as JSON: species, legs, can_fly, habitat.", {"json": ANIMAL}),
    ("Describe an eagle as JSON: species, legs, can_fly, habitat.", {"json": ANIMAL}),
    ("Describe a dolphin as JSON: species, legs, can_fly, habitat.", {"json": ANIMAL}),
    ("List three fruits and their colors as a JSON object.", {"json_object": True}),
    ("Give the capitals of France, Spain and Italy as a JSON object.", {"json_object": True}),
    ("Give a recipe for pancakes as a JSON object with ingredients and steps.", {"json_object": True}),
    ("Is the sun a star? Answer yes or no.", {"choice": ["yes", "no"]}),
    ("What is the sentiment of 'I loved this movie'? positive, negative or neutral?",
     {"choice": ["positive", "negative", "neutral"]}),
    ("When did the first person walk on the moon? Answer with the date as YYYY-MM-DD.",
     {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}),
    ("Write a US phone number for a fictional pizza place.", {"regex": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"}),
]


def holds(text: str, so: StructuredOutputs) -> bool:
    """Whether a finished answer is what its constraint asks for (checked with json / re, not our automaton)."""
    if so.choice is not None:
        return text in so.choice
    if so.regex is not None:
        return re.fullmatch(so.regex, text) is not None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return False
    if so.json_object:
        return isinstance(doc, dict)
    schema = json.loads(so.json)
    props = schema["properties"]
    if not isinstance(doc, dict) or not set(schema["required"]) <= set(doc) <= set(props):
        return False
    kinds = {"string": str, "integer": int, "boolean": bool}
    for k, v in doc.items():
        p = props[k]
        if "enum" in p and v not in p["enum"]:
            return False
        if "type" in p and (not isinstance(v, kinds[p["type"]]) or (p["type"] == "integer" and isinstance(v, bool))):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large")
    ap.add_argument("--small")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default="bench/results/structured_outputs_cpu.csv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(**({"large": args.large, "small": args.small} if args.large else {}))
    policies = {"large-only": LargeOnly(), "greedy-2": Greedy(max_draft_len=2), "default-bild": None}
    runs = [(prompt, StructuredOutputs(**so)) for prompt, so in CASES]
    engine.generate(["Hello"], SamplingParams(max_tokens=4))  # (warm up)
    best: dict = {}
    outs: dict = {}
    for r in range(args.repeat):
        for i, (prompt, so) in enumerate(runs):
            names = list(policies)
            names = names[(i + r) % len(names):] + names[:(i + r) % len(names)]  # (rotated: drift hits all alike)
            for constrained in (False, True):
                p = SamplingParams(max_tokens=args.max_tokens, structured_outputs=so if constrained else None)
                for name in names:
                    t = time.perf_counter()
                    o = engine.generate([prompt], p, policy=policies[name], chat_template=True)[0]
                    dt = time.perf_counter() - t
                    key = (name, constrained, i)
                    best[key] = min(best.get(key, float("inf")), dt)
                    outs[key] = o
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for constrained in (False, True):
        base_tokens = sum(len(outs[("large-only", constrained, i)].token_ids) for i in range(len(runs)))
        base = base_tokens / sum(best[("large-only", constrained, i)] for i in range(len(runs)))
        for name in policies:
            tokens = sum(len(outs[(name, constrained, i)].token_ids) for i in range(len(runs)))
            tps = tokens / sum(best[(name, constrained, i)] for i in range(len(runs)))
            drafted = sum(outs[(name, constrained, i)].metrics.drafted_tokens for i in range(len(runs)))
            accepted = sum(outs[(name, constrained, i)].metrics.accepted_tokens for i in range(len(runs)))
            finished = [i for i in range(len(runs)) if outs[(name, constrained, i)].finish_reason == "eos"]
            ok = sum(holds(outs[(name, constrained, i)].text, runs[i][1]) for i in finished)
            same = sum(outs[(name, constrained, i)].token_ids == outs[("large-only", constrained, i)].token_ids
                       for i in range(len(runs)))
            row = {"time": time.strftime("%Y-%m-%d %H:%M"), "rev": rev, "policy": name, "constrained": constrained,
                   "requests": len(runs), "tokens": tokens, "tokens_per_s": round(tps, 1),
                   "speedup": round(tps / base, 3), "acceptance": round(accepted / drafted, 3) if drafted else 0.0,
                   "finished": len(finished), "valid": ok if constrained else "", "same_as_large_only": same,
                   "threads": args.threads, "repeat": args.repeat}
            rows.append(row)
            print(row)
    for i, (prompt, _) in enumerate(runs):
        print(f"{prompt[:50]!r:54} -> {outs[('default-bild', True, i)].text!r}")
    if args.csv:
        path = Path(args.csv)
        new = not path.exists()
        os.makedirs(path.parent, exist_ok=True)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()

"""`bild chat`: a conversation in the terminal (as `ollama run` or llama.cpp's conversation mode): each line read
is a user turn, the reply streams through the model's chat template with the turns before it, and one line of
metrics follows on stderr. Commands: /reset (forget the turns, keep --system), /exit (or end of input)."""
from __future__ import annotations

import dataclasses
import sys
import time

from bild_kernels.cli.common import UsageError, _engine, _model_args, _policy, _policy_args
from bild_kernels.cli.generate import run_line, sampling_args, sampling_params, session_seed

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves"


def _fit(engine, system: list[dict], turns: list[dict], reserve: int) -> tuple[list[dict], int]:
    """The most recent turns (whole exchanges, the last user turn always) whose prompt leaves `reserve` tokens of
    max_model_len free, and how many older turns were left out."""
    dropped = 0
    while len(turns) > 1 and len(engine.tokenize(system + turns)) > engine.max_model_len - reserve:
        cut = 2 if len(turns) > 2 else 1  # a user turn and its reply
        turns, dropped = turns[cut:], dropped + cut
    return turns, dropped


def cmd_chat(args) -> int:
    seed = session_seed(args)
    params = sampling_params(args, seed)  # (checked before the models load)
    t_load = time.perf_counter()
    engine = _engine(args, max_model_len=args.max_model_len)
    policy = _policy(args, engine)
    if not getattr(engine.tokenizer, "chat_template", None):
        raise UsageError("bild chat needs a model with a chat template (this one has none): use bild generate "
                         "--no-chat-template for raw text")
    system = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print(f"[models loaded in {time.perf_counter() - t_load:.1f} s; {HELP}]", file=sys.stderr)
    turns: list[dict] = []
    n = 0
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            turns = []
            print("[conversation forgotten]", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}: {HELP}]", file=sys.stderr)
            continue
        turns, dropped = _fit(engine, system, turns + [{"role": "user", "content": text}],
                              min(args.max_tokens, engine.max_model_len // 2))
        if dropped:
            print(f"[the {dropped} oldest turns no longer fit max_model_len={engine.max_model_len}: left out]",
                  file=sys.stderr)
        # each turn its own seed (seed + turn), so a session with --seed repeats
        turn_params = params if params.temperature <= 0 else dataclasses.replace(params, seed=(seed + n) % 2 ** 63)
        n += 1
        out = error = None
        for chunk in engine.stream(system + turns, turn_params, policy=policy, chat_template=True):
            if chunk.output is not None and chunk.output.error:
                error = chunk.output.error
                break
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            out = chunk.output or out
        if error is not None:  # this turn fails alone (its message is forgotten): the session goes on
            print(f"\n[error: {error}]", file=sys.stderr)
            turns = turns[:-1]
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        turns.append({"role": "assistant", "content": out.text})
        line = run_line(policy, out.metrics)
        print(line + (f" | seed {turn_params.seed}" if params.temperature > 0 else ""), file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    g = sub.add_parser("chat", help="a conversation in the terminal (each line a turn)")
    _model_args(g)
    _policy_args(g, default_policy=None)
    sampling_args(g)
    g.add_argument("--system", metavar="TEXT", help="a system message before the conversation")
    g.set_defaults(func=cmd_chat)

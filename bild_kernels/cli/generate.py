"""`bild generate`: stream a reply to one prompt and close with one line of metrics."""
from __future__ import annotations

import secrets
import sys
import time

from bild_kernels.cli.common import UsageError, _engine, _model_args, _policy, _policy_args


def sampling_params(args, seed: int):
    """The SamplingParams of the sampling options (`sampling_args`), with `seed`."""
    from bild_kernels import SamplingParams
    bias = {}
    for item in args.logit_bias or []:
        tok, _, val = item.partition("=")
        try:
            bias[int(tok)] = float(val)
        except ValueError:
            raise UsageError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 13=-100), got {item!r}") from None
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=seed, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          min_tokens=args.min_tokens, logit_bias=bias, structured_outputs=structured_outputs(args))


def structured_outputs(args) -> dict | None:
    """The output constraint of --json-schema / --regex / --choice / --json-object (StructuredOutputs' fields)."""
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{"):  # a file
            try:
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise UsageError(f"--json-schema: cannot read {args.json_schema!r} ({e.strerror})") from None
        return {"json": text}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": args.choice}
    return {"json_object": True} if args.json_object else None


def session_seed(args) -> int:
    """--seed, or (sampling without one, as llama.cpp and HF do) a random one, shown at the end so that the run can
    be repeated; 0 when greedy."""
    return args.seed if args.seed is not None else secrets.randbelow(2 ** 62) if args.temperature > 0 else 0


def run_line(policy, m) -> str:
    """One request's closing line: the policy, tokens/s, the first token's latency, the passes and the drafts."""
    from bild_kernels.evaluate import describe
    line = (f"[{describe(policy)}] {m.generated_tokens} tokens in {m.wall_time:.2f} s = {m.tokens_per_s:.1f} tokens/s"
            f" (first after {m.time_to_first_token * 1e3:.0f} ms)" + f" | large passes {m.large_passes}")
    if policy.drafts:
        line += (f" | acceptance {m.acceptance_rate:.0%}, mean accepted {m.mean_accepted_length:.2f}"
                 f" | fallbacks {m.fallbacks} | rollbacks {m.rollbacks}")
        if m.lookup_drafted_tokens:
            line += f" | n-gram lookup: {m.lookup_accepted_tokens} of {m.lookup_drafted_tokens} drafts kept"
    return line


def cmd_generate(args) -> int:
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    seed = session_seed(args)
    params = sampling_params(args, seed)
    t_load = time.perf_counter()
    engine = _engine(args, max_model_len=args.max_model_len)
    policy = _policy(args, engine)
    chat = not args.no_chat_template and bool(getattr(engine.tokenizer, "chat_template", None))
    if args.system is not None:
        if not chat:
            raise UsageError("--system needs the model's chat template (this model has none, or --no-chat-template "
                             "was given)")
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
    load_s = time.perf_counter() - t_load
    out = None
    for chunk in engine.stream(prompt, params, policy=policy, chat_template=chat):
        if chunk.output is not None and chunk.output.error:
            raise UsageError(chunk.output.error)
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        out = chunk.output or out
    sys.stdout.write("\n")
    line = run_line(policy, out.metrics)
    if params.temperature > 0:
        line += f" | seed {seed}"
    print(line + f" | models loaded in {load_s:.1f} s", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="stream a reply to one prompt")
    g.add_argument("prompt", help="the prompt ('-' reads stdin)")
    _model_args(g)
    _policy_args(g, default_policy=None)
    sampling_args(g)
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    g.add_argument("--system", metavar="TEXT", help="a system message before the prompt (through the chat template)")
    g.set_defaults(func=cmd_generate)


def sampling_args(g) -> None:
    """The length and sampling options `generate` and `chat` share."""
    g.add_argument("--max-tokens", type=int, default=128, help="tokens a reply may have")
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0,
                   help="[0, 1]: keep tokens at least this many times as likely as the most likely one (0: off)")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: a random one when --temperature > 0, shown in the closing line)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0; divides the logits of tokens already in the prompt or reply (1: off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2]: once per token the reply holds")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2]: per occurrence in the reply")
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS before the reply has this many tokens")
    g.add_argument("--logit-bias", action="append", metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit; repeatable")
    so = g.add_mutually_exclusive_group()
    so.add_argument("--json-schema", metavar="SCHEMA", help="the reply is a JSON document this JSON Schema accepts "
                    "(its JSON text, or a file holding it)")
    so.add_argument("--regex", help="the reply fully matches this regular expression")
    so.add_argument("--choice", action="append", help="the reply is one of these strings; repeatable")
    so.add_argument("--json-object", action="store_true", help="the reply is a JSON object")

"""`bild eval` and `bild bench`: every policy against the large model alone on the held-out prompts (quality and speed;
`bench`: speed and the Hugging Face baselines), as a table, CSV rows and a trade-off plot."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from bild_kernels.cli.common import UsageError, _engine, _model_args, _ngram, _progress


def _grid(text: str, name: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UsageError(f"{name} is empty")
    return vals


PROMPT_SETS = ("held-out", "tune")


def _eval_prompts(engine, n: int, prompt_set: str = "held-out") -> list[list[int]]:
    from bild_kernels.distill.corpus import chat_ids
    from bild_kernels.distill.prompts import held_out_prompts, tune_prompts
    if engine.tokenizer is None:
        raise UsageError("the large model has no tokenizer: evaluation needs one to encode its prompts")
    prompts = held_out_prompts() if prompt_set == "held-out" else list(tune_prompts())
    if not 1 <= n <= len(prompts):
        raise UsageError(f"--prompts must be in [1, {len(prompts)}], got {n}")
    return [chat_ids(engine.tokenizer, p) for p in prompts[:n]]


def _eval_policies(args, engine) -> list:
    from bild_kernels import BiLD, Greedy
    pols = []
    if engine.runners.get("small") is None:
        raise UsageError("evaluation compares draft policies: it needs a small model (--small)")
    pols.append(Greedy(max_draft_len=args.greedy_draft_len))
    pols.append(engine.default_policy if isinstance(engine.default_policy, BiLD) else BiLD())
    spec = None
    if getattr(args, "lookup", 0):  # n-gram lookup alone, and Greedy / the default BiLD with it (or without it)
        import dataclasses
        spec = _ngram(args.lookup, None, None, what="--lookup")
        pols.append(spec)
        pols += [dataclasses.replace(p, lookup=None if p.lookup is not None else spec) for p in pols[:2]]
    if getattr(args, "sweep", False):
        rollbacks = _grid(args.rollback_grid, "--rollback-grid")
        for f in _grid(args.fallback_grid, "--fallback-grid"):
            for r in rollbacks:
                # with --lookup, each point of the curve with and without it
                for lookup in (None, spec) if spec is not None else (None,):
                    p = BiLD(fallback_threshold=f, rollback_threshold=r, max_draft_len=args.max_draft_len or 10,
                             lookup=lookup)
                    if p not in pols:
                        pols.append(p)
        if args.energy_grid:  # E-LANG: the same rollback rule, fallback on the draft's energy
            for e in _grid(args.energy_grid, "--energy-grid"):
                for r in rollbacks:
                    pols.append(BiLD(fallback_signal="energy", fallback_threshold=e, rollback_threshold=r,
                                     max_draft_len=args.max_draft_len or 10))
        from bild_kernels.engine.policies import Jacobi, ShallowDeep
        if args.jacobi:  # CLLM: no draft model at all
            pols.append(Jacobi(block_size=args.jacobi))
        if args.shallow_deep:  # FREE: the large model's first layers draft
            pols.append(ShallowDeep(exit_layer=args.shallow_deep))
        if args.auto:  # FREE: both thresholds calibrated online while the evaluation runs
            pols.append(BiLD(fallback_threshold="auto", rollback_threshold="auto",
                             max_draft_len=args.max_draft_len or 10))
    return pols


def _write_csv(path: str | None, rows: list[dict], extra: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(extra) + [k for r in rows for k in r if k not in extra]
    fields = list(dict.fromkeys(fields))
    old = []
    if path.exists():  # append; an older file with other columns is rewritten under their union
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            fields = list(dict.fromkeys(list(reader.fieldnames or []) + fields))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in old:
            w.writerow(r)
        for r in rows:
            w.writerow({**extra, **r})
    print(f"rows appended to {path}", file=sys.stderr)


def _run_info(engine) -> dict:
    import datetime

    import torch
    dev = engine.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{_cpu_model() or 'cpu'} x{os.cpu_count()}"
    large = engine.runners["large"].executor
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": name,
            "threads": torch.get_num_threads(), "rev": _git_rev(),
            # a GGUF's blocks: "q4_1", "q4_1x16" (int16 activations) or "q4_1x16i8" (int8); else the weights' format
            "large_weights": large.layer_blocks or large.weight_format,
            "draft_loop": engine.draft_loop}  # native / eager / static / graph: how draft runs executed


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, where platform.processor() is often empty)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_rev() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        from bild_kernels import __version__
        return __version__


def cmd_eval(args) -> int:
    from bild_kernels.evaluate import eval_runs, evaluate, format_table, plot_tradeoff
    if args.repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {args.repeat}")
    if args.hf:  # the HF rows' assistant, refused before anything runs
        from bild_kernels.hf import check_assistant
        check_assistant(args.small)
    engine = _engine(args, max_batch_size=max(args.batch, 1), max_model_len=1024)
    prompts = _eval_prompts(engine, args.prompts, args.prompt_set)
    policies = _eval_policies(args, engine)
    interleave = not args.sequential
    bar = _progress(eval_runs(len(prompts), len(policies), batch=args.batch, interleave=interleave,
                              repeat=args.repeat), "eval")
    rows = [r.as_dict() for r in evaluate(engine, prompts, policies, batch=args.batch, max_tokens=args.max_tokens,
                                          progress=lambda: bar.update(1), interleave=interleave,
                                          repeat=args.repeat)]
    bar.close()
    if args.hf:
        rows += [r for r in _hf_rows(args, engine, prompts, rows[0]) if r]
    cols = ["policy", "batch", "tokens_per_s", "speedup", "exact_match", "rouge_l", "nll", "nll_ratio",
            "acceptance", "mean_accepted", "passes_per_token", "fallbacks", "rollbacks", "draft_s", "verify_s",
            "overhead_s", "ttft_ms", "decode_speedup"] + (["cached_prompt"] if engine.prefix_cache is not None else [])
    print(format_table(rows, cols))
    _write_csv(args.out, rows, {**_run_info(engine), "repeat": args.repeat, "prompt_set": args.prompt_set,
                              "prefix_cache": engine.prefix_cache.max_tokens if engine.prefix_cache else 0})
    if args.plot:
        plot_tradeoff(rows[1:], args.plot,
                      title=f"BiLD trade-off on {len(prompts)} {args.prompt_set} prompts, batch {args.batch}")
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _hf_rows(args, engine, prompts, base_row) -> list[dict]:
    """HF generate (large alone) and HF assisted generation with the same pair (and, with --lookup, HF prompt lookup
    decoding), batch 1, greedy."""
    from bild_kernels.evaluate import rouge_l
    from bild_kernels.hf import hf_generate, hf_pair
    large, small = hf_pair(args.large, args.small)
    base_tps = base_row["tokens_per_s"]
    rows, ref = [], None
    # The default pair's feature draft cannot assist transformers: its standalone draft does, and the rows say so.
    tag = " (standalone draft)" if args.small is None and engine.small_kind == "feature" else ""
    runs = [("hf generate", None, None, 0), (f"hf assisted{tag}", small, None, 0),
            (f"hf assisted{tag} conf=0.4", small, 0.4, 0)]
    if getattr(args, "lookup", 0):  # beside NGram: transformers' prompt lookup decoding, as many tokens
        runs.append((f"hf prompt lookup ({args.lookup})", None, None, args.lookup))
    for name, assistant, conf, lookup in runs:
        outs, wall = hf_generate(large, prompts, args.max_tokens, assistant=assistant, confidence=conf,
                                 lookup=lookup)
        ref = outs if ref is None else ref
        toks = sum(len(o) for o in outs)
        nll = sum(-sum(engine.score(p, o)) for p, o in zip(prompts, outs) if o) / max(toks, 1)
        rows.append({"policy": name, "batch": 1, "prompts": len(prompts), "tokens": toks,
                     "tokens_per_s": round(toks / wall, 4), "speedup": round(toks / wall / base_tps, 4),
                     "exact_match": round(sum(a == b for a, b in zip(outs, ref)) / len(outs), 4),
                     "rouge_l": round(sum(rouge_l(a, b) for a, b in zip(outs, ref)) / len(outs), 4),
                     "nll": round(nll, 4), "nll_ratio": round(nll / base_row["nll"], 4) if base_row["nll"] else 0})
    return rows


def cmd_bench(args) -> int:
    args.sweep = False
    args.hf = not args.no_hf
    args.plot = None
    return cmd_eval(args)


def add_parsers(sub) -> None:
    for name, func, hlp in (("eval", cmd_eval, "quality and speed vs the large model alone (held-out prompts)"),
                            ("bench", cmd_bench, "speed vs LargeOnly and Hugging Face (held-out prompts)")):
        e = sub.add_parser(name, help=hlp)
        _model_args(e)
        e.add_argument("--prompts", type=int, default=50, help="prompts of --prompt-set to use (max 59)")
        e.add_argument("--prompt-set", default="held-out", choices=PROMPT_SETS,
                       help="held-out: the evaluation set training never saw (what the README reports); tune: "
                            "59 other prompts no draft trains on either, to choose thresholds on without "
                            "looking at the held-out set (bild_kernels.distill.prompts.tune_prompts)")
        e.add_argument("--max-tokens", type=int, default=64)
        e.add_argument("--batch", type=int, default=1, help="1: one request at a time; n: the engine batches n")
        e.add_argument("--greedy-draft-len", type=int, default=3)
        e.add_argument("--lookup", type=int, default=0, metavar="N",
                       help="also NGram(max_draft_len=N) alone, and Greedy and the default BiLD with that n-gram "
                            "lookup (up to N tokens after a match of n = 3, then 2) where it matches (without it "
                            "where the default has one); with --sweep, every swept BiLD both ways")
        e.add_argument("--max-draft-len", type=int, default=None, help="BiLD draft cap in the sweep (default 10)")
        e.add_argument("--out", default=None, help="append the rows to this CSV")
        e.add_argument("--sequential", action="store_true",
                       help="each policy over all prompts in turn (default: every policy on each prompt, or each "
                            "batch of them, in rotating order, so that a machine's speed drifting during the run "
                            "slows all policies alike)")
        e.add_argument("--repeat", type=int, default=1, metavar="N",
                       help="run every policy N times on each prompt (or batch), the rounds interleaved, and time "
                            "each by its fastest run: speed-ups that a shared machine's slow moments move less")
        if name == "eval":
            e.add_argument("--sweep", action="store_true", help="also sweep BiLD's two thresholds")
            e.add_argument("--fallback-grid", default="0.3,0.5,0.7,0.9")
            e.add_argument("--rollback-grid", default="1,2,4,8")
            e.add_argument("--energy-grid", default="", help="with --sweep: E-LANG energy fallback thresholds too")
            e.add_argument("--auto", action="store_true", help="with --sweep: FREE's calibrated thresholds too")
            e.add_argument("--jacobi", type=int, default=0, help="with --sweep: Jacobi(block_size=N) too")
            e.add_argument("--shallow-deep", type=int, default=0, help="with --sweep: ShallowDeep(exit_layer=N) too")
            e.add_argument("--hf", action="store_true", help="also run HF generate and assisted generation")
            e.add_argument("--plot", default=None, help="write the speed/quality trade-off as a PNG here")
        else:
            e.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
        e.set_defaults(func=func)

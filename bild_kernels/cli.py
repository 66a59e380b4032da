"""`bild`: generate, benchmark, evaluate and distil from the command line.

  bild generate "prompt"     stream a reply from the default pair (or --large/--small) with BiLD
  bild eval                  quality and speed of policies vs the large model alone on held-out prompts
  bild bench                 speed only: policies vs LargeOnly vs Hugging Face generate / assisted generation
  bild distill --out DIR     train a draft model for a large model and write a shippable draft directory

Bad input (an unknown model path, an unreadable GGUF, a pair with different tokenizers, an empty
prompt, a parameter out of range) ends with one line on stderr and exit status 2, never a traceback
(BILD_DEBUG=1 shows it).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

POLICY_NAMES = ("bild", "greedy", "sampling", "large-only", "small-only", "jacobi", "shallow-deep", "ngram")


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------
# shared options
# ---------------------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--large", help="large model: HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--small", help="small model: HF directory, .gguf, or draft directory (default: the shipped "
                                   "draft when --large is not given; none otherwise)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bf16 on CUDA)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    g.add_argument("--small-weights", default="auto", choices=("auto", "int8", "as-loaded"),
                   help="small model's weights: int8 (CPU; bf16 activations), as-loaded, or auto (int8 on a CPU "
                        "when --dtype is not given)")
    g.add_argument("--draft-max-batch", default="auto",
                   help="draft only while at most N requests run together (larger batches decode with the large "
                        "model alone): N, none, or auto (the shipped draft's recommendation on a CPU)")
    g.add_argument("--draft-loop", default="auto", choices=("auto", "native", "eager", "static", "graph"),
                   help="how draft runs execute (Engine's draft_loop): auto is graph on CUDA, native on a CPU (a "
                        "feature draft's greedy runs in one call of the CPU extension); eager is "
                        "the Python loop")
    g.add_argument("--prefix-cache", default="auto", metavar="TOKENS",
                   help="keep the large model's KV of up to TOKENS recent prompt positions and reuse a new prompt's "
                        "longest kept prefix instead of prefilling it (Engine's prefix_cache): TOKENS, 0 (off), or "
                        "auto (the default: 4096 where a hit provably changes nothing but the time, the default "
                        "pair on a CPU with AVX-512 VNNI; else off). bild eval / bench never let a prompt reuse "
                        "itself, only what it shares with the others (a system prompt, a template)")
    g.add_argument("--prefill-chunk", default="auto", metavar="TOKENS",
                   help="prefill a prompt longer than TOKENS a chunk of TOKENS a step while the other requests go "
                        "on decoding (Engine's prefill_chunk): TOKENS, 0 (whole prompts), or auto (the default: 256 "
                        "where chunking provably changes nothing but the time, as for --prefix-cache; else whole)")


def _policy_args(p: argparse.ArgumentParser, default_policy: str | None = "bild") -> None:
    g = p.add_argument_group("policy")
    g.add_argument("--policy", default=default_policy, choices=POLICY_NAMES)
    g.add_argument("--fallback-threshold", type=float, default=None, help="BiLD: draft while max prob >= this")
    g.add_argument("--rollback-threshold", type=float, default=None, help="BiLD: reject drafts with -log p_L > this")
    g.add_argument("--max-draft-len", type=int, default=None)
    g.add_argument("--fallback-signal", default=None, choices=("max_prob", "energy"),
                   help="BiLD: max_prob (the paper's) or energy (E-LANG: unsure when energy > threshold)")
    g.add_argument("--block-size", type=int, default=None, help="jacobi: guesses per pass")
    g.add_argument("--exit-layer", type=int, default=None, help="shallow-deep: layers of the large model that draft")
    g.add_argument("--max-ngram", type=int, default=None, help="ngram / --lookup: longest n-gram matched (default 3)")
    g.add_argument("--min-ngram", type=int, default=None,
                   help="ngram / --lookup: shortest n-gram matched (default 2, or --max-ngram if that is less)")
    g.add_argument("--lookup", type=int, default=None, metavar="N",
                   help="bild, greedy, sampling: where the sequence's last tokens occurred before, draft the up to N "
                        "tokens that followed them instead of running the small model (prompt lookup); 0: none "
                        "(default: none, or the default BiLD's own for bild)")


def _engine(args, *, max_batch_size: int = 1, max_model_len: int = 1024):
    import torch

    from bild_kernels import Engine
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from bild_kernels.models.loader import DTYPES
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.small and not args.large:
        raise UsageError("--small needs --large (the default draft belongs to the default large model)")
    weights = {"as-loaded": None}.get(args.small_weights, args.small_weights)
    limit = given = getattr(args, "draft_max_batch", "auto")
    if limit not in ("auto", "none"):
        try:
            limit = int(limit)
        except ValueError:
            limit = 0
        if limit < 1:
            raise UsageError(f"--draft-max-batch must be a positive int, none or auto, got {given!r}")
    return Engine(large=args.large, small=args.small, device=device, dtype=dtype, max_batch_size=max_batch_size,
                  max_model_len=max_model_len, small_weights=weights,
                  draft_max_batch=None if limit == "none" else limit,
                  draft_loop=None if getattr(args, "draft_loop", "auto") == "auto" else args.draft_loop,
                  prefix_cache=_tokens_or_auto("--prefix-cache", getattr(args, "prefix_cache", "auto")),
                  prefill_chunk=_tokens_or_auto("--prefill-chunk", getattr(args, "prefill_chunk", "auto")))


def _tokens_or_auto(flag: str, given) -> int | str:
    if given == "auto":
        return "auto"
    try:
        tokens = int(given)
    except (TypeError, ValueError):
        tokens = -1
    if tokens < 0:
        raise UsageError(f"{flag} must be a number of tokens >= 0 or auto, got {given}")
    return tokens


def _policy(args, engine):
    from bild_kernels import BiLD, Greedy, LargeOnly, SmallOnly, SpeculativeSampling
    from bild_kernels.engine.policies import Jacobi, ShallowDeep
    name = args.policy
    if name is None:  # the engine's default, unless BiLD's knobs were given
        if all(getattr(args, a, None) is None for a in ("fallback_threshold", "rollback_threshold", "max_draft_len",
                                                        "fallback_signal", "lookup", "max_ngram", "min_ngram")):
            return engine.default_policy
        name = "bild"
    k = {} if args.max_draft_len is None else {"max_draft_len": args.max_draft_len}
    own = {"bild": ("fallback_threshold", "rollback_threshold", "fallback_signal"), "jacobi": ("block_size",),
           "shallow-deep": ("fallback_threshold", "rollback_threshold", "exit_layer"),
           "ngram": ("max_ngram", "min_ngram")}.get(name, ())
    if name in ("bild", "greedy", "sampling"):
        own += ("lookup", "max_ngram", "min_ngram") if args.lookup else ("lookup",)
    for a in ("fallback_threshold", "rollback_threshold", "fallback_signal", "block_size", "exit_layer", "lookup",
              "max_ngram", "min_ngram"):
        if getattr(args, a, None) is not None and a not in own:
            raise UsageError(f"--{a.replace('_', '-')} does not apply to --policy {name}"
                             + (" without --lookup" if a in ("max_ngram", "min_ngram") else ""))
    lookup = None  # --lookup 0: none (a default BiLD's own lookup goes too)
    if args.lookup:
        lookup = _ngram(args.lookup, args.max_ngram, args.min_ngram, what="--lookup")
    if name == "bild":
        base = engine.default_policy if isinstance(engine.default_policy, BiLD) else BiLD()
        signal = args.fallback_signal or "max_prob"
        if signal == "energy" and args.fallback_threshold is None:
            raise UsageError("--fallback-signal energy needs --fallback-threshold (an energy, e.g. -20)")
        return BiLD(fallback_threshold=(base.fallback_threshold if args.fallback_threshold is None
                                        else args.fallback_threshold),
                    rollback_threshold=(base.rollback_threshold if args.rollback_threshold is None
                                        else args.rollback_threshold),
                    max_draft_len=k.get("max_draft_len", base.max_draft_len), fallback_signal=signal,
                    lookup=base.lookup if args.lookup is None else lookup)
    if name == "ngram":
        return _ngram(args.max_draft_len if args.max_draft_len is not None else 4, args.max_ngram, args.min_ngram,
                      what="--max-draft-len")
    if name == "jacobi":
        return Jacobi() if args.block_size is None else Jacobi(block_size=args.block_size)
    if name == "shallow-deep":
        if args.exit_layer is None:
            raise UsageError("--policy shallow-deep needs --exit-layer")
        kw = {a: getattr(args, a) for a in ("fallback_threshold", "rollback_threshold") if getattr(args, a) is not None}
        return ShallowDeep(exit_layer=args.exit_layer, **kw, **k)
    return {"greedy": lambda: Greedy(**k, lookup=lookup), "sampling": lambda: SpeculativeSampling(**k, lookup=lookup),
            "large-only": LargeOnly, "small-only": SmallOnly}[name]()


def _ngram(length: int, max_ngram: int | None, min_ngram: int | None, *, what: str):
    """An NGram policy (alone, or as another policy's `lookup`) from the command line's numbers."""
    from bild_kernels.engine.policies import NGram
    max_ngram = 3 if max_ngram is None else max_ngram
    min_ngram = min(2, max_ngram) if min_ngram is None else min_ngram
    try:
        return NGram(max_draft_len=length, max_ngram=max_ngram, min_ngram=min_ngram)
    except ValueError as exc:
        msg = str(exc).replace("max_draft_len", what).replace("max_ngram", "--max-ngram").replace("min_ngram",
                                                                                                  "--min-ngram")
        raise UsageError(msg) from None


# ---------------------------------------------------------------------------------------------------
# bild generate
# ---------------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from bild_kernels import SamplingParams
    from bild_kernels.evaluate import describe
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    bias = {}
    for item in args.logit_bias or []:
        tok, _, val = item.partition("=")
        try:
            bias[int(tok)] = float(val)
        except ValueError:
            raise UsageError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 13=-100), got {item!r}") from None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            min_tokens=args.min_tokens, logit_bias=bias)
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
    m = out.metrics
    line = (f"[{describe(policy)}] {m.generated_tokens} tokens in {m.wall_time:.2f} s = {m.tokens_per_s:.1f} tokens/s"
            f" (first after {m.time_to_first_token * 1e3:.0f} ms)" + f" | large passes {m.large_passes}")
    if policy.drafts:
        line += (f" | acceptance {m.acceptance_rate:.0%}, mean accepted {m.mean_accepted_length:.2f}"
                 f" | fallbacks {m.fallbacks} | rollbacks {m.rollbacks}")
        if m.lookup_drafted_tokens:
            line += f" | n-gram lookup: {m.lookup_accepted_tokens} of {m.lookup_drafted_tokens} drafts kept"
    print(line + f" | models loaded in {load_s:.1f} s", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------
# bild eval / bild bench
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# bild distill
# ---------------------------------------------------------------------------------------------------
def cmd_distill(args) -> int:
    from bild_kernels.distill.parts import MIB, split_dir
    from bild_kernels.distill.pipeline import distill
    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise UsageError(f"--layers must be comma-separated layer numbers, e.g. 0,1,2,29; got {args.layers!r}"
                         ) from None
    if args.split_mib is not None and not args.split_mib > 0:
        raise UsageError(f"--split-mib must be > 0, got {args.split_mib:g}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    distill(large=args.large, out=args.out, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
            minutes=args.minutes, init_layers=layers, draft_vocab=args.draft_vocab, threads=args.threads,
            work_dir=args.work_dir, bf16=args.bf16, kind=args.kind, device=args.device,
            samples_per_prompt=args.samples_per_prompt, init_draft=args.init_draft, corpus_minutes=args.corpus_minutes,
            corpus_seed=args.corpus_seed,
            corpus_batch_size=args.corpus_batch_size, train_batch_size=args.train_batch_size, lr=args.lr,
            feature_layers=args.feature_layers, self_prompts=args.self_prompts, topic_prompts=args.topic_prompts,
            corpus_backend=args.corpus_backend,
            feature_cache=not args.no_feature_cache, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.split_mib is not None:
        for f in split_dir(args.out, int(args.split_mib * MIB), remove=True):
            print(f"{f} split into parts of at most {args.split_mib:g} MiB; put it back with "
                  f"python -m bild_kernels.distill.parts join {args.out}", file=sys.stderr)
    return 0


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bild", description="Big-little speculative decoding (BiLD) on fused kernels.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a reply to one prompt")
    g.add_argument("prompt", help="the prompt ('-' reads stdin)")
    _model_args(g)
    _policy_args(g, default_policy=None)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0; divides the logits of tokens already in the prompt or reply (1: off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2]: once per token the reply holds")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2]: per occurrence in the reply")
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS before the reply has this many tokens")
    g.add_argument("--logit-bias", action="append", metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit; repeatable")
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    g.add_argument("--system", metavar="TEXT", help="a system message before the prompt (through the chat template)")
    g.set_defaults(func=cmd_generate)

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
                            "lookup (up to N tokens after a match of n = 3, then 2) where it matches (without it where the default has "
                            "one); with --sweep, every swept BiLD both ways")
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

    d = sub.add_parser("distill", help="train a draft model for a large model")
    d.add_argument("--large", default=None, help="large model (default: SmolLM2-135M-Instruct)")
    d.add_argument("--out", required=True, help="draft directory to write")
    d.add_argument("--prompts", type=int, default=512, help="training prompts (templated, at most 23,704; see distill/prompts.py)")
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.add_argument("--minutes", type=float, default=15.0, help="training wall time")
    d.add_argument("--layers", default=None, help="large-model layers to initialise the draft from, e.g. 0,1,2,29")
    d.add_argument("--feature-layers", type=int, default=None, metavar="N",
                   help="--kind feature: decoder layers of the draft, initialised from the large model's last N "
                        "(default 1, or --init-draft's own)")
    d.add_argument("--draft-vocab", type=int, default=None,
                   help="head vocabulary size (default 8192, or --init-draft's own; 0: the whole vocabulary); with "
                        "--init-draft, a larger one adds the corpus's most frequent tokens its head lacks")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--work-dir", default=None, help="cache the corpus and teacher targets here between runs")
    d.add_argument("--no-feature-cache", action="store_true",
                   help="--kind feature: do not write the teacher's features to --work-dir (14 GB for 12.5M tokens; "
                        "on a GPU they are quicker to compute again than to write)")
    d.add_argument("--kind", default="layers", choices=("layers", "feature"),
                   help="layers: a standalone few-layer draft; feature: an EAGLE-style one-layer draft that reads "
                        "the large model's hidden states (engine only, no HF assisted generation)")
    d.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="teacher corpus and training in bfloat16 (default: where fast: CUDA, or a CPU with AMX)")
    g = d.add_argument_group("GPU runs, more data, warm starts")
    g.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (default) or cuda: where the large model writes the corpus and the draft trains")
    g.add_argument("--samples-per-prompt", type=int, default=1, metavar="K",
                   help="answers sampled per training prompt (T=0.7, a seed per pass): more data from the same prompts")
    g.add_argument("--init-draft", default=None, metavar="DIR",
                   help="warm-start from a draft directory of the same --kind (e.g. the shipped "
                        "bild_kernels/data/smollm2-135m-instruct-feature-draft with --kind feature): its weights, "
                        "head vocabulary and policy")
    g.add_argument("--corpus-minutes", type=float, default=None, metavar="M",
                   help="wall-time budget of the training corpus; generation stops there and the run goes on")
    g.add_argument("--self-prompts", type=int, default=0, metavar="N",
                   help="N more training prompts written by the large model itself (sampled from its chat "
                        "template's user-turn header, Magpie-style), mixed with the templated ones")
    g.add_argument("--topic-prompts", type=int, default=0, metavar="N",
                   help="N more training prompts about everyday topics from WordNet (~10,000, none held out), each "
                        "under a random training template, mixed with the others")
    g.add_argument("--corpus-seed", type=int, default=0, metavar="S",
                   help="sampling seed of the corpus (default 0): another seed, other answers to the same prompts")
    g.add_argument("--corpus-backend", default="auto", choices=("auto", "bild", "hf"),
                   help="what writes the training answers: bild's batch decode loop (CUDA graphs, no host sync a "
                        "step; the default on CUDA) or transformers' generate (the default on a CPU)")
    g.add_argument("--corpus-batch-size", type=int, default=None, metavar="B",
                   help="answers generated per batch (default: 256 on CUDA, 64 in bfloat16 on a CPU, else 16)")
    g.add_argument("--train-batch-size", type=int, default=None, metavar="B", help="sequences per training step "
                                                                      "(default: 64 on CUDA, 8 on a CPU)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4, 2e-4 with --init-draft; "
                                                              "feature drafts 2e-3, 1e-3 with --init-draft)")
    g.add_argument("--split-mib", type=float, default=None, metavar="MIB",
                   help="then write every draft file over this many MiB as parts (e.g. 15: a GPU machine hands back "
                        "files of at most 16 MiB); python -m bild_kernels.distill.parts join DIR rebuilds them")
    d.set_defaults(func=cmd_distill)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if os.environ.get("BILD_DEBUG"):  # developers: the full traceback
        return args.func(args)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"bild: error: {exc}", file=sys.stderr)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"bild: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bild: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())

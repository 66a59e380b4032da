"""What the `bild` subcommands share: the model and policy options, the engine and policy they build, the usage error
that ends a command with one line on stderr."""
from __future__ import annotations

import argparse
import sys

POLICY_NAMES = ("bild", "greedy", "sampling", "large-only", "small-only", "jacobi", "shallow-deep", "ngram")


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--large", help="large model: HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--small", help="small model: HF directory, .gguf, or draft directory (default: the shipped "
                                   "draft when --large is not given; none otherwise)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bf16 on CUDA)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    g.add_argument("--large-weights", default="as-loaded", choices=("as-loaded", "int8"),
                   help="large model's weights: as loaded, or int8 per output channel (a float checkpoint on a CPU: "
                        "a quarter of the bytes a step reads; the large model is then the int8 one)")
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
                  large_weights=None if getattr(args, "large_weights", "as-loaded") == "as-loaded" else "int8",
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


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


"""`bild distill`: train a draft for a large model (bild_kernels.distill.pipeline) from the command line."""
from __future__ import annotations

import argparse
import sys

from bild_kernels.cli.common import UsageError


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
            json_prompts=args.json_prompts,
            corpus_backend=args.corpus_backend,
            feature_cache=not args.no_feature_cache, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.split_mib is not None:
        for f in split_dir(args.out, int(args.split_mib * MIB), remove=True):
            print(f"{f} split into parts of at most {args.split_mib:g} MiB; put it back with "
                  f"python -m bild_kernels.distill.parts join {args.out}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("distill", help="train a draft model for a large model")
    d.add_argument("--large", default=None, help="large model (default: SmolLM2-135M-Instruct)")
    d.add_argument("--out", required=True, help="draft directory to write")
    d.add_argument("--prompts", type=int, default=512,
                   help="training prompts (templated, at most 23,704; see distill/prompts.py)")
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
    g.add_argument("--json-prompts", type=int, default=0, metavar="N",
                   help="N more training prompts that ask for JSON about WordNet topics (what structured outputs ask "
                        "of a draft), mixed with the others")
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

"""`bild`: generate, benchmark, evaluate and distil from the command line.

  bild generate "prompt"     stream a reply from the default pair (or --large/--small) with BiLD
  bild chat                  a conversation in the terminal: each line a turn, replies streamed
  bild eval                  quality and speed of policies vs the large model alone on held-out prompts
  bild bench                 speed only: policies vs LargeOnly vs Hugging Face generate / assisted generation
  bild distill --out DIR     train a draft model for a large model and write a shippable draft directory

Bad input (an unknown model path, an unreadable GGUF, a pair with different tokenizers, an empty
prompt, a parameter out of range) ends with one line on stderr and exit status 2, never a traceback
(BILD_DEBUG=1 shows it).
"""
from __future__ import annotations

import argparse
import os
import sys

from bild_kernels.cli import chat, distill, evaluation, generate
from bild_kernels.cli.common import POLICY_NAMES, UsageError, _policy

__all__ = ["POLICY_NAMES", "UsageError", "_policy", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bild", description="Big-little speculative decoding (BiLD) on fused kernels.")
    sub = ap.add_subparsers(dest="command", required=True)

    generate.add_parser(sub)
    chat.add_parser(sub)
    evaluation.add_parsers(sub)
    distill.add_parser(sub)
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


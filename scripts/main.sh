#!/usr/bin/env bash
# The main job (README): set everything up on a fresh machine, then let BiLD answer a prompt with the
# default pair — SmolLM2-135M-Instruct (large) and its distilled draft (small) — streaming the tokens
# and closing with tokens/s, acceptance rate, fallbacks and rollbacks. Offline; a CPU is enough.
#   bash scripts/main.sh                       # the default prompt
#   bash scripts/main.sh "your prompt" [bild generate options, e.g. --policy large-only]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PROMPT="${1:-Explain in a few sentences why the sky is blue.}"
shift || true
bild generate "$PROMPT" --max-tokens 128 "$@"

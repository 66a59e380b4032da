"""Split large files into parts of a bounded size and join them back, byte for byte.

A GPU machine hands back only files of at most 16 MiB, and a draft's model.safetensors is ~28 MB:
`bild distill --split-mib 15` (or `split_dir`) writes it as parts, and after the transfer

    python -m bild_kernels.distill.parts join DRAFT_DIR

puts it back together. Next to the parts, `<name>.parts.json` records the original size, its SHA-256
and the parts in order; `join_parts` refuses a result that does not match it.

    python -m bild_kernels.distill.parts split PATH... [--mib 15] [--remove]   (files, or directories:
                                                                              every file over the size)
    python -m bild_kernels.distill.parts join PATH... [--remove]              (original files or directories)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

MIB = 1 << 20
_SUFFIX = ".parts.json"
_CHUNK = 4 * MIB  # read and hash in pieces: a file never has to fit in memory


def _index(path: Path) -> Path:
    return path.with_name(path.name + _SUFFIX)


def split_file(path, part_bytes: int, *, remove: bool = False) -> list[Path]:
    """Write `path` as `<name>.part000`, `.part001`, ... of at most `part_bytes` bytes each, and the
    index `<name>.parts.json`; returns the parts. `remove`: delete the original once all is written."""
    path = Path(path)
    if not isinstance(part_bytes, int) or part_bytes < 1:
        raise ValueError(f"part_bytes must be a positive int, got {part_bytes!r}")
    if not path.is_file():
        raise FileNotFoundError(f"split: no such file: {str(path)!r}")
    size = path.stat().st_size
    n_parts = max(1, -(-size // part_bytes))
    if n_parts > 1000:
        raise ValueError(f"split: {str(path)!r} would make {n_parts} parts of {part_bytes} bytes (at most 1000)")
    digest, parts = hashlib.sha256(), []
    with open(path, "rb") as src:
        for i in range(n_parts):
            part = path.with_name(f"{path.name}.part{i:03d}")
            left = min(part_bytes, size - i * part_bytes)
            with open(part, "wb") as dst:
                while left > 0:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise ValueError(f"split: {str(path)!r} changed while it was being split")
                    digest.update(chunk)
                    dst.write(chunk)
                    left -= len(chunk)
            parts.append(part)
    index = {"name": path.name, "size": size, "sha256": digest.hexdigest(), "part_bytes": part_bytes,
             "parts": [p.name for p in parts]}
    _index(path).write_text(json.dumps(index, indent=1) + "\n")
    if remove:
        path.unlink()
    return parts


def join_parts(path, *, remove: bool = False) -> Path:
    """Rebuild `path` from the parts its `<name>.parts.json` lists, checking size and SHA-256; the file
    appears only once it is complete and correct. `remove`: then delete the parts and the index."""
    path = Path(path)
    index_path = _index(path)
    try:
        index = json.loads(index_path.read_text())
        names, size, sha = index["parts"], index["size"], index["sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"join: unreadable index {str(index_path)!r}: {exc}") from None
    parts = [path.with_name(n) for n in names]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"join: {str(path)!r} is missing part(s) {missing}")
    digest, tmp, n = hashlib.sha256(), path.with_name(path.name + ".joining"), 0
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                        n += len(chunk)
        if n != size or digest.hexdigest() != sha:
            raise ValueError(f"join: the parts of {str(path)!r} give {n} bytes with SHA-256 "
                             f"{digest.hexdigest()[:12]}..., the index says {size} bytes, {sha[:12]}...")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if remove:
        for part in parts:
            part.unlink()
        index_path.unlink()
    return path


def split_dir(directory, part_bytes: int, *, remove: bool = False) -> list[Path]:
    """Split every file in `directory` (not recursive) larger than `part_bytes` (see `split_file`);
    returns the files split."""
    big = [f for f in sorted(Path(directory).iterdir()) if f.is_file() and f.stat().st_size > part_bytes]
    for f in big:
        split_file(f, part_bytes, remove=remove)
    return big


def join_dir(directory, *, remove: bool = False) -> list[Path]:
    """Join every split file of `directory` (every `<name>.parts.json` in it); returns the files rebuilt."""
    return [join_parts(i.with_name(i.name[:-len(_SUFFIX)]), remove=remove)
            for i in sorted(Path(directory).glob("*" + _SUFFIX))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bild_kernels.distill.parts",
                                 description="split files into parts of at most --mib MiB, or join them back")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="files, or directories (every file larger than --mib in them)")
    s.add_argument("paths", nargs="+")
    s.add_argument("--mib", type=float, default=15.0, help="largest part in MiB (default 15)")
    s.add_argument("--remove", action="store_true", help="delete each original once its parts are written")
    j = sub.add_parser("join", help="original file names, or directories (every split file in them)")
    j.add_argument("paths", nargs="+")
    j.add_argument("--remove", action="store_true", help="delete the parts and index once the file is rebuilt")
    args = ap.parse_args(argv)
    try:
        if args.command == "split":
            if not args.mib > 0:
                raise ValueError(f"--mib must be > 0, got {args.mib:g}")
            n = int(args.mib * MIB)
            for p in map(Path, args.paths):
                if p.is_dir():
                    done = split_dir(p, n, remove=args.remove)
                else:
                    split_file(p, n, remove=args.remove)
                    done = [p]
                for f in done:
                    print(f"split {f}", file=sys.stderr)
        else:
            for p in map(Path, args.paths):
                for f in join_dir(p, remove=args.remove) if p.is_dir() else [join_parts(p, remove=args.remove)]:
                    print(f"joined {f}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as exc:
        print(f"parts: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

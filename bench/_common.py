"""Shared benchmark plumbing: timing with percentiles, effective bandwidth, result rows.

Every bench_<op>.py prints one line per (configuration, backend) and appends a CSV row to
bench/results/<bench>.csv with the device name and git revision, so runs on different machines
and revisions can be compared side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "python"))  # python/_report.py: the shared row writer
from _report import write_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Peak memory bandwidth (GB/s) of devices we report against; unknown devices report no percentage.
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0, "T4": 320.0}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        model = "cpu"
    return f"{model} x{os.cpu_count()} (CPU)"


def peak_gbps(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def git_rev() -> str:
    """The checkout's short revision (with -dirty); $BILD_REV where it is set (a copy without .git)."""
    if os.environ.get("BILD_REV"):
        return os.environ["BILD_REV"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timeit(fn, device: str, *, warmup: int = 3, iters: int = 20, setup=None) -> dict:
    """Median and 20th/80th percentile of fn() in microseconds. `setup()` runs untimed before each call."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(iters):
        if setup:
            setup()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_us": statistics.median(times), "p20_us": q[1], "p80_us": q[7]}


# the CUDA backend with that first pass forced, or ("cuda-split", "cuda-block") with that top-k / top-p cut-off search
FORCED_FIRST_PASSES = ("cuda-chunked", "cuda-wide", "cuda-stream", "cuda-long", "cuda-split", "cuda-block")
# the CUDA backend told what the host knows of the rows (sample_draft / verify_draft's `rows`: the kernels for kinds
# of row absent are left out), as the engine calls it
HINTED = "cuda-hinted"
# the fused tail (bild_kernels.cuda_fused_tail), told the rows as "cuda-hinted": it applies where they allow
FUSED = "cuda-fused"
GRAPHED = ("cuda", *FORCED_FIRST_PASSES, HINTED, FUSED, "triton")  # also timed replayed from a CUDA graph on a GPU ("<backend>+graph")


@functools.lru_cache(None)
def flashinfer_sampling():
    """FlashInfer's sampling module (`flashinfer.sampling`, its library loaded) where it imports and loads here, once
    a process (scripts/flashinfer_build.sh makes a benchmark-only install), else None, said once on stderr."""
    try:
        import flashinfer.sampling as fs
        fs.get_sampling_module()  # its library loads on first use: a mismatched torch fails here, not mid-run
    except Exception as exc:  # not installed, or its library does not load here
        print(f"flashinfer: unusable here, left out ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        return None
    return fs


@contextlib.contextmanager
def first_pass_of(backend: str):
    """"cuda-chunked" / "cuda-wide" / "cuda-stream" / "cuda-long" are the CUDA backend with that first pass over V
    forced (bild_kernels.cuda_first_pass; "cuda" runs the default, "auto"), "cuda-split" / "cuda-block" the default
    first pass with that top-k / top-p cut-off search (bild_kernels.cuda_cut_search; the default, "auto", picks per
    launch): set for the timings of that backend only."""
    if backend not in (*FORCED_FIRST_PASSES, FUSED):
        yield
        return
    from bild_kernels import cuda_cut_search, cuda_first_pass, cuda_fused_tail
    kind = backend.split("-", 1)[1]
    choose = (cuda_cut_search if kind in ("split", "block") else
              cuda_fused_tail if kind == "fused" else cuda_first_pass)
    old = choose(kind)
    try:
        yield
    finally:
        choose(old)


def graph_replay(fn):
    """fn captured in a CUDA graph (after one warm-up call), returned as its replay: what the op costs the GPU
    alone, without the Python and launch cost that a timed eager call includes (the engine runs its draft
    steps this way)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def implementation(op: str, ref, backend: str, device: str):
    """A backend's function for an op's benchmark: its reference twin `ref` ("ref"), torch.compile of it
    ("compile"), else the op's kernel without the op's input checks ("cuda-chunked", "cuda-split", ...: the CUDA
    kernel, run under first_pass_of)."""
    if backend == "ref":
        return ref
    if backend == "compile":
        return torch.compile(ref, dynamic=False)
    from bild_kernels._backend import resolve
    return resolve(op, torch.device(device), "cuda" if backend.startswith("cuda-") else backend)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="comma-separated subset of cuda,triton,ref,compile")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-save", action="store_true", help="print only, write no CSV row")
    p.add_argument("--shapes", default=None,
                   help="only these shapes, comma-separated, dims joined by x in the benchmark's order "
                        "(verify_draft: BxKxV, e.g. 64x8x128256; sample_draft: BxV)")
    return p


def engine_parser(description: str) -> argparse.ArgumentParser:
    """The options of the engine-level benchmarks (a model pair, rounds, threads); `engine_args` parses them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pair", default="default", help="default (SmolLM2-135M-Instruct + its draft) or tiny / llama-1b "
                                                     "(random, bench_e2e.PAIRS)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=1, help="rounds, the settings alternating")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-save", action="store_true")
    return p


def engine_args(p: argparse.ArgumentParser):
    """`p`'s arguments, with torch's threads set as asked."""
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def pick_shapes(args, default: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes to run: --shapes if given (each with as many dims as the defaults have), else `default`."""
    if not args.shapes:
        return default
    dims = len(default[0])
    shapes = []
    for item in args.shapes.split(","):
        try:
            shape = tuple(int(d) for d in item.split("x"))
        except ValueError:
            shape = ()
        if len(shape) != dims or min(shape) < 0:
            raise SystemExit(f"--shapes: {item!r} is not {dims} non-negative integers joined by x")
        shapes.append(shape)
    return shapes


def cpu_extension_rows(args, op: str, unit: str, max_rows: int) -> list[int]:
    """For a benchmark of a CPU-extension op with --threads and --rows: exit with the reason where it cannot
    run (not --device cpu, bild_kernels._cpu missing), set torch's threads, and return the --rows values,
    each checked to lie in 1..max_rows (`unit` names them in the message: M, T)."""
    from bild_kernels._backend import cpu_extension
    if args.device != "cpu":
        raise SystemExit(f"{op} is a CPU op: run with --device cpu (the default without a GPU)")
    if cpu_extension() is None:
        raise SystemExit("bild_kernels._cpu is not built or this CPU lacks AVX2/FMA: nothing to compare")
    rows = [int(m) for m in args.rows.split(",")]
    if any(not 1 <= m <= max_rows for m in rows):
        raise SystemExit(f"--rows: each {unit} must be in 1..{max_rows}")
    torch.set_num_threads(args.threads)
    return rows


def usable_backends(device: str, requested: str | None, *, cpu_kernel: bool = False,
                    first_pass: bool = False) -> list[str]:
    """Backends to run: on a GPU all built ones plus the torch.compile'd reference (with first_pass=True, the op
    has a choice of first pass and cut-off search: "cuda-chunked", "cuda-wide", "cuda-stream", "cuda-long" and
    "cuda-split", "cuda-block" and "cuda-fused" too); on a CPU the reference, (under TRITON_INTERPRET=1) Triton, and
    with cpu_kernel=True (the op has one in bild_kernels._cpu) "cpu" where that extension is built and runs
    here."""
    from bild_kernels._backend import cpu_extension, cuda_extension, triton_available, triton_interpret
    avail = ["ref"]
    if cpu_kernel and device == "cpu" and cpu_extension() is not None:
        avail.append("cpu")
    if triton_available() and (device == "cuda" or triton_interpret()):
        avail.append("triton")
    if device == "cuda":
        avail.append("compile")
        if cuda_extension() is not None:
            avail.append("cuda")
            if first_pass:
                avail += [*FORCED_FIRST_PASSES, HINTED, FUSED]
    if requested:
        want = requested.split(",")
        return [b for b in want if b in avail]
    return avail


# torch.compile of the reference runs at the targets' configuration only: each shape (and mode) is a
# recompilation of tens of seconds, and a GPU session's device time is short.
COMPILE_AT = {"B": 64, "V": 128256}


def runs_at(backend: str, config: dict) -> bool:
    """Whether `backend` is timed at `config` (every backend everywhere, "compile" at COMPILE_AT only)."""
    if backend != "compile":
        return True
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # no silent eager
    return all(config.get(k) == v for k, v in COMPILE_AT.items())


def append_rows(name: str, rows: list[dict]) -> Path:
    """Append rows to bench/results/<name> (the header written when the file is new): the writer of the
    python/ programs' result rows (python/_report.py), which live beside these."""
    return write_csv(RESULTS / name, rows)


def record(bench: str, device: str, backend: str, config: dict, stats: dict, bytes_moved: int | None,
           save: bool = True) -> dict:
    gbps = bytes_moved / (stats["median_us"] * 1e-6) / 1e9 if bytes_moved else None
    peak = peak_gbps(device)
    row = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "rev": git_rev(), "backend": backend,
        **config,
        "median_us": round(stats["median_us"], 2), "p20_us": round(stats["p20_us"], 2),
        "p80_us": round(stats["p80_us"], 2),
        "GBps": round(gbps, 1) if gbps else "",
        "pct_peak": round(100 * gbps / peak, 1) if (gbps and peak) else "",
    }
    cfg = " ".join(f"{k}={v}" for k, v in config.items())
    bw = f"{row['GBps']:>8} GB/s" + (f" ({row['pct_peak']}% of peak)" if row["pct_peak"] != "" else "") if gbps else ""
    print(f"{bench:<22} {backend:<8} {cfg:<40} median {row['median_us']:>10.1f} us "
          f"[p20 {row['p20_us']:.1f}, p80 {row['p80_us']:.1f}] {bw}", flush=True)
    if save:
        append_rows(f"{bench}.csv", [row])
    return row


def time_backend(bench: str, backend: str, fn, args, config: dict, moved: int, base: float | None, *, gpu: bool,
                 iters: int, context=contextlib.nullcontext) -> float | None:
    """Time one backend's call `fn` at `config` (a row), and on a GPU, where the backend is one of GRAPHED, replayed
    from a CUDA graph (a "+graph" row); print its speed-up over the reference's median `base`. Returns the reference's
    median: this call's where backend is "ref", else `base`. context: what each timing runs inside (first_pass_of)."""
    with context():
        stats = timeit(fn, args.device, warmup=2 if gpu else 1, iters=iters)
    base = stats["median_us"] if backend == "ref" else base
    row = record(bench, args.device, backend, config, stats, moved, save=not args.no_save)
    if base and backend != "ref":
        print(f"{'':<22} {backend:<8} speed-up vs ref: {base / row['median_us']:.2f}x")
    if gpu and backend in GRAPHED:
        with context():
            stats = timeit(graph_replay(fn), args.device, warmup=2, iters=iters)
        record(bench, args.device, backend + "+graph", config, stats, moved, save=not args.no_save)
    return base

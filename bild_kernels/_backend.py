"""Which kernel backend runs an op: "cuda" (bild_kernels._C), "triton", "cpu" (bild_kernels._cpu, CPU-only
ops such as cpu_linear), or "ref" (PyTorch).

Default per device: CUDA tensors use the CUDA extension when it was built, else Triton; CPU tensors
use the CPU extension where it implements the op and was built for this CPU, then Triton when
TRITON_INTERPRET=1 (the interpreter runs kernels on the CPU), else the reference.
`BILD_BACKEND=cuda|triton|cpu|ref` forces a default (ops without that backend keep theirs); `backend=`
forces one call.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("cuda", "triton", "cpu", "ref")
# what bild_kernels._cpu implements (ops/_cpu_impls.py)
CPU_EXTENSION_OPS = ("cpu_linear", "cpu_linear_int8", "cpu_linear_q8_0", "cpu_linear_q4_1", "reserve_paged_kv",
                     "rollback_paged_kv", "cpu_decoder_layer", "cpu_rms_norm", "cpu_feature_input",
                     "cpu_feature_draft_chain", "apply_penalties", "apply_token_bitmask")
# ops whose "cpu" backend needs bild_kernels._cpu through a Python wrapper (rows without top-k/top-p; the reference
# otherwise)
CPU_WRAPPED_OPS = ("sample_draft", "verify_draft")

# op -> backends that implement it (filled in by the backend modules as they import).
_IMPLS: dict[str, dict[str, object]] = {}


@functools.lru_cache(None)
def cuda_extension():
    """The compiled extension module, or None when it was not built."""
    try:
        from bild_kernels import _C  # noqa: F401
    except ImportError:
        return None
    # the ops' fake implementations come with the extension, whoever imports it first
    from bild_kernels.ops import _cuda_impls  # noqa: F401
    kind = os.environ.get("BILD_FIRST_PASS")
    if kind:
        if kind not in FIRST_PASSES:
            raise ValueError(f"BILD_FIRST_PASS must be one of {FIRST_PASSES}, got {kind!r}")
        _C.set_first_pass(FIRST_PASSES.index(kind))
    kind = os.environ.get("BILD_CUT_SEARCH")
    if kind:
        if kind not in CUT_SEARCHES:
            raise ValueError(f"BILD_CUT_SEARCH must be one of {CUT_SEARCHES}, got {kind!r}")
        _C.set_cut_search(CUT_SEARCHES.index(kind))
    kind = os.environ.get("BILD_FUSED_TAIL")
    if kind:
        if kind not in FUSED_TAILS:
            raise ValueError(f"BILD_FUSED_TAIL must be one of {FUSED_TAILS}, got {kind!r}")
        _C.set_fused_tail(FUSED_TAILS.index(kind))
    return _C


FIRST_PASSES = ("chunked", "wide", "auto", "stream", "long")  # index = csrc/common.cuh kFirstPass*
CUT_SEARCHES = ("block", "split", "auto")  # index = csrc/common.cuh kCutSearch*
FUSED_TAILS = ("launches", "fused", "auto")  # index = csrc/common.cuh kTail*


def cuda_first_pass(kind: str | None = None) -> str:
    """The first pass over the vocabulary that the CUDA `sample_draft` and `verify_draft` launch, for the whole
    process: "auto" (the default: per launch, what measured fastest on an H200 with all four timed in one run:
    the stream pass for every `verify_draft` and for a `sample_draft` with at least as many stream blocks as
    the GPU has SMs, the chunked pass for smaller ones; csrc/common.cuh resolve_first_pass), "chunked"
    (RowChunkStatsKernel), "wide" (RowWideStatsKernel: 4x larger chunks, the statistics of greedy and BiLD rows
    per 16-byte vector) or "stream" (the statistics of z per vector at a higher occupancy, then the sampling
    rows' scaled statistics and Gumbel draw in a second kernel that skips the draws that cannot win) or "long"
    (the stream pass over chunks twice as long, each thread's 16-byte vectors taken eight at a time: opt-in until
    timed on a GPU; csrc/common.cuh RowLongStatsKernel). With
    `kind`, sets it and returns the previous one; without, returns the current one. `BILD_FIRST_PASS=<kind>`
    sets it when the extension loads. A CUDA graph keeps the kernel it captured. Raises RuntimeError where the
    extension was not built."""
    return _cuda_setting("cuda_first_pass", "first_pass", FIRST_PASSES, kind)


def _cuda_setting(fn: str, name: str, kinds: tuple, kind: str | None) -> str:
    """A process-wide choice of bild_kernels._C (its `<name>()` getter and `set_<name>(index)` setter): the current
    one, or set to `kind` returning the previous one."""
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError(f"{fn}: bild_kernels._C was not built (no nvcc or BILD_NO_CUDA=1 at install)")
    if kind is None:
        return kinds[getattr(ext, name)()]
    if kind not in kinds:
        raise ValueError(f"{fn}: kind must be one of {kinds}, got {kind!r}")
    return kinds[getattr(ext, f"set_{name}")(kinds.index(kind))]


@functools.lru_cache(None)
def cpu_extension():
    """The compiled CPU extension module when it was built and this CPU can run it (x86-64 with AVX2 and
    FMA), else None."""
    try:
        from bild_kernels import _cpu  # noqa: F401
    except ImportError:
        return None
    return _cpu if torch.ops.bild_kernels_cpu.cpu_linear_supported() else None


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch's probe: Intel Xeon 4th generation on)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@functools.lru_cache(None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register(op: str, backend: str, fn) -> None:
    _IMPLS.setdefault(op, {})[backend] = fn


def _usable(backend: str, device: torch.device) -> bool:
    if backend == "ref":
        return True
    if backend == "triton":
        return triton_available() and (device.type == "cuda" or triton_interpret())
    if backend == "cuda":
        return cuda_extension() is not None and device.type == "cuda"
    if backend == "cpu":
        return cpu_extension() is not None and device.type == "cpu"
    return False


def resolve(op: str, device: torch.device, backend: str | None) -> object:
    """The implementation of `op` for tensors on `device`; raises ValueError naming the problem."""
    _load_backends()
    impls = _IMPLS.get(op, {})
    if backend is None:
        forced = os.environ.get("BILD_BACKEND")
        if forced and forced not in BACKENDS:
            raise ValueError(f"BILD_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced and forced in impls:
            order = [forced]
        else:
            forced = None
            order = ["cuda", "triton", "ref"] if device.type == "cuda" else ["cpu", "triton", "ref"]
        for b in order:
            if b in impls and _usable(b, device):
                return impls[b]
        if forced:
            raise ValueError(f"BILD_BACKEND={forced!r} cannot run {op} on {device}")
        return impls["ref"]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda" and cuda_extension() is None:
        raise ValueError(f"backend 'cuda' cannot run {op}: bild_kernels._C was not built (no nvcc or CUDA torch "
                         "at install time, or BILD_NO_CUDA=1)")
    if backend == "cpu" and op in CPU_EXTENSION_OPS + CPU_WRAPPED_OPS and cpu_extension() is None:
        raise ValueError(f"backend 'cpu' cannot run {op}: the CPU extension bild_kernels._cpu was not built "
                         "(BILD_NO_CPU_EXT=1, a failed build, not x86-64) or this CPU lacks AVX2/FMA")
    if backend not in impls:
        raise ValueError(f"backend {backend!r} has no implementation of {op}")
    if not _usable(backend, device):
        why = {
            "cuda": "the CUDA extension is not built or the tensors are not on a CUDA device",
            "cpu": "the CPU extension bild_kernels._cpu is not built, this CPU lacks AVX2/FMA, or the tensors "
                   "are not on the CPU",
            "triton": "triton is missing, or the tensors are on the CPU without TRITON_INTERPRET=1",
        }[backend]
        raise ValueError(f"backend {backend!r} cannot run {op} on {device}: {why}")
    return impls[backend]


def registered(op: str, backend: str):
    """The implementation of `op` that `backend` registered, or None (the backend lacks the op, or its
    extension is not built here): to tell which backend `resolve` chose."""
    _load_backends()
    return _IMPLS.get(op, {}).get(backend)


@functools.lru_cache(None)
def _load_backends() -> None:
    # Importing a backend module registers its implementations.
    from bild_kernels.ops import _ref_impls  # noqa: F401
    if triton_available():
        from bild_kernels.ops import _triton_impls  # noqa: F401
    if cuda_extension() is not None:
        from bild_kernels.ops import _cuda_impls  # noqa: F401
    if cpu_extension() is not None:
        from bild_kernels.ops import _cpu_impls  # noqa: F401


def backends(device: str | torch.device = "cuda") -> dict[str, dict]:
    """For each op: the backends it has, which can run on `device`, and the default there (None, with the
    reason under "error", where BILD_BACKEND forces a backend that cannot run the op on `device`)."""
    _load_backends()
    device = torch.device(device)
    out = {}
    for op, impls in sorted(_IMPLS.items()):
        usable = [b for b in BACKENDS if b in impls and _usable(b, device)]
        try:
            default = resolve(op, device, None)
            name, error = next(b for b, f in impls.items() if f is default), None
        except ValueError as exc:  # BILD_BACKEND names a backend that cannot run this op here
            name, error = None, str(exc)
        out[op] = {"implemented": [b for b in BACKENDS if b in impls], "usable": usable, "default": name}
        if error is not None:
            out[op]["error"] = error
    return out


def cuda_cut_search(kind: str | None = None) -> str:
    """The top-k / top-p cut-off search that the CUDA `sample_draft` and `verify_draft` run, for the whole process:
    "auto" (the default: per launch, "split" for a sample_draft of at most 64 rows whose caller knows that some row
    filters, where an H100 ran it 1.7-3.4x faster than "block", else "block"; csrc/common.cuh use_cut_split), "block"
    (each row's whole search in one thread block, inside the op's row kernels: csrc/common.cuh filter_cut) or "split"
    (each of its at most five passes one
    launch over every chunk of every row that filters, the chunks' histograms summed in global memory and each pass
    settled by the row's last block: CutSplitPassKernel). Both find the same cut-off, pass for pass. With `kind`,
    sets it and returns the previous one; without, returns the current one. `BILD_CUT_SEARCH=<kind>` sets it when
    the extension loads. A CUDA graph keeps the kernels it captured. Raises RuntimeError where the extension was not
    built."""
    return _cuda_setting("cuda_cut_search", "cut_search", CUT_SEARCHES, kind)


def cuda_fused_tail(kind: str | None = None) -> str:
    """How the CUDA `sample_draft` and `verify_draft` end after their first pass over the vocabulary, for the whole
    process: "auto" (the default: "launches" until "fused" is timed on a GPU), "launches" (their row / position
    kernels after the first pass) or "fused" (inside the chunked, stream or long first pass, where the caller's `rows`
    hint allows: for `verify_draft` no row samples, for `sample_draft` no row samples or filters; the block that
    writes a row's last partial merges them and finishes the row, and for `verify_draft` the last position of a row
    to finish cuts it: csrc/common.cuh use_fused_tail, SampleFusedTail, VerifyFusedTail). With `kind`, sets it and
    returns the previous one; without, returns the current one. `BILD_FUSED_TAIL=<kind>` sets it when the extension
    loads. A CUDA graph keeps the kernels it captured. Raises RuntimeError where the extension was not built."""
    return _cuda_setting("cuda_fused_tail", "fused_tail", FUSED_TAILS, kind)

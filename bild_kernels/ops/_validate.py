"""Input checks shared by the public ops: a clear error naming the argument, before any launch."""
from __future__ import annotations

import contextlib
import contextvars

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)


def capturing() -> bool:
    """True inside CUDA-graph capture, where value checks (which read the device) must be skipped."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_TRUSTED = contextvars.ContextVar("bild_kernels_trusted_inputs", default=False)


@contextlib.contextmanager
def trusted_inputs():
    """Inside this context the ops skip their value checks (ids in range, thresholds >= 0, ...), each of which
    reads the device (a host synchronisation per check on a GPU); the shape, dtype and device checks stay.
    For callers whose inputs are valid by construction: the engine wraps its own steps in it, after it has
    checked every request at admission."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def skip_value_checks() -> bool:
    """Whether value checks are off here: during CUDA-graph capture, or inside `trusted_inputs()`."""
    return _TRUSTED.get() or capturing()


def tensor(name: str, t, *, dtypes=None, ndim: int | None = None, device: torch.device | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    """expected: a tuple of ints or None (any size)."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def per_row(name: str, value, B: int, dtype: torch.dtype, device: torch.device, default):
    """A per-row parameter given as None (default), a Python number, or a [B] tensor -> [B] tensor."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        shape(name, value, (B,))
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}")
        if value.dtype.is_floating_point != dtype.is_floating_point:
            kind = "a floating" if dtype.is_floating_point else "an integer"
            raise TypeError(f"{name} must have {kind} dtype, got {value.dtype}")
        return value.to(dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    return torch.full((B,), value, dtype=dtype, device=device)


def in_range(name: str, t: torch.Tensor, lo=None, hi=None, *, lo_open=False, hi_open=False) -> None:
    """Value-range check (skipped during CUDA-graph capture and inside `trusted_inputs()`: it reads the device)."""
    if t.numel() == 0 or skip_value_checks():
        return
    if t.dtype.is_floating_point and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")
    if lo is not None:
        bad = (t <= lo) if lo_open else (t < lo)
        if bool(bad.any()):
            raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {t[bad].flatten()[0].item()}")
    if hi is not None:
        bad = (t >= hi) if hi_open else (t > hi)
        if bool(bad.any()):
            raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {t[bad].flatten()[0].item()}")

"""The projections' products outside the fused CPU layer: int8 weights per output channel (`Int8Weight`) and their
packing as Q8_0 blocks for cpu_linear_q8_0x16, the small-M float32 kernel's rule (`_linear`), and which int8 kernel
serves a CPU and dtype."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bild_kernels.ops.cpu_linear import MAX_ROWS as CPU_LINEAR_MAX_ROWS


class Int8Weight(NamedTuple):
    """A [N, K] weight as int8 per output channel: w ~= q * scale[:, None] (symmetric, no zero point)."""
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N], in the activations' dtype

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int8Weight":
        wf = w.float()
        scale = (wf.abs().amax(1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.to(w.dtype).contiguous())

    def dequantize(self) -> torch.Tensor:
        return self.q.to(self.scale.dtype) * self.scale[:, None]


INT8_K_MULTIPLE = 16  # torch's CPU int8 weight kernel reads the input width in blocks of 16


def int8_x16(w: Int8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight [N, K] (N a multiple of 16, K of 32) as cpu_linear_q8_0x16's (packed, block_scale): Q8_0
    blocks whose scale is the row's (`reference.q8_0x16_pack`)."""
    from bild_kernels.reference import q8_0x16_pack
    N, K = w.q.shape
    return q8_0x16_pack(w.q, w.scale.float()[:, None].expand(N, K // 32).contiguous())


def _packed_linear(x, w, bias=None, *, packed, linear, activation_bits=16):
    """x @ w.T (+ bias) from w's Q8_0 blocks packed for cpu_linear_q8_0x16 (an Int8Weight's `int8_x16`, or a GGUF
    head's) when x is float32 [M, K] with M >= 1 (the packed kernel tiles any number of rows, as the fused layer's
    products do), else linear(x, w, bias)."""
    if x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] >= 1:
        return torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16(x.contiguous(), *packed, bias, activation_bits)
    return linear(x, w, bias)


_ACTIVATION_BITS = {"int16": 16, "int8": 8}


def _check_activations(activations: str) -> None:
    """use_q8_0_head / use_q4_1_layers: how their blocks multiply ("float32", or "int16" / "int8" activations)."""
    if activations not in ("float32", "int16", "int8"):
        raise ValueError(f"activations must be 'float32', 'int16' or 'int8', got {activations!r}")


def _linear(x, w, bias=None, native=None, int8_fp32=None):
    """x [M, K] @ w.T (+ bias). native: the CPU small-M kernel (LlamaExecutor._native_linear), used for
    float32 passes of up to CPU_LINEAR_MAX_ROWS (16) tokens (decode, verify, a batch's verify up to 16 tokens
    in all); larger ones (prefill, bigger batches) go to F.linear, which is faster there. int8_fp32:
    cpu_linear_int8's implementation, for Int8Weight with float32 activations."""
    if native is not None and 1 <= x.shape[0] <= CPU_LINEAR_MAX_ROWS and x.dim() == 2 \
            and x.dtype == torch.float32 and w.dtype == torch.float32 and w.is_contiguous():
        return native(x, w, bias)
    if not isinstance(w, Int8Weight):
        return F.linear(x, w, bias)
    if x.dtype == torch.float32:
        return int8_fp32(x, w.q, w.scale, bias)
    y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.q, w.scale)
    return y if bias is None else y + bias


def int8_activation_dtype() -> torch.dtype:
    """The activations' dtype that int8 weights run fastest with on this CPU: float32 where the CPU
    extension's cpu_linear_int8 runs, else bfloat16 (torch's int8 weight kernel)."""
    from bild_kernels._backend import cpu_extension
    return torch.float32 if cpu_extension() is not None else torch.bfloat16


def check_int8_kernel(device, dtype) -> None:
    """Fail early, naming the reason, where no int8 weight kernel serves the device and dtype (a CPU
    option: the one measured, and the one whose shape limits are known). float32 activations always have
    one (the CPU extension's, else its reference)."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"int8 weights are a CPU option; this model is on {device}")
    problem = _int8_kernel_problem(dtype)
    if problem:
        raise ValueError(f"int8 weights: {problem}")


@functools.cache
def _int8_kernel_problem(dtype) -> str | None:
    """Why torch's CPU int8 weight kernel cannot serve `dtype` activations, or None; probed once per dtype
    (the engine asks before loading and the executor again when it quantises)."""
    if dtype == torch.float32:
        return None
    w = Int8Weight.of(torch.linspace(-1, 1, 64 * 32, dtype=dtype).view(64, 32))
    x = torch.ones(2, 32, dtype=dtype)
    try:
        y = _linear(x, w)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return f"this torch cannot multiply {dtype} activations by int8 weights on cpu ({str(exc).splitlines()[0]})"
    if not torch.allclose(y.float(), F.linear(x, w.dequantize()).float(), rtol=2e-2, atol=2e-2):
        return f"torch's int8 kernel gives wrong results on cpu with {dtype}"
    return None

"""Host data to the device without waiting for it.

`torch.tensor(data, device="cuda")` builds the tensor on the host and copies it with a blocking copy, which
synchronises the stream: the host waits until every kernel queued before it has run. The engine builds a
few such tensors per step (positions, slot indices, sampling parameters), so each of them used to stall the
host behind the GPU's work, e.g. the sampling parameters behind the large model's replayed forward, leaving
the GPU idle while the host then queued the next kernels. A non-blocking copy from pageable host memory is
staged by the driver before the call returns (the source may be freed at once) and runs in stream order.
"""
from __future__ import annotations

import torch


def to_device(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(data, dtype=dtype) on `device`, queued on the current stream without a synchronisation."""
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)

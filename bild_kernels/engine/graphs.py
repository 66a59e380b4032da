"""CUDA-graph plumbing shared by the draft loop, the extend passes and BatchGenerator: the recorder, the batch-size
buckets, and a lagged "anything left to do?" flag that never makes the host wait."""
from __future__ import annotations

import gc
import warnings

import torch


class GraphRecorder:
    """CUDA graphs of one component's steps (the draft loop's, the extend passes', BatchGenerator's), recorded into
    one shared memory pool. `capture(step, what)` records `step()` after two warm-up runs on a side stream
    (allocator pools, Triton compilation, cuBLAS workspaces); the caller has made the step write nothing.

    A capture that fails warns and returns None: the caller then runs the step uncaptured (the same ops, only
    slower). Two things that made captures fail on a GPU are kept out: Python's cyclic garbage collector is off
    while a graph records (a collection inside the capture that frees an older engine's CUDA graph or memory
    makes CUDA calls that invalidate it), and a failed capture leaves its pool marked as recording in the
    caching allocator, so the graphs after it record into a fresh pool (else every later capture fails with
    "already recording to mempool_id")."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, step, what: str):
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    step()
            finally:
                if collecting:
                    gc.enable()
            return graph
        except Exception as exc:  # noqa: BLE001 — the uncaptured step is the same ops, only slower
            try:
                torch.cuda.synchronize(self.device)
            except Exception as fault:  # a device fault (illegal address, ...): no uncaptured step can run either;
                raise RuntimeError(f"{what} faulted on the device while warming up or recording its CUDA graph "
                                   f"(first error: {type(exc).__name__}: {exc})") from fault
            warnings.warn(f"CUDA-graph capture of {what} failed, running it without a graph: {type(exc).__name__}: "
                          f"{exc}", RuntimeWarning, stacklevel=3)
            self.pool = torch.cuda.graph_pool_handle()
            return None


def buckets(max_batch_size: int) -> list[int]:
    """Batch-size buckets: powers of two below max_batch_size, then max_batch_size."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


class LaggedFlag:
    """"Any row still drafting?" after each step, copied to pinned memory behind an event: read only
    once the event has completed, so the host never waits on the device inside a run."""

    def __init__(self, device: torch.device, steps: int):
        self.flags = torch.ones(steps, dtype=torch.bool, pin_memory=True)
        self.events: list[tuple[int, torch.cuda.Event]] = []
        self.device = device

    def record(self, step: int, any_active: torch.Tensor) -> None:
        self.flags[step].copy_(any_active, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.events.append((step, ev))

    def all_done(self) -> bool:
        while self.events and self.events[0][1].query():
            step, _ = self.events.pop(0)
            if not bool(self.flags[step]):
                return True
        return False

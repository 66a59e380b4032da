"""Paged attention over a ragged batch: per-step metadata, the PyTorch reference, and the dispatch.

One call covers prefill, one-token decode and multi-token extend: sequence b contributes
query_start_loc[b+1] - query_start_loc[b] new tokens (already written to the cache), and token t at
position positions[t] attends to that sequence's cached positions p' <= positions[t] (and
p' > positions[t] - window under a sliding window). Rows with no visible key (padding) give zeros.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

from bild_kernels import reference as R


@dataclasses.dataclass
class AttentionMetadata:
    """Per-step metadata of one batched forward (B sequences, T new tokens in all)."""

    query_start_loc: torch.Tensor  # [B+1] int32, cumulative new-token counts
    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token; -1 = padding (not written)
    block_tables: torch.Tensor  # [B, M] int32, each sequence's blocks in order
    context_lens: torch.Tensor  # [B] int32, tokens in the cache INCLUDING the new ones
    max_query_len: int  # max new tokens of one sequence: sizes the kernel grid, so it must not be short
    max_context_len: int | None = None  # optional hint; nothing relies on it

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: torch.Tensor,
              block_size: int) -> "AttentionMetadata":
        """From host lists, new tokens sitting at the end of each sequence (padding: query 1, context 0)."""
        dev = block_tables.device
        qsl, positions, slots = [0], [], []
        tables = block_tables.tolist()
        for b, (q, c) in enumerate(zip(query_lens, context_lens)):
            if q > c and c > 0:
                raise ValueError(f"sequence {b}: {q} new tokens but only {c} in context")
            qsl.append(qsl[-1] + q)
            for p in range(c - q, c):
                positions.append(max(p, 0))
                slots.append(tables[b][p // block_size] * block_size + p % block_size if p >= 0 else -1)
        return cls(query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
                   positions=torch.tensor(positions, dtype=torch.int64, device=dev),
                   slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
                   block_tables=block_tables.to(torch.int32),
                   context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
                   max_query_len=max(query_lens, default=0), max_context_len=max(context_lens, default=0))

    def validate(self, device: torch.device | None = None) -> None:
        """Shape, dtype and (given `device`) device checks; no device reads, so it is safe under CUDA-graph
        capture."""
        B, T = self.num_seqs, self.num_tokens
        if device is not None:
            for name in ("query_start_loc", "positions", "slot_mapping", "block_tables", "context_lens"):
                t = getattr(self, name)
                if isinstance(t, torch.Tensor) and t.device != torch.device(device):
                    raise ValueError(f"AttentionMetadata.{name} is on {t.device}, the model on {device}")
        for name, t, dtypes, shape in (("query_start_loc", self.query_start_loc, (torch.int32, torch.int64), (B + 1,)),
                                       ("positions", self.positions, (torch.int32, torch.int64), (T,)),
                                       ("slot_mapping", self.slot_mapping, (torch.int32, torch.int64), (T,)),
                                       ("context_lens", self.context_lens, (torch.int32,), (B,))):
            if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != shape:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"AttentionMetadata.{name} must be {[str(d) for d in dtypes]} of shape "
                                 f"{list(shape)}, got {got}")
        if self.block_tables.dtype != torch.int32 or self.block_tables.dim() != 2:
            raise ValueError(f"AttentionMetadata.block_tables must be int32 [B, M], got {self.block_tables.dtype} "
                             f"{list(self.block_tables.shape)}")
        if isinstance(self.max_query_len, bool) or not isinstance(self.max_query_len, int) or self.max_query_len < 0:
            raise ValueError(f"AttentionMetadata.max_query_len must be a non-negative int, got {self.max_query_len!r}")


def paged_attention_ref(query, key_cache, value_cache, query_start_loc, positions, block_tables, context_lens,
                        scale: float, sliding_window: int = 0):
    """Reference paged attention. query [T, Hq, D]; caches [num_blocks, block_size, Hkv, D]; -> [T, Hq, D].

    Math in float32 (float64 stays float64), as in `bild_kernels.reference`.
    """
    T, Hq, D = query.shape
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    if query.device.type == "cpu":
        return _paged_attention_cpu(query, key_cache, value_cache, query_start_loc, positions, block_tables,
                                    context_lens, scale, sliding_window, acc)
    return _paged_attention_gather(query, key_cache, value_cache, query_start_loc, positions, block_tables,
                                   context_lens, scale, sliding_window, acc)


def _paged_attention_gather(query, key_cache, value_cache, query_start_loc, positions, block_tables, context_lens,
                            scale, sliding_window, acc):
    """Dense gather of every row's cache, then masked softmax attention; no host reads (GPU-stream safe)."""
    T, Hq, D = query.shape
    Hkv = key_cache.shape[2]
    keys, values = R.gather_paged_kv_ref(key_cache, value_cache, block_tables, context_lens)  # [B, L, Hkv, D]
    L = keys.shape[1]
    # Each token's sequence, found without a host sync so the reference also runs on a GPU stream.
    seq = torch.searchsorted(query_start_loc[1:].long(), torch.arange(T, device=query.device), right=True)
    seq = seq.clamp(max=block_tables.shape[0] - 1)
    kpos = torch.arange(L, device=query.device)
    pos = positions.long()[:, None]
    visible = (kpos[None, :] <= pos) & (kpos[None, :] < context_lens.long()[seq][:, None])  # [T, L]
    if sliding_window > 0:
        visible &= kpos[None, :] > pos - sliding_window
    out = torch.zeros(T, Hq, D, dtype=acc, device=query.device)
    q = query.to(acc).view(T, Hkv, Hq // Hkv, D)
    # One sequence at a time keeps memory at O(tokens x context) instead of O(tokens x batch x context).
    for b in range(block_tables.shape[0]):
        rows = (seq == b).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        k, v = keys[b].to(acc), values[b].to(acc)  # [L, Hkv, D]
        scores = torch.einsum("thgd,lhd->thgl", q[rows], k) * scale
        scores = scores.masked_fill(~visible[rows][:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key gives zeros
        out[rows] = torch.einsum("thgl,lhd->thgd", probs, v).reshape(-1, Hq, D)
    return out.to(query.dtype)


def _paged_attention_cpu(query, key_cache, value_cache, query_start_loc, positions, block_tables, context_lens,
                         scale, sliding_window, acc):
    """The same attention on CPU tensors, where reading lengths on the host is free: each sequence's blocks
    are indexed directly (no padded gather of the batch) and fed to PyTorch's fused SDPA."""
    plan = CpuAttentionPlan(query_start_loc, positions, block_tables, context_lens, key_cache.shape[1])
    return plan.attend(query, key_cache, value_cache, scale, sliding_window, acc)


class CpuAttentionPlan:
    """What the CPU reference attention derives from the step's metadata alone (each sequence's query rows,
    cache blocks and visibility mask), read on the host once per forward and shared by every layer."""

    def __init__(self, query_start_loc, positions, block_tables, context_lens, block_size: int):
        qsl, lens = query_start_loc.tolist(), context_lens.tolist()
        self.seqs = []  # (first row, end row, context length, block ids, positions)
        for b in range(block_tables.shape[0]):
            s, e, L = qsl[b], qsl[b + 1], lens[b]
            if e > s and L > 0:
                self.seqs.append((s, e, L, block_tables[b, :-(-L // block_size)].long(), positions[s:e].long()))
        # (sliding window, dtype) -> per sequence: (additive mask, or None when every key is visible;
        # rows seeing no key, or None when there are none)
        self._masks = {}

    @classmethod
    def of(cls, meta: AttentionMetadata, block_size: int) -> "CpuAttentionPlan":
        return cls(meta.query_start_loc, meta.positions, meta.block_tables, meta.context_lens, block_size)

    def _masks_for(self, window: int, dtype: torch.dtype):
        if (window, dtype) not in self._masks:
            masks = []
            for _, _, L, _, pos in self.seqs:
                kpos = torch.arange(L)
                visible = kpos[None, :] <= pos[:, None]
                if window > 0:
                    visible &= kpos[None, :] > pos[:, None] - window
                if bool(visible.all()):
                    masks.append((None, None))
                else:  # an additive mask (SDPA takes it as is; a bool one it converts in every layer)
                    blind = ~visible.any(1)
                    add = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
                    masks.append((add, blind if bool(blind.any()) else None))
            self._masks[(window, dtype)] = masks
        return self._masks[(window, dtype)]

    def attend(self, query, key_cache, value_cache, scale: float, sliding_window: int = 0, acc=None):
        """query [T, Hq, D] over caches [num_blocks, block_size, Hkv, D] -> [T, Hq, D] (math in `acc`:
        float32, or float64 for float64 inputs; rows with no visible key give zeros)."""
        T, Hq, D = query.shape
        Hkv = key_cache.shape[2]
        acc = acc or (torch.float64 if query.dtype == torch.float64 else torch.float32)
        parts = []
        for (s, e, L, blocks, _), (mask, blind) in zip(self.seqs, self._masks_for(int(sliding_window), acc)):
            # index_select, not key_cache[blocks]: the same copy without advanced indexing's overhead (~6x)
            k = key_cache.index_select(0, blocks).view(-1, Hkv, D)[:L].to(acc).transpose(0, 1)  # [Hkv, L, D]
            v = value_cache.index_select(0, blocks).view(-1, Hkv, D)[:L].to(acc).transpose(0, 1)
            q = query[s:e].to(acc).transpose(0, 1)  # [Hq, t, D]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
            if blind is not None:  # a query that sees no key gets zeros, as in the reference
                o = o.masked_fill(blind[None, :, None], 0.0)
            parts.append((s, e, o.transpose(0, 1)))
        if len(parts) == 1 and parts[0][:2] == (0, T):  # one sequence owns every row (batch-1 decode)
            return parts[0][2].to(query.dtype)
        out = torch.zeros(T, Hq, D, dtype=acc)
        for s, e, o in parts:
            out[s:e] = o
        return out.to(query.dtype)


def cpu_attention_kernel():
    """bild_kernels._cpu's paged attention, or a ValueError saying why it cannot run here."""
    from bild_kernels._backend import _load_backends, cpu_extension
    if cpu_extension() is None:
        raise ValueError("paged_attention: backend 'cpu' needs the CPU extension bild_kernels._cpu (not built, or "
                         "this CPU lacks AVX2/FMA)")
    _load_backends()  # its fake implementation (torch.compile) registers with the extension's other ops
    return torch.ops.bild_kernels_cpu.paged_attention


@functools.cache
def _triton_launcher():
    """The Triton kernel, guarded under the interpreter like the ops (built once: this is a per-layer call)."""
    from bild_kernels.ops._triton_impls import interpreter_guard
    from bild_kernels.triton.attention import paged_attention_triton
    return interpreter_guard("paged_attention", paged_attention_triton,
                             lambda q, kc, vc, qsl, pos, bt, cl, sc, win, _mq: paged_attention_ref(
                                 q, kc, vc, qsl, pos, bt, cl, sc, win))


def default_attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """"cpu" (bild_kernels._cpu's kernel) for float32 on a CPU that runs it, else "triton" on CUDA or under
    TRITON_INTERPRET=1, else "ref" (always for float64); BILD_BACKEND=triton|ref|cpu forces one where it can run."""
    forced = os.environ.get("BILD_BACKEND")
    if forced in ("triton", "ref"):
        return forced
    from bild_kernels._backend import cpu_extension, triton_available, triton_interpret
    if device.type == "cpu" and dtype == torch.float32 and cpu_extension() is not None:
        return "cpu"
    if dtype == torch.float64 or not triton_available():
        return "ref"
    return "triton" if device.type == "cuda" or triton_interpret() else "ref"


def paged_attention(query, key_cache, value_cache, meta: AttentionMetadata, *, scale: float,
                    sliding_window: int | None = None, backend: str | None = None):
    """Attention of the new tokens over the paged cache. query [T, Hq, D] -> [T, Hq, D].

    backend: "triton" (the GPU kernel, or the interpreter on the CPU), "cpu" (bild_kernels._cpu: float32 CPU
    tensors, keys and values read in place), "ref", or None for the default (`default_attention_backend`).
    """
    window = int(sliding_window or 0)
    backend = backend or default_attention_backend(query.device, query.dtype)
    if backend == "ref":
        return paged_attention_ref(query, key_cache, value_cache, meta.query_start_loc, meta.positions,
                                   meta.block_tables, meta.context_lens, scale, window)
    if backend == "cpu":
        if query.device.type != "cpu" or query.dtype != torch.float32:
            raise ValueError(f"paged_attention: backend 'cpu' takes float32 CPU tensors, got {query.dtype} on "
                             f"{query.device}")
        return cpu_attention_kernel()(query.contiguous(), key_cache, value_cache, meta.query_start_loc,
                                      meta.positions, meta.block_tables, meta.context_lens, float(scale), window)
    if backend != "triton":
        raise ValueError(f"paged_attention: backend must be 'triton', 'cpu' or 'ref', got {backend!r}")
    return _triton_launcher()(query, key_cache, value_cache, meta.query_start_loc, meta.positions,
                                  meta.block_tables, meta.context_lens, scale, window, meta.max_query_len)

"""Block allocator for the paged KV cache, over the device-side state the paged KV ops work on.

State (all int32, on `device`, mutated only through `bild_kernels.ops`):
  free_blocks  [N]                          stack of free block ids; its first num_free[0] are free
  num_free     [1]                          stack height
  block_tables [num_caches, max_seqs, M]    each row's blocks in order, then -1
  context_lens [num_caches, max_seqs]       tokens held per row, -1 for an inactive row

One pool, several caches: the large and the small model share one memory budget, so one manager serves
`num_caches` logical caches (cache 0 = large model, 1 = small model, say) from one free stack. Each
cache has its own table and lengths (`tables(cache)` gives contiguous views to hand to kernels), and a
block id means the same page of the pool in every cache. The engine sizes a page as the larger of the
two models' per-block footprints (all layers, K and V) and views the pool bytes as each model's
[N, block_size, H, D] caches. Block ids are never shared between caches, so no page is owned twice.

The manager keeps a host mirror of the context lengths (the engine needs them to build positions).
Only `append` and the read-outs synchronise with the host (an append must know whether it was served);
`rollback(None, counts_tensor)` is device-only and can run inside a CUDA graph; it marks the mirror
stale, and the next read of it refreshes it from the device.
"""
from __future__ import annotations

import torch

from bild_kernels import ops
from bild_kernels.engine.host import to_device

_NO_LIMIT = 2**31 - 1  # a rollback count that empties any row


class KVCacheExhausted(ValueError):
    """The pool has too few free blocks for a reservation; nothing was allocated."""

    def __init__(self, missing: int):
        super().__init__(f"KV cache exhausted: {missing} more free block(s) needed")
        self.missing = missing


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, max_blocks_per_seq: int, *,
                 num_caches: int = 1, device: str | torch.device = "cpu", backend: str | None = None):
        for name, val in (("num_blocks", num_blocks), ("block_size", block_size), ("max_seqs", max_seqs),
                          ("max_blocks_per_seq", max_blocks_per_seq), ("num_caches", num_caches)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.num_blocks, self.block_size, self.max_seqs = num_blocks, block_size, max_seqs
        self.max_blocks_per_seq, self.num_caches = max_blocks_per_seq, num_caches
        self.device, self.backend = torch.device(device), backend
        i32 = dict(dtype=torch.int32, device=self.device)
        # Reversed so that a fresh pool hands out blocks 0, 1, 2, ... (pops come off the top).
        self.free_blocks = torch.arange(num_blocks - 1, -1, -1, **i32)
        self.num_free = torch.tensor([num_blocks], **i32)
        self.block_tables = torch.full((num_caches, max_seqs, max_blocks_per_seq), -1, **i32)
        self.context_lens = torch.full((num_caches, max_seqs), -1, **i32)
        self._lens = [[-1] * max_seqs for _ in range(num_caches)]  # host mirror of context_lens
        self._stale = [False] * num_caches  # a device-only rollback ran since the mirror was last read
        self.host_slots = self.device.type == "cpu"  # `append` computes slot mappings from host ints
        # CPU tables as NumPy views of the same memory: `append` reads a few entries and bumps a length through
        # them for ~1 us instead of a tensor slice, .tolist() and a Python-scalar setitem (~40 us a call). The ops
        # write the tensors in place, so the views always see the current state.
        self._np = ((self.block_tables.numpy(), self.context_lens.numpy()) if self.host_slots else None)

    # -- state views --------------------------------------------------------------------------------
    def tables(self, cache: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_tables [max_seqs, M], context_lens [max_seqs]) of one cache: contiguous views."""
        self._cache(cache)
        return self.block_tables[cache], self.context_lens[cache]

    def num_free_blocks(self) -> int:
        return int(self.num_free[0])

    def context_lens_of(self, rows, cache: int = 0) -> list[int]:
        """Tokens held by each of `rows` (-1: inactive), from the host mirror."""
        return [self._mirror(cache)[r] for r in rows]

    def block_tables_of(self, rows, cache: int = 0) -> torch.Tensor:
        """The block tables of `rows`, int32 [len(rows), max_blocks_per_seq], on the device (for one row of CPU
        tables: a view of the live table, read before the next append or rollback changes it)."""
        rows = list(rows)
        if self.host_slots and len(rows) == 1 and 0 <= rows[0] < self.max_seqs:
            return self.tables(cache)[0][rows[0]:rows[0] + 1]
        idx = to_device(rows, torch.long, self.device)
        return self.tables(cache)[0].index_select(0, idx)

    def slots_of(self, row: int, start: int, end: int, cache: int = 0) -> torch.Tensor:
        """The slots (int64 [end - start], on the device) holding positions start .. end - 1 of `row`, which must
        hold them."""
        self._row(row, cache, active=True)
        if not 0 <= start <= end <= self._mirror(cache)[row]:
            raise ValueError(f"positions [{start}, {end}) outside the {self._mirror(cache)[row]} row {row} holds")
        bs = self.block_size
        if self.host_slots:
            bt = self._np[0][cache][row]
            return to_device([int(bt[p // bs]) * bs + p % bs for p in range(start, end)], torch.int64, self.device)
        pos = torch.arange(start, end, device=self.device)
        return self.block_tables[cache, row].long()[pos // bs] * bs + pos % bs

    def blocks_held(self, rows, cache: int = 0) -> list[int]:
        """Blocks each of `rows` holds (an inactive row: 0): counted in host tables (a rollback that kept its emptied
        blocks), else those its context length fills (every rollback there returns the blocks it empties)."""
        if self.host_slots:
            bt = self._np[0][cache]
            return [int((bt[r] >= 0).sum()) for r in rows]
        return [-(-max(n, 0) // self.block_size) for n in self.context_lens_of(rows, cache)]

    def active_rows(self, cache: int = 0) -> list[int]:
        return [r for r, n in enumerate(self._mirror(cache)) if n >= 0]

    # -- lifecycle ----------------------------------------------------------------------------------
    def allocate(self, row: int, cache: int = 0) -> None:
        """Start an empty sequence in `row` (blocks are reserved by `append`)."""
        self._row(row, cache, active=False)
        self.context_lens[cache, row].fill_(0)  # not `= 0`: a Python scalar's setitem is a blocking H2D copy
        self._lens[cache][row] = 0

    def append(self, rows, num_new, cache: int = 0) -> torch.Tensor:
        """Reserve room for num_new[i] more tokens in rows[i] and advance their context lengths.

        Returns the slot_mapping (int64 [sum(num_new)], rows in the given order) of the new tokens, for
        `write_paged_kv`. Raises KVCacheExhausted, with the state unchanged, if the pool runs short.
        """
        rows = [rows] if isinstance(rows, int) else [int(r) for r in rows]
        counts = [num_new] * len(rows) if isinstance(num_new, int) else [int(n) for n in num_new]
        if len(counts) != len(rows):
            raise ValueError(f"num_new has {len(counts)} entries for {len(rows)} rows")
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows must be distinct, got {rows}")
        for r, n in zip(rows, counts):
            self._row(r, cache, active=True)
            if n < 0:
                raise ValueError(f"num_new must be >= 0, got {n} for row {r}")
        if self.host_slots:  # CPU tables: when every new token lands in a block its row holds, nothing to reserve
            lens = [self._lens[cache][r] for r in rows]
            held = self._blocks_host(cache, lens, rows, counts)
            if all(b >= 0 for blks in held for b in blks):
                cl_np = self._np[1][cache]
                for r, n in zip(rows, counts):
                    cl_np[r] += n
                    self._lens[cache][r] += n
                return self._slots_of(held, lens, counts)
        bt, cl = self.tables(cache)
        idx = to_device(rows, torch.long, self.device)
        cnt = to_device(counts, torch.int32, self.device)
        per_row = torch.zeros(self.max_seqs, dtype=torch.int32, device=self.device).index_copy_(0, idx, cnt)
        top = self.num_free.clone()
        ops.reserve_paged_kv(bt, cl, per_row, self.free_blocks, self.num_free, self.block_size,
                             backend=self.backend)
        left = int(self.num_free[0])
        if left < 0:  # the op only wrote num_free; restoring it restores everything
            self.num_free.copy_(top)
            raise KVCacheExhausted(-1 - left)
        if self.host_slots:  # the tables are host memory: read the few entries needed directly
            slots = self._slots_host(cache, [self._lens[cache][r] for r in rows], rows, counts)
        else:
            slots = self._slots(bt, cl, idx, cnt, sum(counts))
        cl += per_row
        for r, n in zip(rows, counts):
            self._lens[cache][r] += n
        return slots

    def rollback(self, rows, num_rejected, cache: int = 0, *, keep_blocks: bool = False) -> None:
        """Drop the last num_rejected[i] tokens of rows[i] (clamped at 0 tokens); emptied blocks go back.

        rows=None: num_rejected is an int32 tensor [max_seqs] on the device, one count per row (inactive
        rows ignored) — no host read, so it can sit in a CUDA graph beside the verifier that produced it.
        keep_blocks: where the tables are host memory (a CPU engine), only the lengths shrink and emptied blocks
        stay the row's, for its next `append` to fill (a pass's rejected drafts, a draft run's chained
        positions: the next pass appends as many again; without it a run that crosses a block boundary
        returned that block and reserved it again every pass, ~0.1 ms each way). `free` and any later
        rollback that returns blocks return them too; elsewhere it is a plain rollback.
        """
        bt, cl = self.tables(cache)
        if rows is None:
            counts = num_rejected
            self._stale[cache] = True
        else:
            rows, num = [int(r) for r in rows], [int(n) for n in num_rejected]
            if len(num) != len(rows) or len(set(rows)) != len(rows):
                raise ValueError(f"rows must be distinct and match num_rejected, got {rows} and {num}")
            for r, n in zip(rows, num):
                self._row(r, cache, active=True)
                if n < 0:
                    raise ValueError(f"num_rejected must be >= 0, got {n} for row {r}")
            if self.host_slots and not self._stale[cache]:  # CPU tables: a rollback that empties no block
                lens, bs = self._lens[cache], self.block_size  # only shortens the rows (as append only lengthens)
                new = [max(lens[r] - n, 0) for r, n in zip(rows, num)]
                if keep_blocks or all(-(-m // bs) == -(-lens[r] // bs) for r, m in zip(rows, new)):
                    cl_np = self._np[1][cache]
                    for r, m in zip(rows, new):
                        cl_np[r] = lens[r] = m
                    return
            counts = torch.zeros(self.max_seqs, dtype=torch.int32, device=self.device)
            counts[to_device(rows, torch.long, self.device)] = to_device(num, torch.int32, self.device)
        ops.rollback_paged_kv(bt, cl, counts, self.free_blocks, self.num_free, self.block_size, backend=self.backend)
        if rows is not None and not self._stale[cache]:
            for r, n in zip(rows, num):
                self._lens[cache][r] = max(self._lens[cache][r] - n, 0)

    def free(self, row: int, cache: int = 0) -> None:
        """End the sequence in `row`: all its blocks return to the pool and the row becomes inactive."""
        self._row(row, cache, active=True)
        bt, cl = self.tables(cache)
        everything = torch.zeros(self.max_seqs, dtype=torch.int32, device=self.device)
        everything[row].fill_(_NO_LIMIT)
        with ops.trusted_inputs():  # the manager's own state, valid by construction: no device reads in the checks
            ops.rollback_paged_kv(bt, cl, everything, self.free_blocks, self.num_free, self.block_size,
                                  backend=self.backend)
        cl[row].fill_(-1)
        self._lens[cache][row] = -1

    # -- checks -------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is owned by exactly one active row or is free, once.

        Reads the whole state to the host: a test and debugging aid, not for the serving loop.
        """
        nf = int(self.num_free[0])
        if not 0 <= nf <= self.num_blocks:
            raise AssertionError(f"num_free = {nf} outside [0, {self.num_blocks}]")
        owner: dict[int, str] = {}

        def claim(blk: int, who: str) -> None:
            if not 0 <= blk < self.num_blocks:
                raise AssertionError(f"{who} holds block id {blk} outside [0, {self.num_blocks})")
            if blk in owner:
                raise AssertionError(f"block {blk} owned by both {owner[blk]} and {who}")
            owner[blk] = who

        for blk in self.free_blocks[:nf].tolist():
            claim(blk, "the free stack")
        tables, lens = self.block_tables.cpu(), self.context_lens.cpu()
        for c in range(self.num_caches):
            for r in range(self.max_seqs):
                row, n = tables[c, r], int(lens[c, r])
                held = int((row >= 0).sum())
                if bool((row[held:] >= 0).any()) or bool((row[:held] < 0).any()):
                    raise AssertionError(f"cache {c} row {r}: blocks not packed at the front: {row.tolist()}")
                if n != self._mirror(c)[r]:
                    raise AssertionError(f"cache {c} row {r}: context_len {n}, host mirror {self._mirror(c)[r]}")
                if n < 0 and held:
                    raise AssertionError(f"cache {c} row {r} is inactive but holds {held} blocks")
                if held * self.block_size < n:
                    raise AssertionError(f"cache {c} row {r}: {n} tokens in {held} blocks of {self.block_size}")
                for blk in row[:held].tolist():
                    claim(blk, f"cache {c} row {r}")
        if len(owner) != self.num_blocks:
            lost = sorted(set(range(self.num_blocks)) - set(owner))
            raise AssertionError(f"{len(lost)} block(s) lost (neither free nor owned): {lost[:10]}")

    # -- helpers ------------------------------------------------------------------------------------
    def _cache(self, cache: int) -> int:
        if isinstance(cache, bool) or not isinstance(cache, int) or not 0 <= cache < self.num_caches:
            raise ValueError(f"cache must be an int in [0, {self.num_caches}), got {cache!r}")
        return cache

    def _row(self, row: int, cache: int, *, active: bool) -> None:
        self._cache(cache)
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.max_seqs:
            raise ValueError(f"row must be an int in [0, {self.max_seqs}), got {row!r}")
        if (self._mirror(cache)[row] >= 0) != active:
            raise ValueError(f"row {row} of cache {cache} is {'not ' if active else ''}active")

    def _mirror(self, cache: int) -> list[int]:
        if self._stale[self._cache(cache)]:
            self._lens[cache] = self.context_lens[cache].tolist()
            self._stale[cache] = False
        return self._lens[cache]

    def _blocks_host(self, cache: int, lens: list[int], rows: list[int], counts: list[int]) -> list[list[int]]:
        """For each row, the table entries of the blocks its next counts[i] tokens land in (-1: not held); CPU
        tables only (read through their NumPy views)."""
        bs, bt = self.block_size, self._np[0][cache]
        return [bt[r, L // bs:(L + n - 1) // bs + 1].tolist() if n else [] for r, L, n in zip(rows, lens, counts)]

    def _slots_of(self, held: list[list[int]], lens: list[int], counts: list[int]) -> torch.Tensor:
        bs, out = self.block_size, []
        for blks, L, n in zip(held, lens, counts):
            first = L // bs
            out += [blks[p // bs - first] * bs + p % bs for p in range(L, L + n)]
        return to_device(out, torch.int64, self.device)

    def _slots_host(self, cache: int, lens: list[int], rows: list[int], counts: list[int]) -> torch.Tensor:
        """`_slots` for CPU tables, from host ints: ~10x cheaper than its dozen tensor ops at batch 1."""
        return self._slots_of(self._blocks_host(cache, lens, rows, counts), lens, counts)

    def _slots(self, bt, cl, idx, cnt, total: int) -> torch.Tensor:
        # Token i of the appended run of row idx[k] sits at position context_lens[row] + i.
        which = torch.repeat_interleave(torch.arange(len(cnt), device=self.device), cnt.long(), output_size=total)
        start = torch.cumsum(cnt.long(), 0) - cnt.long()
        pos = cl[idx].long()[which] + torch.arange(total, device=self.device) - start[which]
        blk = bt[idx[which], pos // self.block_size].long()
        return blk * self.block_size + pos % self.block_size

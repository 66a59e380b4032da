"""The small model's draft run on fixed buffers: what a CUDA graph replays.

`Engine._draft` (the eager loop) shrinks its batch as rows stop drafting and reads every step's result
on the host. That is cheapest on a CPU and impossible inside a CUDA graph. `StaticDraftLoop` runs the
same draft run the way a graph needs it:

  step 0   the small model's ragged catch-up extend (a row's uncached committed tokens), eager, then
           `_update` on its logits padded to the batch-size bucket;
  step j   one *decode step* per bucket row: feed the row's last drafted token, write its K/V (slot -1
           for rows that stopped and padding, so they write nothing and attend to nothing), sample, and
           update every row's state on the device — no host read anywhere in the step.

Every tensor a step touches lives in a per-bucket `_Buffers` (batch-size buckets 1, 2, 4, ...,
max_batch_size), so `capture=True` records the decode step once per bucket as a CUDA graph and replays
it; `capture=False` runs the identical ops eagerly (CPU tests, debugging a graph on a GPU). Each step writes
its results into row `step` of per-bucket [MAX_STEPS, B] buffers (a device-side index the step advances), so
nothing runs between two replays but the stop flag below; the host reads them once, at the end.

Without host reads the loop cannot see at once that every row has stopped. On a GPU it never waits for
that: after each step it copies "any row still active" into pinned memory behind an event, and stops
enqueuing steps as soon as a completed event shows none (a lag of a step or two, never a stall); on a
CPU the flag is read directly. The KV blocks of a whole run (each row's cap) are reserved before the
first decode step and what the row did not use is rolled back after the run. Random numbers come from
the device seed and offset tensors (the offset advances in the graph), so a row draws exactly what the
eager loop draws for it: both loops give the same drafts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from bild_kernels import ops
from bild_kernels.engine.graphs import GraphRecorder, LaggedFlag, buckets
from bild_kernels.engine.policies import MAX_DRAFT_LEN as MAX_STEPS  # a run's steps: step 0, then one a draft
from bild_kernels.models import AttentionMetadata

# Set by a test on a GPU: the decode steps of a run then go under torch.cuda.set_sync_debug_mode("error"), so any
# host synchronisation between the run's set-up and its one host read raises.
SYNC_CHECK = False


@contextlib.contextmanager
def _no_host_sync(device: torch.device):
    if not (SYNC_CHECK and device.type == "cuda"):
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)



@dataclass
class DraftRun:
    """One draft run's result, per row of the running batch given to `StaticDraftLoop.run`."""

    tokens: list[list[int]]  # accepted drafts
    fed: list[int]  # decode steps the row took part in (tokens it wrote to the small cache after step 0)
    fell: list[bool]  # the row ended its run by a fallback
    unsure: list[tuple[int, float] | None]  # the discarded token and its max p_S, for rows that fell back
    confidences: list[list[float]]  # max p_S of each accepted draft
    probs: list[list[torch.Tensor]] | None  # the [V] distributions of each accepted draft (speculative sampling)


@dataclass
class _Buffers:
    """Every tensor of one bucket's decode step: inputs, state updated in place, per-step outputs (the sampled
    distributions of speculative sampling in out_probs, copied out after each step: [B, V] a step is too much to
    keep MAX_STEPS of)."""

    size: int
    with_probs: bool
    device: torch.device
    max_blocks: int
    vocab: int
    features: tuple | None = None  # a feature draft's (hidden size, dtype): each row's fed-back feature
    # every row greedy and unfiltered (temperature 0, no top-k / top-p), as the sampling op is told: its kernels for
    # sampling and filtering rows are left out of the step (and of its graph); else the op serves any rows
    greedy: bool = False
    # rows with penalties (SamplingParams' logit bias, penalties, min_tokens): the widths (L, E, E') of the buffers of
    # their histories (committed tokens, then the run's drafts, appended in the step), banned ids and logit bias,
    # which the step applies to the logits before sampling (`ops.apply_penalties`, as the eager loop does); None: none
    penalties: tuple[int, int, int] | None = None
    graph: object = None
    t: dict = field(default_factory=dict)
    # Step 0's update (sampling the catch-up's logits) as a graph of its own, on a fixed logits buffer [B, V]:
    # recorded at the bucket's first run (when the logits' dtype and width are known); None after a failed try.
    update_graph: object = None
    update_tried: bool = False
    logits0: torch.Tensor | None = None

    # The per-row state a run sets up, one [len(names), B] tensor per dtype ("arenas"): t[name] is a row of it. The
    # arenas are typed views of one byte buffer, in this order, the int32 one last with the step outputs after its
    # named rows: a run's set-up is one host-to-device copy of the bytes before those (`StaticDraftLoop.run`), and its
    # results one copy of the int32 arena back (`_results`).
    ARENAS = {torch.int64: ("pos", "seed", "offset", "tok", "step"),
              torch.float32: ("temperature", "top_p", "min_p", "threshold"),
              torch.bool: ("energy", "active", "nonfinite"), torch.int32: ("cap", "top_k", "ndraft", "fed")}
    # Each step's outputs, row `step` of [MAX_STEPS, B] each (written inside the step, so a graphed run needs no copy
    # of them between replays), held in the int32 arena after its named rows (the token as int32, the two flags as
    # 0 / 1, the confidence as float32 bits): with "fed" they are all a run reads back, in one copy (`_results`).
    HIST = ("hist_token", "hist_accepted", "hist_fell", "hist_conf")

    def __post_init__(self):
        B, dev = self.size, self.device
        i32, b = dict(dtype=torch.int32, device=dev), dict(dtype=torch.bool, device=dev)
        rows = {dtype: len(names) + (len(self.HIST) * MAX_STEPS if dtype == torch.int32 else 0)
                for dtype, names in self.ARENAS.items()}
        self.offsets, at = {}, 0  # each arena's first byte (8-byte aligned)
        for dtype in self.ARENAS:
            self.offsets[dtype] = at
            at += -(-rows[dtype] * B * dtype.itemsize // 8) * 8
        self.arena_bytes = torch.zeros(at, dtype=torch.uint8, device=dev)
        self.arenas = {dtype: self.arena_bytes[at:at + rows[dtype] * B * dtype.itemsize].view(dtype)
                       .view(rows[dtype], B) for dtype, at in self.offsets.items()}
        # the set-up's bytes: every arena's named rows, up to the int32 arena's step outputs
        self.setup_bytes = self.offsets[torch.int32] + len(self.ARENAS[torch.int32]) * B * 4
        self.t = {name: self.arenas[dtype][i] for dtype, names in self.ARENAS.items() for i, name in enumerate(names)}
        self.t["step"] = self.t["step"][:1]  # the step index: [1] (its row's other entries unused)
        for name in self.HIST:
            first = self.hist_row(name)
            self.t[name] = self.arenas[torch.int32][first:first + MAX_STEPS]
        self.t["hist_conf"] = self.t["hist_conf"].view(torch.float32)
        self.t.update(
            block_tables=torch.full((B, self.max_blocks), -1, **i32), query_start_loc=torch.arange(B + 1, **i32),
            any_active=torch.zeros((), **b))
        if self.with_probs:
            self.t["out_probs"] = torch.zeros(B, self.vocab, dtype=torch.float32, device=dev)
        if self.features is not None:
            self.t["feat"] = torch.zeros(B, self.features[0], dtype=self.features[1], device=dev)
        if self.penalties is not None:
            L, E, E2 = self.penalties
            i64, f64 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.float64, device=dev)
            self.t.update(pen_ids=torch.full((B, L), -1, **i64), pen_len=torch.zeros(B, **i64),
                          pen_ints=torch.zeros(2, B, dtype=torch.int32, device=dev),  # prompt lengths, min_tokens
                          pen_values=torch.zeros(3, B, **f64), pen_banned=torch.full((B, E), -1, **i64),
                          pen_bias_ids=torch.full((B, E2), -1, **i64), pen_bias_values=torch.zeros(B, E2, **f64))

    @classmethod
    def hist_row(cls, name: str) -> int:
        """The int32 arena's first row of step output `name` (one of HIST)."""
        return len(cls.ARENAS[torch.int32]) + cls.HIST.index(name) * MAX_STEPS


class StaticDraftLoop:
    """Draft runs of one small-model runner on fixed per-bucket buffers, optionally as CUDA graphs."""

    def __init__(self, runner, max_batch_size: int, *, capture: bool):
        if capture and runner.device.type != "cuda":
            raise ValueError("CUDA-graph draft runs need a CUDA device")
        self.runner, self.capture = runner, capture
        self.buckets = buckets(max_batch_size)
        self._buffers: dict[tuple[int, bool], _Buffers] = {}
        self._graphs = GraphRecorder(runner.device) if capture else None

    # -- the step ---------------------------------------------------------------------------------
    def _update(self, t: dict, logits: torch.Tensor, greedy: bool = False) -> None:
        """Sample each active row's next draft from logits [B, V] and advance the row state in place. greedy: every
        row is greedy and unfiltered (the buffers' class), which the sampling op is told."""
        bad = ~torch.isfinite(logits.amax(-1))  # a NaN/inf row: zeroed here, its request ended after the step
        t["nonfinite"] |= bad & t["active"]
        logits = logits.masked_fill(bad[:, None], 0.0)
        if "pen_ids" in t:  # the penalised distribution (each row's drafts so far count as its output)
            ints, values = t["pen_ints"], t["pen_values"]
            logits = ops.apply_penalties(
                logits[:, None], t["pen_ids"], ints[0], repetition_penalty=values[0], presence_penalty=values[1],
                frequency_penalty=values[2], min_tokens=ints[1], banned_ids=t["pen_banned"],
                bias_ids=t["pen_bias_ids"], bias_values=t["pen_bias_values"])[:, 0]
        thr, energy = t["threshold"], t["energy"]
        # (greedy: the promise holds by construction, the run's values having chosen the buffers: not checked, which
        # would read the device)
        with ops.trusted_inputs() if greedy else contextlib.nullcontext():
            res = ops.sample_draft(logits, temperature=t["temperature"], top_k=t["top_k"], top_p=t["top_p"],
                                   min_p=t["min_p"], seed=t["seed"], offset=t["offset"],
                                   fallback_threshold=torch.where(energy, torch.zeros_like(thr), thr),
                                   **(dict(sampled=False, filtered=False) if greedy else {}))
        # E-LANG: a high energy marks a hard token; BiLD: a low max probability.
        unsure = torch.where(energy, res.energies > thr, res.fallback)
        was = t["active"]
        accepted = was & ~unsure
        step = t["step"]
        for name, value in (("hist_token", res.token_ids.to(torch.int32)), ("hist_accepted", accepted.to(torch.int32)),
                            ("hist_fell", (was & unsure).to(torch.int32)), ("hist_conf", res.max_probs)):
            t[name].index_copy_(0, step, value[None])
        step += 1
        if "out_probs" in t:
            t["out_probs"].copy_(ops.filtered_probs(logits, t["temperature"], t["top_k"], t["top_p"], t["min_p"]))
        if "pen_ids" in t:  # an accepted draft joins its row's history, at the row's length
            ids = t["pen_ids"]
            at = t["pen_len"].clamp(max=ids.shape[1] - 1)[:, None]
            ids.scatter_(1, at, torch.where(accepted[:, None], res.token_ids[:, None].to(ids.dtype), ids.gather(1, at)))
            t["pen_len"] += accepted.to(torch.int64)
        t["ndraft"] += accepted.to(torch.int32)
        t["active"].copy_(accepted & (t["ndraft"] < t["cap"]))
        t["tok"].copy_(torch.where(accepted, res.token_ids, t["tok"]))
        t["offset"] += 1
        t["any_active"].copy_(t["active"].any())

    def _decode_step(self, t: dict, greedy: bool = False) -> None:
        """Feed every active row's last draft at its position; rows that stopped write and read nothing."""
        bs, executor = self.runner.block_size, self.runner.executor
        active, pos = t["active"], t["pos"]
        col = (pos // bs).clamp(max=t["block_tables"].shape[1] - 1)
        block = t["block_tables"].gather(1, col[:, None])[:, 0].long()
        slot = torch.where(active, block * bs + pos % bs, torch.full_like(pos, -1))
        meta = AttentionMetadata(query_start_loc=t["query_start_loc"], positions=pos, slot_mapping=slot,
                                 block_tables=t["block_tables"],
                                 context_lens=torch.where(active, pos + 1, torch.zeros_like(pos)).to(torch.int32),
                                 max_query_len=1)
        if "feat" in t:  # a feature draft: its own last feature and last draft in, its next feature out
            embeds = executor.input_embeds(t["feat"], t["tok"])
            logits, hidden = executor.forward(None, meta, self.runner.kv_caches, hidden_states=embeds,
                                              return_hidden=True)
            t["feat"].copy_(torch.where(active[:, None], hidden, t["feat"]))
        else:
            logits = executor.forward(t["tok"], meta, self.runner.kv_caches)
        t["fed"] += active.to(torch.int32)
        t["pos"] += active.to(torch.int64)
        self._update(t, logits, greedy)

    # -- buffers and graphs -------------------------------------------------------------------------
    def _get(self, n: int, with_probs: bool, greedy: bool = False,
             penalties: tuple[int, int, int] | None = None) -> _Buffers:
        size = next(b for b in self.buckets if b >= n)
        key = (size, with_probs, greedy, penalties)
        if key not in self._buffers:
            r = self.runner
            feats = ((r.executor.config.hidden_size, r.executor.dtype)
                     if getattr(r.executor, "kind", "layers") == "feature" else None)
            buf = _Buffers(size, with_probs, r.device, r.blocks.max_blocks_per_seq, r.executor.config.vocab_size,
                           feats, greedy, penalties)
            if self.capture:
                t = buf.t
                t["active"].zero_()  # every row inactive while recording: nothing is written
                buf.graph = self._graphs.capture(lambda: self._decode_step(t, greedy),
                                                 f"the draft step (bucket {size}{', greedy rows' if greedy else ''})")
            self._buffers[key] = buf
        return self._buffers[key]

    # -- one run ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, rows: list[int], caps: list[int], logits: torch.Tensor, sampling: dict, threshold: float,
            energy: bool, *, with_probs: bool, features: torch.Tensor | None = None,
            penalties: tuple | None = None) -> DraftRun:
        """The draft run of `rows`, whose step-0 logits [n, V] the caller computed (the small model's cache
        then holds each row's committed tokens). caps[i] >= 1: drafts row i may propose; sampling: the
        engine's per-row values (lists or host tensors of n: temperature, top_k, top_p, seed, offset (step 0's), and
        optionally min_p (default 0)).
        features [n, H]: a feature draft's step-0 output (its predicted next feature per row), required for one
        and refused otherwise. penalties: the rows' `penalizing.chain_penalties` (host tensors), None for none."""
        n, dev = len(rows), self.runner.device
        if not caps or max(caps) > MAX_STEPS or min(caps) < 1:
            raise ValueError(f"StaticDraftLoop.run: caps must be in [1, {MAX_STEPS}], got {caps!r}")
        # every row greedy and unfiltered (the padding rows are): the buffers whose sampling step is told so
        sampling = dict(sampling)
        sampling.setdefault("min_p", [0.0] * n)
        greedy = not any(ops.known_row_kinds(sampling["temperature"], sampling["top_k"], sampling["top_p"],
                                             sampling["min_p"]))
        widths = None
        if penalties is not None:  # (the histories' width: any row's longest; E and E' rounded up to powers of two)
            r = self.runner
            widths = (r.blocks.max_blocks_per_seq * r.block_size + MAX_STEPS,
                      *(1 << max(int(x.shape[1]) - 1, 0).bit_length() for x in (penalties[3], penalties[4])))
        buf = self._get(n, with_probs, greedy, widths)
        t, B = buf.t, buf.size
        pad = B - n
        if self.capture and not buf.update_tried:
            buf.update_tried = True
            buf.logits0 = logits.new_zeros(B, logits.shape[1])
            t["active"].zero_()  # recorded before the set-up below: every row inactive, the step index at 0
            t["step"].zero_()
            buf.update_graph = self._graphs.capture(lambda: self._update(t, buf.logits0, buf.greedy),
                                                    f"the draft run's first update (bucket {B})")

        if (features is None) != ("feat" not in t):
            raise ValueError("StaticDraftLoop.run: features are given for a feature draft, and only for one")
        if features is not None:
            t["feat"][:n].copy_(features)
            t["feat"][n:].zero_()
        if penalties is not None:
            self._set_penalties(t, n, *penalties)
        starts = self.runner.blocks.context_lens_of(rows)
        # Each row may feed cap - 1 drafts after step 0: reserve their blocks now, return the rest after.
        reserve = [c - 1 for c in caps]
        self.runner.blocks.append(rows, reserve)
        t["block_tables"][:n].copy_(self.runner.blocks.block_tables_of(rows))
        t["block_tables"][n:].fill_(-1)
        # Every per-row field at once: built on the host (padding rows: nothing to draft, top_p 1), one copy of the
        # arenas' bytes (non-blocking from pageable memory: the host buffer is staged before the call returns).
        rows_of = dict(pos=starts, cap=caps, active=[True] * n, threshold=[threshold] * B, energy=[energy] * B,
                       **{name: sampling[name]
                          for name in ("temperature", "top_k", "top_p", "min_p", "seed", "offset")})
        host = torch.zeros(buf.setup_bytes, dtype=torch.uint8)
        for dtype, names in buf.ARENAS.items():
            table = []  # one Python list a name, padded to B, then one tensor a dtype: no host op a name
            for name in names:
                values = rows_of.get(name, [])
                values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
                table.append(values + [1.0 if name == "top_p" else 0] * (B - len(values)))
            at = buf.offsets[dtype]
            host[at:at + len(names) * B * dtype.itemsize] = torch.tensor(table, dtype=dtype).view(torch.uint8).flatten()
        buf.arena_bytes[:buf.setup_bytes].copy_(host, non_blocking=True)
        if buf.update_graph is not None:
            buf.logits0[:n].copy_(logits)
            if pad:
                buf.logits0[n:].zero_()
            buf.update_graph.replay()
        else:
            self._update(t, torch.cat([logits, logits.new_zeros(pad, logits.shape[1])]) if pad else logits, buf.greedy)
        probs_out = [t["out_probs"].clone()] if with_probs else None

        steps, lagged = max(caps), LaggedFlag(dev, max(caps)) if dev.type == "cuda" else None
        done = 1  # steps run: step 0 (above), then one a loop pass
        with _no_host_sync(dev):
            for j in range(1, steps):
                if lagged is None:
                    if not bool(t["any_active"]):
                        break
                elif lagged.all_done():
                    break
                if buf.graph is not None:
                    buf.graph.replay()
                else:
                    self._decode_step(t, buf.greedy)
                done = j + 1
                if probs_out is not None:  # copied out before the next step overwrites it
                    probs_out.append(t["out_probs"].clone())
                if lagged is not None:
                    lagged.record(j, t["any_active"])

        token, accepted, fell, conf, fed = self._results(buf, done, n)  # the run's one host read
        self.runner.note_nonfinite(rows, t["nonfinite"][:n])  # rows whose logits went NaN/inf
        self.runner.rollback(rows, [r - f for r, f in zip(reserve, fed)])  # reserved slots no step fed
        probs = torch.stack(probs_out, 1)[:n] if with_probs else None
        run = DraftRun([[] for _ in rows], fed, [False] * n, [None] * n, [[] for _ in rows],
                       [[] for _ in rows] if with_probs else None)
        for i in range(n):
            for j in range(len(token[i])):
                if accepted[i][j]:
                    run.tokens[i].append(token[i][j])
                    run.confidences[i].append(conf[i][j])
                    if probs is not None:
                        run.probs[i].append(probs[i, j])
                elif fell[i][j]:
                    run.fell[i], run.unsure[i] = True, (token[i][j], conf[i][j])
        return run

    @staticmethod
    def _set_penalties(t: dict, n: int, ids, rows, values, banned, bias_ids, bias_values) -> None:
        """The penalty buffers of a run's n rows from `penalizing.chain_penalties`' host tensors (rows: prompt length,
        min_tokens, output length); the padding rows' neutral (no history, penalties off)."""
        for name, src, pad in (("pen_ids", ids, -1), ("pen_banned", banned, -1), ("pen_bias_ids", bias_ids, -1),
                               ("pen_bias_values", bias_values, 0.0)):
            t[name].fill_(pad)
            t[name][:n, :src.shape[1]].copy_(src, non_blocking=True)
        t["pen_len"].zero_()
        # (the committed tokens: where the run's first draft goes)
        t["pen_len"][:n].copy_(rows[:, 0] + rows[:, 2], non_blocking=True)
        t["pen_ints"].zero_()
        t["pen_ints"][:, :n].copy_(rows[:, :2].T, non_blocking=True)
        t["pen_values"].zero_()
        t["pen_values"][0].fill_(1.0)  # (repetition_penalty 1: off)
        t["pen_values"][:, :n].copy_(values.T, non_blocking=True)

    @staticmethod
    def _results(buf: _Buffers, done: int, n: int):
        """A run's outputs for its n rows and `done` steps, from one copy of the int32 arena (a GPU run's one
        synchronisation): per row the tokens, accepted and fell flags (0 / 1) and confidences of each step, and
        the decode steps it fed."""
        host = buf.arenas[torch.int32].cpu()
        ints = host[:, :n].tolist()  # (Python lists from here: no host op a field)
        first = {name: buf.hist_row(name) for name in buf.HIST}
        first_conf = first["hist_conf"]
        confs = host[first_conf:first_conf + done, :n].view(torch.float32).tolist()
        token, accepted, fell = ([list(col) for col in zip(*ints[first[name]:first[name] + done])]
                                 for name in buf.HIST[:3])
        fed = ints[buf.ARENAS[torch.int32].index("fed")]
        return token, accepted, fell, [list(col) for col in zip(*confs)], fed

"""Offline batch generation with one model and no draft: a decode loop that never waits on the host.

What `bild distill` needs to write its corpus: many answers of the large model, sampled, as fast as the
device can produce them. `Engine` serves requests, which costs host work per row and step (scheduling,
stop strings, metrics, streaming) and a host read of every step's tokens; Hugging Face `generate` reads
every step's tokens too. On a GPU both leave a 135M model's batched decode step host-bound. Here a batch
of B prompts is prefilled once (eagerly, ragged), every slot its answers will need is reserved up front,
and then each decode step is one fixed-shape pass over fixed buffers:

  forward  B rows x 1 token through the model (paged KV cache, slots reserved in advance);
  sample   `ops.verify_draft` with nothing drafted, as `LargeOnly()` does in the engine: the same
           per-row temperature / top-k / top-p and seed, offset = the step's index, so each row's answer
           is the engine's answer to it (tested) whatever else is in the batch;
  advance  the sampled ids become the next step's inputs; positions, context lengths, offsets and the
           slot of the next token move on, all on the device.

On CUDA the step is recorded once per (batch, max_new_tokens) as a CUDA graph and replayed; the host
looks at the tokens only every `check_every` steps, to stop when every row has met a stop id. Rows that
finished early keep decoding (their extra tokens are dropped): fixed shapes are what make the loop
host-free. Answers end at their first stop id (kept) or after max_new_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bild_kernels import ops
from bild_kernels.ops import _validate as v
from bild_kernels.engine.graphs import GraphRecorder
from bild_kernels.engine.host import to_device
from bild_kernels.engine.params import SamplingParams
from bild_kernels.engine.runner import ModelRunner, load_executor
from bild_kernels.models import AttentionMetadata


@dataclass
class _Loop:
    """Fixed buffers of one (batch B, max_new_tokens N) decode loop (what a CUDA graph replays)."""

    input_ids: torch.Tensor  # [B] int64, the token each row feeds this step
    positions: torch.Tensor  # [B] int64
    slot_mapping: torch.Tensor  # [B] int64, this step's slots (-1 writes nothing)
    slots: torch.Tensor  # [B, N] int64, every reserved slot of each row's answer, in order
    query_start_loc: torch.Tensor  # [B+1] int32, 0..B
    block_tables: torch.Tensor  # [B, M] int32
    context_lens: torch.Tensor  # [B] int32, including this step's token
    step: torch.Tensor  # [1] int64: decode steps taken
    out: torch.Tensor  # [B, N] int64: sampled ids, out[:, 0] from the prefill
    empty_draft: torch.Tensor  # [B, 0] int64
    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int32
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    seed: torch.Tensor  # [B] int64
    offset: torch.Tensor  # [B] int64
    graph: object = None


class BatchGenerator:
    """A model's many answers in fixed batches, sampled with `LargeOnly()`'s semantics (see the module doc).

    Parameters
    ----------
    model : what `Engine(large=...)` takes: a Hugging Face model directory, a .gguf file, or an in-memory
        transformers model.
    device, dtype : where and in what precision it runs (default dtype: bfloat16 on CUDA, float32 else).
    max_batch_size : the most prompts of one `generate` call.
    max_model_len : the longest prompt + answer.
    graph : record each decode loop as a CUDA graph (default: on CUDA).
    """

    def __init__(self, model, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_batch_size: int = 64, max_model_len: int = 1024, block_size: int = 16,
                 graph: bool | None = None):
        for name, val in (("max_batch_size", max_batch_size), ("max_model_len", max_model_len),
                          ("block_size", block_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        graph = self.device.type == "cuda" if graph is None else graph
        if graph and self.device.type != "cuda":
            raise ValueError("graph=True records CUDA graphs: it needs device='cuda'")
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.executor, _ = load_executor(model, "large", dtype, self.device)
        self.vocab_size = self.executor.config.vocab_size
        self.max_batch_size, self.max_model_len, self.graph = max_batch_size, max_model_len, graph
        per_seq = -(-max_model_len // block_size)
        self.runner = ModelRunner(self.executor, num_blocks=max_batch_size * per_seq, block_size=block_size,
                                  max_seqs=max_batch_size, max_blocks_per_seq=per_seq)
        self._loops: dict[tuple[int, int], _Loop] = {}
        self._graphs = GraphRecorder(self.device) if graph else None

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seeds: list[int] | None = None, stop_ids=(), check_every: int = 16,
                 prefill_tokens: int = 16384, min_p: float = 0.0) -> list[list[int]]:
        """The answer (new token ids) to each prompt: up to and including its first stop id, else
        max_new_tokens ids. seeds[i] seeds row i's sampling (default: i); temperature 0 is greedy; top_k, top_p and
        min_p filter as SamplingParams' do.
        prefill_tokens: prompt tokens per eager prefill forward (bounds its activations)."""
        B = len(prompts)
        self._check(prompts, max_new_tokens, temperature, top_k, top_p, seeds, stop_ids, check_every, min_p)
        seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
        N, dev = max_new_tokens, self.device
        lp = self._loop(B, N)
        rows = list(range(B))
        plens = [len(p) for p in prompts]
        for r in rows:
            self.runner.add(r)
        try:
            with v.trusted_inputs():  # checked above; each op's value checks would read the device
                first = self._prefill(rows, prompts, prefill_tokens)  # [B, V]
                slots = self.runner.blocks.append(rows, [N] * B).view(B, N)  # the answers' slots, reserved now
                lp.temperature.fill_(temperature)
                lp.top_k.fill_(top_k)
                lp.top_p.fill_(top_p)
                lp.min_p.fill_(min_p)
                lp.seed.copy_(to_device(seeds, torch.int64, dev))
                lp.offset.zero_()
                lp.out.zero_()
                lp.out[:, 0] = self._sample(lp, first)
                lp.slots.copy_(slots)
                lp.block_tables.copy_(self.runner.blocks.block_tables_of(rows))
                lp.input_ids.copy_(lp.out[:, 0])
                plen = to_device(plens, torch.int64, dev)
                lp.positions.copy_(plen)
                lp.context_lens.copy_(plen + 1)
                lp.slot_mapping.copy_(slots[:, 0])
                lp.offset.fill_(1)
                lp.step.zero_()
                stops = to_device(sorted(set(stop_ids)), torch.int64, dev)
                for j in range(N - 1):
                    if lp.graph is not None:
                        lp.graph.replay()
                    else:
                        self._decode_step(lp)
                    if stops.numel() and (j + 1) % check_every == 0 and bool(
                            torch.isin(lp.out[:, :j + 2], stops).any(1).all()):
                        break
                out = lp.out.tolist()
        finally:
            for r in rows:
                self.runner.free(r)
        stop_set = set(stop_ids)
        return [until_stop(row, stop_set) for row in out]

    def _check(self, prompts, max_new_tokens, temperature, top_k, top_p, seeds, stop_ids, check_every,
               min_p) -> None:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch_size={self.max_batch_size}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in p):
                raise ValueError(f"prompts[{i}] holds an id outside the vocabulary [0, {self.vocab_size})")
            if len(p) + max_new_tokens > self.max_model_len:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens + max_new_tokens={max_new_tokens} exceed "
                                 f"max_model_len={self.max_model_len}")
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)  # the engine's checks
        if seeds is not None and (len(seeds) != len(prompts) or any(
                isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in seeds)):
            raise ValueError(f"seeds must hold one int in [0, 2**63) per prompt ({len(prompts)})")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in stop_ids):
            raise ValueError(f"stop_ids must be token ids >= 0, got {list(stop_ids)!r}")

    def _prefill(self, rows: list[int], prompts: list[list[int]], chunk_tokens: int) -> torch.Tensor:
        """Each prompt through the model (eager, ragged, in groups of about chunk_tokens): the last logits [B, V]."""
        out, i = [], 0
        while i < len(rows):
            j, n = i, 0
            while j < len(rows) and (j == i or n + len(prompts[j]) <= chunk_tokens):
                n += len(prompts[j])
                j += 1
            out.append(self.runner.extend(rows[i:j], [list(p) for p in prompts[i:j]], [1] * (j - i))[:, 0])
            i = j
        return torch.cat(out)

    def _sample(self, lp: _Loop, logits: torch.Tensor) -> torch.Tensor:
        """One sampled id per row from logits [B, V] (LargeOnly's verification with nothing drafted)."""
        res = ops.verify_draft(lp.empty_draft, logits[:, None], "greedy", temperature=lp.temperature,
                               top_k=lp.top_k, top_p=lp.top_p, min_p=lp.min_p, seed=lp.seed, offset=lp.offset)
        return res.output_ids[:, 0]

    def _decode_step(self, lp: _Loop) -> None:
        # A row with no slot this step attends to nothing: the graph's warm-up runs on empty buffers (every
        # slot -1, every table entry -1) move context_lens on, and must not read block -1 of the caches.
        ctx = torch.where(lp.slot_mapping >= 0, lp.context_lens, torch.zeros_like(lp.context_lens))
        meta = AttentionMetadata(query_start_loc=lp.query_start_loc, positions=lp.positions,
                                 slot_mapping=lp.slot_mapping, block_tables=lp.block_tables,
                                 context_lens=ctx, max_query_len=1)
        logits = self.executor.forward(lp.input_ids, meta, self.runner.kv_caches)  # [B, V]
        tok = self._sample(lp, logits)
        lp.step.add_(1)
        # Clamped: the graph's warm-up runs take more steps than a loop of N = 2 or 3 has columns.
        col = lp.step.clamp(max=lp.out.shape[1] - 1).view(1, 1).expand(lp.out.shape[0], 1)
        lp.out.scatter_(1, col, tok[:, None])
        lp.input_ids.copy_(tok)
        lp.positions.add_(1)
        lp.context_lens.add_(1)
        lp.offset.add_(1)
        lp.slot_mapping.copy_(lp.slots.gather(1, col)[:, 0])

    def _loop(self, B: int, N: int) -> _Loop:
        key = (B, N)
        if key in self._loops:
            return self._loops[key]
        dev, M = self.device, self.runner.blocks.max_blocks_per_seq
        i64, i32, f32 = (dict(dtype=d, device=dev) for d in (torch.int64, torch.int32, torch.float32))
        lp = _Loop(input_ids=torch.zeros(B, **i64), positions=torch.zeros(B, **i64),
                   slot_mapping=torch.full((B,), -1, **i64), slots=torch.full((B, N), -1, **i64),
                   query_start_loc=torch.arange(B + 1, **i32), block_tables=torch.full((B, M), -1, **i32),
                   context_lens=torch.zeros(B, **i32), step=torch.zeros(1, **i64), out=torch.zeros(B, N, **i64),
                   empty_draft=torch.zeros(B, 0, **i64), temperature=torch.zeros(B, **f32),
                   top_k=torch.zeros(B, **i32), top_p=torch.ones(B, **f32), min_p=torch.zeros(B, **f32),
                   seed=torch.zeros(B, **i64), offset=torch.zeros(B, **i64))
        if self.graph and N > 1:
            # Recorded on empty buffers: every slot -1 and every context empty, so the warm-up runs write
            # no KV; their counter moves are reset by `generate` before each use.
            lp.graph = self._graphs.capture(lambda: self._decode_step(lp),
                                            f"the batch decode step (batch {B}, {N} new tokens)")
        self._loops[key] = lp
        return lp


def until_stop(row: list[int], stops) -> list[int]:
    """row up to and including its first id in `stops` (all of it if none is there)."""
    end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    return row[:end]

"""`Engine`: the thin orchestrator. It admits requests, runs the draft loop of the small model and
the verification pass of the large model on the kernels, and does the bookkeeping of rollback.

One iteration over the running batch (every request follows its own policy state; its output is
the same alone or beside others):
  1. draft  — the small model catches up on the tokens it has not cached, then proposes tokens one
              step at a time until each row's fallback flag fires or its draft cap is reached;
  2. verify — one extend pass of the large model over every row's uncached tokens + draft, then
              `verify_draft` accepts a prefix and emits the large model's own next token;
  3. commit — append accepted + emitted tokens, roll back both caches past the accepted prefix,
              finish rows that hit a stop condition and free their blocks.
A new request's prefill is simply its first verification pass with nothing drafted.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from bild_kernels import ops
from bild_kernels.engine.params import SamplingParams
from bild_kernels.engine.policies import BiLD, Policy
from bild_kernels.engine.runner import ModelRunner, load_executor
from bild_kernels.engine.sequence import RequestOutput, Sequence, StreamChunk
from bild_kernels.engine.tokenizer import Detokenizer, resolve_prompts

# Draft steps of one iteration use offsets iteration * _DRAFT_STRIDE + step: distinct for every step.
_DRAFT_STRIDE = 128


class Engine:
    """Big-little speculative decoding over a paged KV cache.

    Parameters
    ----------
    large, small : a Hugging Face model directory, a .gguf file, or an in-memory transformers model
        (the small model is optional for policies that do not draft).
    device : "cpu" | "cuda". dtype : torch dtype of weights and caches (default float32 on CPU,
        bfloat16 on CUDA).
    max_batch_size : requests decoded together. max_model_len : prompt + output tokens per request.
    kv_cache_blocks : blocks of `block_size` tokens per model cache (both models get the same number,
        so both hold the same tokens); default: enough for max_batch_size requests of max_model_len.
    kv_cache_memory : instead of kv_cache_blocks, one memory budget for both caches together: bytes
        (an int) or a fraction of the device's free memory (a float in (0, 1], CUDA only). A block of
        the budget holds the same tokens in the large and the small cache.
    tokenizer : a transformers tokenizer; default: the large model's, when it has one.
    """

    def __init__(self, large=None, small=None, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_batch_size: int = 8, max_model_len: int = 2048, kv_cache_blocks: int | None = None,
                 block_size: int = 16, kv_cache_memory: int | float | None = None, tokenizer=None):
        if large is None:
            raise ValueError("large: a model is required (a model directory, a .gguf file or a transformers model)")
        for name, val, lo in (("max_batch_size", max_batch_size, 1), ("max_model_len", max_model_len, 2),
                              ("block_size", block_size, 1)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_batch_size, self.max_model_len, self.block_size = max_batch_size, max_model_len, block_size
        # A request may cache a whole draft run past its last committed token.
        self.blocks_per_seq = -(-(max_model_len + 64) // block_size)
        if kv_cache_blocks is not None and kv_cache_memory is not None:
            raise ValueError("give kv_cache_blocks or kv_cache_memory, not both")
        budget = self._memory_budget(kv_cache_memory)
        large_exec, large_tok = load_executor(large, "large", dtype, self.device)
        small_exec, small_tok = (None, None) if small is None else load_executor(small, "small", dtype, self.device)
        if budget is not None:
            per_block = sum(e.kv_cache_bytes_per_block(block_size) for e in (large_exec, small_exec) if e is not None)
            kv_cache_blocks = budget // per_block
            if kv_cache_blocks < 1:
                raise ValueError(f"kv_cache_memory={kv_cache_memory!r} holds no block ({per_block} bytes each)")
        if kv_cache_blocks is None:
            kv_cache_blocks = max_batch_size * self.blocks_per_seq
        if isinstance(kv_cache_blocks, bool) or not isinstance(kv_cache_blocks, int) or kv_cache_blocks < 1:
            raise ValueError(f"kv_cache_blocks must be a positive int, got {kv_cache_blocks!r}")
        self.kv_cache_blocks = kv_cache_blocks
        if small_exec is not None and small_exec.config.vocab_size != large_exec.config.vocab_size:
            raise ValueError(f"the small model's vocabulary ({small_exec.config.vocab_size}) differs from the large "
                             f"model's ({large_exec.config.vocab_size}): they must share a tokenizer")
        if large_tok is not None and small_tok is not None and large_tok.get_vocab() != small_tok.get_vocab():
            raise ValueError("the small model's tokenizer differs from the large model's: they must share one")
        self.tokenizer = tokenizer if tokenizer is not None else large_tok
        self.vocab_size = large_exec.config.vocab_size
        self.eos_ids = set(large_exec.config.eos_token_ids)
        kw = dict(num_blocks=kv_cache_blocks, block_size=block_size, max_seqs=max_batch_size,
                  max_blocks_per_seq=self.blocks_per_seq)
        self.runners = {"large": ModelRunner(large_exec, **kw)}
        if small_exec is not None:
            self.runners["small"] = ModelRunner(small_exec, **kw)
        self._next_id = 0
        # Seconds spent drafting (small model + sampling) and verifying (large model + verify + rollback),
        # summed over steps; wall time minus both is the engine's own overhead. Benchmarks reset it.
        self.time_split = {"draft": 0.0, "verify": 0.0}

    def _memory_budget(self, mem) -> int | None:
        if mem is None:
            return None
        if isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0:
            raise ValueError(f"kv_cache_memory must be bytes (int > 0) or a fraction in (0, 1], got {mem!r}")
        if isinstance(mem, int):
            return mem
        if mem > 1:
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {mem!r}")
        if self.device.type != "cuda":
            raise ValueError("kv_cache_memory as a fraction needs a CUDA device; give bytes on the CPU")
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * mem)

    # ------------------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 policy: Policy | None = None, *, chat_template: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); one RequestOutput each, in order.
        `params` is one SamplingParams for all prompts or a list with one per prompt."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        outputs = {}
        for chunk in self._run(prompts, params, policy, chat_template):
            if chunk.finished:
                outputs[chunk.request_id] = chunk.output
        return [outputs[k] for k in sorted(outputs)]

    def stream(self, prompt, params: SamplingParams | None = None, policy: Policy | None = None,
               *, chat_template: bool = False) -> Iterator[StreamChunk]:
        """Yield the tokens of one request as they are committed; the last chunk carries the output."""
        yield from self._run([prompt], params, policy, chat_template)

    # ------------------------------------------------------------------------------------------
    def _check_policy(self, policy) -> Policy:
        policy = BiLD() if policy is None else policy
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a bild_kernels policy (BiLD, Greedy, ...), got {type(policy).__name__}")
        if policy.uses_small and "small" not in self.runners:
            raise ValueError(f"policy {policy.name!r} needs a small model, but the engine has none")
        return policy

    def _run(self, prompts, params, policy, chat_template) -> Iterator[StreamChunk]:
        params = SamplingParams() if params is None else params
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: got {len(params)} SamplingParams for {len(prompts)} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
        policy = self._check_policy(policy)
        detok = Detokenizer(self.tokenizer)
        waiting: list[Sequence] = []
        resolved = resolve_prompts(prompts, self.tokenizer, self.vocab_size, chat_template)
        for (ids, error), p in zip(resolved, params):
            seq = Sequence(self._next_id, ids or [], p)
            self._next_id += 1
            error = error or self._admission_error(seq, policy)
            if error:
                seq.finish_reason = "error"
                seq.metrics.end_time = seq.metrics.start_time
                yield StreamChunk(seq.request_id, [], "", True, "error", self._output(seq, detok, error))
            else:
                waiting.append(seq)
        running: list[Sequence] = []
        try:
            while waiting or running:
                while waiting and len(running) < self.max_batch_size and self._fits(waiting[0], running, policy):
                    seq = waiting.pop(0)
                    seq.row = min(set(range(self.max_batch_size)) - {s.row for s in running})
                    for r in self.runners.values():
                        r.add(seq.row)
                    running.append(seq)
                committed = self._step(running, policy)
                for seq, new in zip(list(running), committed):
                    reason = self._finish(seq, new)
                    text = detok.delta(seq)
                    if reason:
                        self._release(seq, running)
                        seq.metrics.end_time = time.perf_counter()
                        yield StreamChunk(seq.request_id, new, text, True, reason, self._output(seq, detok, None))
                    elif new:
                        yield StreamChunk(seq.request_id, new, text, False)
        finally:
            for seq in list(running):  # an abandoned stream frees its blocks at once
                self._release(seq, running)

    # ------------------------------------------------------------------------------------------
    def _worst_blocks(self, seq: Sequence, policy: Policy) -> int:
        """Blocks a request can ever hold: its whole output plus one draft run."""
        return -(-(seq.prompt_len + self._max_new(seq) + policy.max_draft_len + 1) // self.block_size)

    def _max_new(self, seq: Sequence) -> int:
        return min(seq.params.max_tokens, self.max_model_len - seq.prompt_len)

    def _admission_error(self, seq: Sequence, policy: Policy) -> str | None:
        if seq.prompt_len >= self.max_model_len:
            return f"prompt has {seq.prompt_len} tokens; max_model_len={self.max_model_len} leaves no room to generate"
        if self._worst_blocks(seq, policy) > self.kv_cache_blocks:
            return (f"the KV cache ({self.kv_cache_blocks} blocks of {self.block_size} tokens) is too small for this "
                    f"request ({self._worst_blocks(seq, policy)} blocks needed)")
        return None

    def _fits(self, seq: Sequence, running: list[Sequence], policy: Policy) -> bool:
        # Admission reserves each request's worst case, so a running request never runs out of blocks.
        used = sum(self._worst_blocks(s, policy) for s in running)
        return used + self._worst_blocks(seq, policy) <= self.kv_cache_blocks

    def _release(self, seq: Sequence, running: list[Sequence]) -> None:
        for r in self.runners.values():
            r.free(seq.row)
        running.remove(seq)

    def _finish(self, seq: Sequence, new: list[int]) -> str | None:
        """Apply stop conditions to the tokens just committed; truncate and return the reason."""
        out_start = seq.prompt_len
        first_new = len(seq.tokens) - len(new)
        limit = out_start + self._max_new(seq)
        stop_ids = {s for s in seq.params.stop if isinstance(s, int)}
        for i in range(first_new, len(seq.tokens)):
            tok = seq.tokens[i]
            if i >= limit:
                del seq.tokens[i:]
                seq.finish_reason = "length"
                break
            if (tok in self.eos_ids and not seq.params.ignore_eos) or tok in stop_ids:
                del seq.tokens[i + 1:]
                seq.finish_reason = "eos" if tok in self.eos_ids and tok not in stop_ids else "stop"
                break
        else:
            if len(seq.tokens) >= limit:
                seq.finish_reason = "length"
        del new[len(seq.tokens) - first_new:]
        stop_strs = [s for s in seq.params.stop if isinstance(s, str)]
        if stop_strs and self.tokenizer is not None and seq.finish_reason is None:
            if Detokenizer.truncate_at_stop(self.tokenizer, seq, stop_strs, first_new):
                del new[max(len(seq.tokens) - first_new, 0):]
                seq.finish_reason = "stop"
        seq.metrics.generated_tokens = len(seq.output_ids)
        return seq.finish_reason

    def _output(self, seq: Sequence, detok: Detokenizer, error: str | None) -> RequestOutput:
        text = detok.text(seq) if error is None else None
        return RequestOutput(seq.request_id, seq.tokens[:seq.prompt_len], [] if error else seq.output_ids, text,
                             seq.finish_reason, seq.metrics, error)

    # ------------------------------------------------------------------------------------------
    def _sampling(self, seqs: list[Sequence], offsets: list[int]) -> dict:
        dev = self.device
        return dict(temperature=torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=dev),
                    top_k=torch.tensor([s.params.top_k for s in seqs], dtype=torch.int32, device=dev),
                    top_p=torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev),
                    seed=torch.tensor([s.params.seed for s in seqs], dtype=torch.int64, device=dev),
                    offset=torch.tensor(offsets, dtype=torch.int64, device=dev))

    def _step(self, running: list[Sequence], policy: Policy) -> list[list[int]]:
        """One iteration over the running batch; returns the tokens committed per sequence."""
        t0 = time.perf_counter()
        if policy.uses_small and not policy.drafts:
            committed = self._step_small_only(running)
            self.time_split["draft"] += time.perf_counter() - t0
            return committed
        drafts, probs = self._draft(running, policy) if policy.drafts else ([[] for _ in running], None)
        t1 = time.perf_counter()
        committed = self._verify(running, policy, drafts, probs)
        self.time_split["draft"] += t1 - t0
        self.time_split["verify"] += time.perf_counter() - t1
        return committed

    def _step_small_only(self, running: list[Sequence]) -> list[list[int]]:
        small = self.runners["small"]
        logits = small.extend([s.row for s in running], [s.pending("small") for s in running], [1] * len(running))
        for s in running:
            s.cached["small"] = len(s.tokens)
            s.metrics.small_steps += 1
        res = ops.sample_draft(logits[:, 0], **self._sampling(running, [s.iteration for s in running]))
        new = [[t] for t in res.token_ids.tolist()]
        for s, t in zip(running, new):
            s.tokens += t
            s.iteration += 1
        return new

    def _draft(self, running: list[Sequence], policy: Policy):
        small = self.runners["small"]
        drafts: list[list[int]] = [[] for _ in running]
        probs: list[list[torch.Tensor]] | None = [[] for _ in running] if policy.verify_mode == "sample" else None
        # Never draft past what the request may still generate: the emitted token comes on top.
        caps = [min(policy.max_draft_len, self._max_new(s) - len(s.output_ids) - 1) for s in running]
        active = [i for i, c in enumerate(caps) if c > 0]
        step = 0
        while active:
            seqs = [running[i] for i in active]
            toks = [(s.tokens + drafts[i])[s.cached["small"]:] for i, s in zip(active, seqs)]
            logits = small.extend([s.row for s in seqs], toks, [1] * len(seqs))[:, 0]  # [n, V]
            for i, s in zip(active, seqs):
                s.cached["small"] = len(s.tokens) + len(drafts[i])
                s.metrics.small_steps += 1
            sp = self._sampling(seqs, [s.iteration * _DRAFT_STRIDE + step for s in seqs])
            res = ops.sample_draft(logits, fallback_threshold=policy.fallback_threshold, **sp)
            row_probs = ops.filtered_probs(logits, sp["temperature"], sp["top_k"], sp["top_p"]) if probs else None
            still = []
            for j, (i, tok, fb) in enumerate(zip(active, res.token_ids.tolist(), res.fallback.tolist())):
                if fb:  # the small model is unsure: its token is discarded and the large model takes over
                    running[i].metrics.fallbacks += 1
                    continue
                drafts[i].append(tok)
                if probs is not None:
                    probs[i].append(row_probs[j])
                if len(drafts[i]) < caps[i]:
                    still.append(i)
            active = still
            step += 1
        return drafts, probs

    def _verify(self, running: list[Sequence], policy: Policy, drafts, probs) -> list[list[int]]:
        large = self.runners["large"]
        K = max(len(d) for d in drafts)
        toks = [s.tokens[s.cached["large"]:] + d for s, d in zip(running, drafts)]
        target_logits = large.extend([s.row for s in running], toks, [len(d) + 1 for d in drafts])  # [B, K+1, V]
        for s, d in zip(running, drafts):
            s.cached["large"] = len(s.tokens) + len(d)
            s.metrics.large_passes += 1
        draft_ids = torch.full((len(running), K), -1, dtype=torch.int64)
        for i, d in enumerate(drafts):
            draft_ids[i, :len(d)] = torch.tensor(d, dtype=torch.int64)
        kw = self._sampling(running, [s.iteration for s in running])
        if policy.verify_mode == "bild":
            kw["rollback_threshold"] = policy.rollback_threshold
        if policy.verify_mode == "sample":
            kw["draft_probs"] = ops.pack_draft_probs(probs, K, self.vocab_size, target_logits)
        res = ops.verify_draft(draft_ids.to(self.device), target_logits, policy.verify_mode, **kw)
        num_accepted, out_ids = res.num_accepted.tolist(), res.output_ids.tolist()
        committed, rollbacks = [], {name: ([], []) for name in self.runners}
        for s, d, a, out in zip(running, drafts, num_accepted, out_ids):
            new = out[:a + 1]
            if d:
                m = s.metrics
                m.drafted_tokens += len(d)
                m.accepted_tokens += a
                m.accepted_lengths[a] += 1
                m.rollbacks += a < len(d)
            valid = len(s.tokens) + a  # cached tokens still on the committed path
            s.tokens += new
            s.iteration += 1
            for name in self.runners:
                if s.cached[name] > valid:
                    rollbacks[name][0].append(s.row)
                    rollbacks[name][1].append(s.cached[name] - valid)
                    s.cached[name] = valid
            committed.append(new)
        for name, (rows, counts) in rollbacks.items():
            if rows:
                self.runners[name].rollback(rows, counts)
        return committed

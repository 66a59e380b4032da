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
A new request's prefill is simply its first verification pass with nothing drafted (a prompt longer than
`prefill_chunk` goes through a chunk a step before it, the rest of the batch stepping on: `prefill_chunks`).
Policies without a small model reuse the same loop: Jacobi's guesses (the last pass's predictions,
then prompt tokens) stand in for the draft; shallow-deep drafts with the large model's first layers
and its verify pass runs the deep layers over every pending token (see `shallow_deep`). With
calibrated ("auto") thresholds, each verify pass also feeds FREE's labelled pairs to the policy.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from bild_kernels._backend import cpu_has_amx
from bild_kernels.engine.aio import AsyncAPI
from bild_kernels.engine.draft_loop import StaticDraftLoop
from bild_kernels.engine.iteration import Iteration
from bild_kernels.engine.params import SamplingParams
from bild_kernels.engine.policies import BiLD, LargeOnly, Policy, bild_from_dict
from bild_kernels.engine.prefill_chunks import PREFILL_CHUNK_AUTO_TOKENS
from bild_kernels.engine.prefix_cache import PrefixCache
from bild_kernels.engine.prefixing import PREFIX_CACHE_AUTO_TOKENS, Prefixing
from bild_kernels.engine.runner import ModelRunner, load_executor
from bild_kernels.engine.scheduler import Scheduler
from bild_kernels.engine.sequence import RequestOutput, Sequence, StreamChunk
from bild_kernels.engine.shallow_deep import LayerGroups
from bild_kernels.engine.tokenizer import Detokenizer, TokenizerMethods
from bild_kernels.models.llama import check_int8_kernel, int8_activation_dtype

# The longest pass (new tokens a row) that runs on fixed buffers / CUDA graphs: a verification of up to 15
# drafted tokens, or a catch-up. Longer ones (prefill) run eagerly.
STATIC_EXTEND_TOKENS = 16


def _recommended_policy(small) -> Policy:
    """generate()'s policy when none is given: LargeOnly without a small model, else BiLD (with the
    thresholds a shipped draft's manifest recommends for its pair, when it has some)."""
    from bild_kernels.models.draft import is_draft_dir, read_manifest
    if small is None:
        return LargeOnly()
    if small is not None and isinstance(small, (str, os.PathLike)) and is_draft_dir(small):
        tuned = read_manifest(small).get("policy") or {}
        if tuned:
            return bild_from_dict(tuned)
    return BiLD()


CPU_KINDS = ("default", "amx")  # the keys a manifest's cpu_draft_max_batch may give a limit for


def cpu_kind() -> str:
    """Which of CPU_KINDS this CPU is: "amx" where it has AMX tiles (Intel Xeon 4th generation on: two 512-bit FMA
    units a core, where a verify pass of several rows costs less against a decode step than on the AMD EPYC the
    default limits were measured on), else "default"."""
    return "amx" if cpu_has_amx() else "default"


def _recommended_draft_max_batch(small, device: torch.device) -> int | None:
    """draft_max_batch="auto": the shipped draft's manifest's `cpu_draft_max_batch` on a CPU, else None. It is an int
    for every CPU or {cpu kind: int} with a "default" (`cpu_kind`)."""
    from bild_kernels.models.draft import is_draft_dir, read_manifest
    if device.type != "cpu" or small is None or not isinstance(small, (str, os.PathLike)) or not is_draft_dir(small):
        return None
    limit = read_manifest(small).get("cpu_draft_max_batch")
    if isinstance(limit, dict):
        if "default" not in limit or set(limit) - set(CPU_KINDS):
            raise ValueError(f"{small}: cpu_draft_max_batch as a dict needs a \"default\" and only keys of "
                             f"{CPU_KINDS}, got {sorted(limit)}")
        values = list(limit.values())
        limit = limit.get(cpu_kind(), limit["default"])
    else:
        values = [limit]
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1) for v in values):
        raise ValueError(f"{small}: cpu_draft_max_batch must be an int >= 1 (or a dict of them), got {values!r}")
    return limit


class Engine(Prefixing, TokenizerMethods, Iteration, AsyncAPI):
    """Big-little speculative decoding over a paged KV cache.

    Parameters
    ----------
    large, small : a Hugging Face model directory, a .gguf file, or an in-memory transformers model;
        small may also be a draft directory (bild_draft.json) made for `large`. The small model is
        optional for policies that do not draft. Neither given: the default pair, SmolLM2-135M-Instruct
        and its distilled draft, with generate() defaulting to the BiLD thresholds tuned for it.
    device : "cpu" | "cuda". dtype : torch dtype of weights and caches (default float32 on CPU,
        bfloat16 on CUDA). small_dtype : the small model's (default: dtype); e.g. bfloat16 for the
        draft beside a float32 large model on a CPU with AMX, where it makes drafting cheaper.
    max_batch_size : requests decoded together. max_model_len : prompt + output tokens per request.
    kv_cache_blocks : blocks of `block_size` tokens per model cache (both models get the same number,
        so both hold the same tokens); default: enough for max_batch_size requests of max_model_len.
    kv_cache_memory : instead of kv_cache_blocks, one memory budget for both caches together: bytes
        (an int) or a fraction of the device's free memory (a float in (0, 1], CUDA only). A block of
        the budget holds the same tokens in the large and the small cache.
    tokenizer : a transformers tokenizer; default: the large model's, when it has one.
    draft_loop : how the small model's draft runs execute: "graph" (captured CUDA graphs, one per
        batch-size bucket; the default on CUDA), "eager" (a loop that shrinks the batch as rows stop),
        "static" (the graphs' fixed-buffer loop run without capture: for debugging a graph), or "native"
        (the default on a CPU): "eager", but a feature draft's greedy runs (every drafting row greedy) go
        to the CPU extension in one call (cpu_feature_draft_chain), their steps back to back in C++.
        All give the same tokens.
    extend_passes : how both models' short passes run (decode steps, verification passes, draft catch-ups:
        up to `max_draft_len`-sized runs of new tokens a row, bucketed to 1, 2, 4, 8 or 16): "graph" (one
        captured CUDA graph per (batch-size, token-count) bucket; the default on CUDA), "eager" (the
        default on a CPU), or "static" (the graphs' padded fixed-buffer pass without capture). Longer
        passes (prefill) always run eagerly. The same tokens either way, up to the rounding of padded
        shapes.
    small_weights : "int8" stores the small model's projections and head as int8 per output channel
        (weight-only): a quarter of the float32 bytes a CPU draft step reads. Activations are float32
        where the CPU extension's cpu_linear_int8 runs (x86-64 with AVX2), else bfloat16 (torch's int8
        kernel), unless small_dtype says otherwise. "auto" (the default): int8 on a CPU when neither
        dtype nor small_dtype is given and a kernel serves it (the weights stay as loaded if the model's
        widths do not suit torch's kernel), else as loaded. None: as loaded. Lossless policies give the same tokens
        either way; the draft's proposals may differ in rare near-ties.
    large_weights : None (as loaded) or "int8": the large model's projections and head as int8 per output channel
        (weight-only, as small_weights' int8), for a float checkpoint on a CPU (or a GGUF whose types have no CPU
        kernel here, Q4_K for one: those load as float weights), where a decode step is bound by
        reading the weights: a quarter of float32's bytes. The large model is then that int8 model (every lossless
        policy exact against it; its text within the quantisation's effect of the float one's). Refused for a large
        model that already runs from a GGUF's quantised blocks, and where no int8 kernel serves the dtype.
    draft_max_batch : draft only while at most this many requests run together; a step over a larger batch
        is a plain large-model step for every row (no draft, nothing to verify: what the policy would emit
        with nothing drafted, so greedy lossless policies give the same tokens; BiLD's text then depends on what
        runs beside it, its undrafted tokens being the large model's own, and speculative sampling draws other tokens
        from the same distribution). Batching already shares each weight read
        among the rows, and on a CPU a verify pass over batch x (k + 1) tokens becomes compute-bound: with
        the default pair on the 2-core AMD EPYC, the default BiLD ran 1.34x LargeOnly at batch 2 but 0.85x
        at batch 4 and 0.65x at batch 8. None: no limit. "auto" (the default): the shipped draft's
        recommendation for the device (`cpu_draft_max_batch` in its bild_draft.json, per `cpu_kind`: for the
        default pair 1, where batch 2 ran 0.94-1.01x with drafting on the AMD EPYC, and 2 on a CPU with AMX, where
        it ran 1.29-1.31x on a 2-core Intel Xeon) on a CPU, else no limit.
    prefix_cache : keep the large model's keys and values (and, with a feature draft, its hidden states) of up
        to this many recent prompt positions, outside the KV pool, and copy the longest kept prefix of a new
        prompt into its blocks at admission instead of prefilling it (`bild_kernels.engine.prefix_cache`): what
        requests that share a system prompt or a template save of their time to first token. None or 0: off.
        `Engine.prefix_cache` is then the cache (its hits, `clear()`, `discard(prompt)`), and each request's
        metrics count its `cached_prompt_tokens`. "auto" (the default): PREFIX_CACHE_AUTO_TOKENS where a
        hit provably changes nothing but the time (the large model's layers and head compute each token's row
        on its own, the same bits whatever else its pass holds: `LlamaExecutor.rows_independent`, the default
        pair's GGUF blocks on a CPU with AVX-512 VNNI), else off (elsewhere float32 / bf16 products may round a
        row differently in a shorter pass: ask for it by number there).
    prefill_chunk : a prompt longer than this many tokens is prefilled a chunk of this many tokens a step, while
        the other requests go on decoding (`bild_kernels.engine.prefill_chunks`): a running stream then waits at most
        one chunk's pass a step for a newcomer's prompt. None or 0: every prompt in one pass. "auto" (the default):
        PREFILL_CHUNK_AUTO_TOKENS where chunking provably changes nothing but the time (as for prefix_cache), else
        None.
    kv_admission : how requests get KV blocks. "preempt" (the default; vLLM's way): a request is admitted when its
        next step fits in the free blocks and takes more as it grows; when the running requests' next steps do not
        fit, the one admitted last is preempted: its blocks return to the pool, and it waits at the head of the
        queue to be re-admitted, its keys and values copied back or recomputed (`preemption`; its tokens so far,
        its random numbers and its stream go on unchanged; `metrics.preemptions` counts it). More requests then
        run together where most end well before max_tokens. "reserve": each request reserves its worst case
        (prompt + max_tokens + a draft run) at admission and is never preempted. Either way a request whose worst
        case exceeds the pool is refused, and the oldest running request always goes on. The default pool
        (kv_cache_blocks=None) holds every request's worst case, so neither ever waits for blocks there.
    preemption : what a preempted request keeps. "swap": copies of its keys and values, in host memory outside the
        pool (one copy per preempted request, freed at re-admission: at most max_batch_size requests' of each
        priority, as no request is admitted while an earlier one of its priority waits), copied back as they were:
        the same bits, at the cost of a copy. "recompute": nothing; its keys and values are recomputed by a prefill
        of its tokens (vLLM's way; frees the memory at once): the same bits where the model computes each token's
        row on its own (`LlamaExecutor.rows_independent`, as for prefix_cache="auto"); elsewhere a prefill may
        round a row differently from the decode steps it replaces, as any change of batch shape may. "auto" (the
        default): "swap" on a CPU (the copy is ~1000x cheaper than a CPU prefill, and the host memory is the same
        memory), "recompute" on a GPU.
    """

    def __init__(self, large=None, small=None, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_batch_size: int = 8, max_model_len: int = 2048, kv_cache_blocks: int | None = None,
                 block_size: int = 16, kv_cache_memory: int | float | None = None, tokenizer=None,
                 draft_loop: str | None = None, small_dtype: torch.dtype | None = None,
                 small_weights: str | None = "auto", extend_passes: str | None = None,
                 draft_max_batch: int | str | None = "auto", prefix_cache: int | str | None = "auto",
                 prefill_chunk: int | str | None = "auto", large_weights: str | None = None,
                 kv_admission: str = "preempt", preemption: str = "auto"):
        if large_weights not in (None, "int8"):
            raise ValueError(f"large_weights must be None (as loaded) or 'int8', got {large_weights!r}")
        if large is None:
            if small is not None:
                raise ValueError("small given without large: name both models, or neither for the default pair")
            from bild_kernels.models.default import default_pair
            large, small = default_pair()
        for name, val, lo in (("max_batch_size", max_batch_size, 1), ("max_model_len", max_model_len, 2),
                              ("block_size", block_size, 1)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        if draft_max_batch != "auto" and draft_max_batch is not None and (
                isinstance(draft_max_batch, bool) or not isinstance(draft_max_batch, int) or draft_max_batch < 1):
            raise ValueError(f"draft_max_batch must be an int >= 1, None or 'auto', got {draft_max_batch!r}")
        if prefix_cache not in (None, "auto") and (isinstance(prefix_cache, bool) or not isinstance(prefix_cache, int)
                                                   or prefix_cache < 0):
            raise ValueError(f"prefix_cache must be a number of tokens (an int >= 0), 'auto' or None, "
                             f"got {prefix_cache!r}")
        if prefill_chunk not in (None, "auto") and (isinstance(prefill_chunk, bool)
                                                    or not isinstance(prefill_chunk, int) or prefill_chunk < 0):
            raise ValueError(f"prefill_chunk must be a number of tokens (an int >= 0), 'auto' or None, "
                             f"got {prefill_chunk!r}")
        if kv_admission not in ("preempt", "reserve"):
            raise ValueError(f"kv_admission must be 'preempt' or 'reserve', got {kv_admission!r}")
        self.kv_admission = kv_admission
        if preemption not in ("auto", "swap", "recompute"):
            raise ValueError(f"preemption must be 'auto', 'swap' or 'recompute', got {preemption!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        auto_weights = small_weights == "auto"
        small_weights = self._small_weights(small_weights, small, dtype, small_dtype)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        small_dtype = small_dtype or (int8_activation_dtype() if small_weights == "int8" else dtype)
        for name, val in (("dtype", dtype), ("small_dtype", small_dtype)):
            if not isinstance(val, torch.dtype) or not val.is_floating_point:
                raise ValueError(f"{name} must be a floating-point torch.dtype, got {val!r}")
        if draft_loop not in (None, "graph", "eager", "static", "native"):
            raise ValueError(f"draft_loop must be 'graph', 'eager', 'static' or 'native', got {draft_loop!r}")
        draft_loop = draft_loop or ("graph" if self.device.type == "cuda" else "native")
        if draft_loop == "graph" and self.device.type != "cuda":
            raise ValueError("draft_loop='graph' captures CUDA graphs: it needs device='cuda'")
        if draft_loop == "native" and self.device.type != "cpu":
            raise ValueError("draft_loop='native' runs draft runs in the CPU extension: it needs device='cpu'")
        if extend_passes not in (None, "graph", "eager", "static"):
            raise ValueError(f"extend_passes must be 'graph', 'eager' or 'static', got {extend_passes!r}")
        extend_passes = extend_passes or ("graph" if self.device.type == "cuda" else "eager")
        if extend_passes == "graph" and self.device.type != "cuda":
            raise ValueError("extend_passes='graph' captures CUDA graphs: it needs device='cuda'")
        self.max_batch_size, self.max_model_len, self.block_size = max_batch_size, max_model_len, block_size
        # A request may cache a whole draft run past its last committed token.
        self.blocks_per_seq = -(-(max_model_len + 64) // block_size)
        if kv_cache_blocks is not None and kv_cache_memory is not None:
            raise ValueError("give kv_cache_blocks or kv_cache_memory, not both")
        budget = self._memory_budget(kv_cache_memory)
        large_exec, large_tok = load_executor(large, "large", dtype, self.device)
        small_exec, small_tok = ((None, None) if small is None
                                 else load_executor(small, "small", small_dtype, self.device, base=large_exec))
        if small_exec is not None and small_exec.config.vocab_size != large_exec.config.vocab_size:
            vs, vl = small_exec.config.vocab_size, large_exec.config.vocab_size
            # One tokenizer whose checkpoints pad the embedding to different sizes: the draft takes the large
            # model's size (ids it lacks never drafted); anything else is two vocabularies. The tokenizer is shown
            # shared by both directories holding it, or given (tokenizer=) for two models that hold none.
            shared = (large_tok.get_vocab() == small_tok.get_vocab() if large_tok is not None and small_tok is not None
                      else tokenizer is not None and large_tok is None and small_tok is None)
            if not shared:  # (ids beyond the large model's embedding are refused in prompts: engine.vocab_size)
                raise ValueError(f"the small model's vocabulary ({vs}) differs from the large model's ({vl}): they "
                                 f"must share a tokenizer (checkpoints of one tokenizer whose embeddings are padded "
                                 f"to different sizes are accepted where both directories hold that tokenizer, or "
                                 f"where tokenizer= gives it for two models that hold none)")
            small_exec.match_vocab(vl)
        if large_weights == "int8":  # (after the small model borrowed what it shares with the large one)
            if large_exec.layer_blocks is not None or large_exec.head_blocks is not None:
                raise ValueError(f"large_weights='int8' quantises a float checkpoint; this large model already runs "
                                 f"from its GGUF's blocks ({large_exec.layer_blocks or large_exec.head_blocks})")
            large_exec.quantize_weights("int8")
        if small_exec is not None and small_weights == "int8":
            try:
                small_exec.quantize_weights("int8")
            except ValueError:
                if not auto_weights:  # asked for by name: say why not; "auto" keeps the bfloat16 weights
                    raise
        # A shipped draft may recommend the BiLD thresholds tuned for its pair: generate() defaults to them.
        self.default_policy = _recommended_policy(small)
        self.draft_max_batch = (_recommended_draft_max_batch(small, self.device) if draft_max_batch == "auto"
                                else draft_max_batch)
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
        self.draft_loop, self.extend_passes = draft_loop, extend_passes
        exact = large_exec.rows_independent and max_model_len <= large_exec.fused_max_tokens
        if prefix_cache == "auto":
            prefix_cache = PREFIX_CACHE_AUTO_TOKENS if exact else None
        if prefill_chunk == "auto":
            prefill_chunk = PREFILL_CHUNK_AUTO_TOKENS if exact else None
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache else None
        if self.prefix_cache is not None:
            self.runners["large"].kv_pool()  # the large model's caches must move a run of positions in one go
        if extend_passes != "eager":
            for runner in self.runners.values():
                runner.use_static(max_batch_size, STATIC_EXTEND_TOKENS, capture=extend_passes == "graph")
        movable = all(r.kv_movable for r in self.runners.values())
        if preemption == "swap" and not movable:
            raise ValueError("preemption='swap' copies a request's keys and values out and back, but this pair's "
                             "caches are not views of one tensor each (LlamaExecutor.allocate_kv_cache): use "
                             "'recompute'")
        if preemption == "auto":  # on a CPU the copy is ~1000x cheaper than the prefill that recomputes it
            preemption = "swap" if movable and self.device.type == "cpu" else "recompute"
        self.preemption = preemption
        # "layers": a standalone small model (tokens in); "feature": it reads the large model's hidden states
        self.small_kind = getattr(small_exec, "kind", "layers") if small_exec is not None else None
        # a feature draft's keys and values of kept prompts too, where its caches move the same way
        self._prefix_small = (self.prefix_cache is not None and self.small_kind == "feature"
                              and self.runners["small"].kv_movable)
        self._static = (None if small_exec is None or draft_loop in ("eager", "native")
                        else StaticDraftLoop(self.runners["small"], max_batch_size, capture=draft_loop == "graph"))
        self._next_id = 0
        # Seconds spent drafting (small model + sampling) and verifying (large model + verify + rollback),
        # summed over steps; wall time minus both is the engine's own overhead. Benchmarks reset it.
        self.time_split = {"draft": 0.0, "verify": 0.0}
        # The fault flags a step's verification read with its verdicts ({model: rows}), until the scheduler takes
        # them (None: not read; the scheduler reads them itself)
        self.step_faults: dict[str, list[int]] | None = None
        self._scheduler = Scheduler(self)  # one running batch for every thread that calls generate/stream

    def _small_weights(self, small_weights, small, dtype, small_dtype) -> str | None:
        """"int8" or None, checked before any model loads. "auto" is int8 on a CPU when no dtype was asked
        for and this torch has the kernel: a draft step there is bound by reading its weights."""
        if small_weights not in ("auto", "int8", None):
            raise ValueError(f"small_weights must be 'auto', 'int8' or None, got {small_weights!r}")
        if small_weights == "auto":
            if small is None or self.device.type != "cpu" or dtype is not None or small_dtype is not None:
                return None
            try:
                check_int8_kernel(self.device, int8_activation_dtype())
            except ValueError:
                return None
            return "int8"
        if small_weights == "int8":
            if small is None:
                raise ValueError("small_weights='int8' quantises the small model, but none was given")
            if small_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"small_weights='int8' runs the small model in float32, bfloat16 or float16, "
                                 f"not {small_dtype}")
            check_int8_kernel(self.device, small_dtype or int8_activation_dtype())
        return small_weights

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
                 policy: Policy | None = None, *, chat_template: bool = False,
                 on_submit=None) -> list[RequestOutput]:
        """Generate for every prompt (a string, a list of token ids, or a conversation: a list of {"role", "content"}
        messages, put through the tokenizer's chat template); one RequestOutput each, in order. `params` is one
        SamplingParams for all prompts or a list with one per prompt.

        Safe to call from many threads at once: the requests join the engine's running batch at its next
        step (continuous batching) and leave it when done; a request's output does not depend on what
        else runs beside it. A request that cannot be served comes back with finish_reason "error" and
        `error` set (token_ids empty); one that ends early ("timeout", "cancelled", or "error" from a
        NaN/inf in a model's logits) keeps the tokens committed before; a timeout or fault says why in `error`.
        `on_submit`, if given, is called with the requests' ids once they are queued, before any step runs: another
        thread may then `cancel` them (a service whose client went away, say).
        """
        prompts = self._prompt_list(prompts)
        reqs = self._scheduler.submit(prompts, params, policy, chat_template)
        outputs = {}
        try:
            if on_submit is not None:
                on_submit([r.seq.request_id for r in reqs])
            for chunk in self._scheduler.chunks(reqs):
                if chunk.finished:
                    outputs[chunk.request_id] = chunk.output
        finally:
            for r in reqs:  # an exception (or KeyboardInterrupt) here must not leave requests running
                self._scheduler.cancel(r)
        return [outputs[r.seq.request_id] for r in reqs]

    @staticmethod
    def _prompt_list(prompts) -> list:
        """`generate`'s prompts as a list: one prompt given alone (a string, a list of token ids, or one conversation)
        as a list of one."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                              and isinstance(prompts[0], (int, dict)))  # ids, or one conversation
        return [prompts] if single else list(prompts)

    def stream(self, prompt, params: SamplingParams | None = None, policy: Policy | None = None,
               *, chat_template: bool = False) -> Iterator[StreamChunk]:
        """Yield the tokens of one request as they are committed; the last chunk carries the output.

        The request is submitted at the first `next()`. Closing the generator (or dropping it) cancels
        the request and frees its KV blocks at once; so does `cancel(chunk.request_id)` from any thread
        (the stream then ends with finish_reason "cancelled") or `SamplingParams(timeout_s=...)`.
        """
        yield from self.stream_many([prompt], params, policy, chat_template=chat_template)

    def stream_many(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                    policy: Policy | None = None, *, chat_template: bool = False,
                    on_submit=None) -> Iterator[StreamChunk]:
        """`stream` for several requests at once (`generate`'s arguments, `on_submit` too: it gets the requests' ids in
        the prompts' order): their chunks as each is committed, in the order they come, each naming its `request_id`;
        each request's last chunk carries its output. The requests join the running batch together; closing the
        generator (or dropping it) cancels those still running and frees their blocks at once."""
        reqs = self._scheduler.submit(self._prompt_list(prompts), params, policy, chat_template)
        try:
            if on_submit is not None:
                on_submit([r.seq.request_id for r in reqs])
            yield from self._scheduler.chunks(reqs)
        finally:
            for r in reqs:  # (an abandoned stream frees its blocks at once)
                self._scheduler.cancel(r)

    def cancel(self, request_id: int) -> bool:
        """End a waiting or running request (finish_reason "cancelled") and free its blocks before
        returning. False if no such request is in flight."""
        req = self._scheduler.find(request_id)
        return req is not None and self._scheduler.cancel(req)

    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """The large model's log-probability of each token of `continuation` following `prompt` (token
        ids): one prefill pass on a free row, for quality metrics such as NLL per token."""
        ids = list(prompt) + list(continuation)
        if not prompt or not continuation:
            raise ValueError("score: prompt and continuation must both be non-empty lists of token ids")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"score: token ids must be ints in [0, {self.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"score: {len(ids)} tokens exceed max_model_len={self.max_model_len}")
        large = self.runners["large"]
        with self._scheduler.exclusive():  # no step runs meanwhile: the row and blocks are ours until freed
            busy = set(large.blocks.active_rows())
            row = next((r for r in range(self.max_batch_size) if r not in busy), None)
            need = -(-len(ids) // self.block_size)
            if row is None or large.num_free_blocks() < need:
                raise ValueError("score: the engine has no free row or KV blocks right now")
            large.add(row)
            try:
                logits = large.extend([row], [ids], [len(continuation) + 1])[0, :-1]
                logits = logits if logits.dtype == torch.float64 else logits.float()  # (bf16 / fp16: in float32)
                faulty = row in large.take_nonfinite()
            finally:
                large.free(row)
        if faulty:
            raise ValueError("score: the large model produced non-finite logits (NaN or inf)")
        logp = torch.log_softmax(logits, -1)
        return logp.gather(1, torch.tensor(continuation, device=logp.device)[:, None])[:, 0].tolist()

    # ------------------------------------------------------------------------------------------
    def _check_policy(self, policy) -> Policy:
        policy = self.default_policy if policy is None else policy
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a bild_kernels policy (BiLD, Greedy, ...), got {type(policy).__name__}")
        if policy.uses_small and "small" not in self.runners:
            raise ValueError(f"policy {policy.name!r} needs a small model, but the engine has none")
        if policy.uses_small and not policy.drafts and self.small_kind == "feature":
            raise ValueError(f"policy {policy.name!r} runs the small model alone, but this one is a feature draft: "
                             "it reads the large model's hidden states and cannot generate by itself")
        if policy.drafter == "shallow":
            LayerGroups(self.runners["large"], policy.exit_layer)  # checks exit_layer against the model's depth
        return policy

    # ------------------------------------------------------------------------------------------
    def _worst_blocks(self, seq: Sequence, policy: Policy) -> int:
        """Blocks a request can ever hold: its whole output plus one draft run."""
        return -(-(seq.prompt_len + self._max_new(seq) + policy.max_run + 1) // self.block_size)

    def _step_blocks(self, seq: Sequence, policy: Policy) -> int:
        """Blocks a request may hold by the end of its next step: its tokens, one draft run past them and the token
        emitted on top (kv_admission="preempt" keeps them free for the running requests)."""
        return min(self._worst_blocks(seq, policy), -(-(len(seq.tokens) + policy.max_run + 1) // self.block_size))

    @staticmethod
    def _caches_of(policy: Policy) -> tuple[str, ...]:
        """The models whose caches a request of this policy fills."""
        if policy.uses_small and not policy.drafts:
            return ("small",)
        return ("large", "small") if policy.uses_small else ("large",)

    def _swap_out(self, seq: Sequence) -> dict:
        """Copies of each model's keys and values of the row's positions (preemption="swap"), before its blocks go."""
        out = {}
        for name, runner in self.runners.items():
            n = runner.blocks.context_lens_of([seq.row])[0]
            if n > 0:
                out[name] = (runner.read_kv(seq.row, n).to("cpu"), n)  # (a copy already: to() keeps a CPU one)
        return out

    def _swap_in(self, seq: Sequence) -> None:
        """Copy a swapped-out request's keys and values back into its new row, as they were."""
        for name, (kv, n) in seq.swapped.items():
            self.runners[name].write_kv(seq.row, kv, n)
        seq.swapped = None

    def _max_new(self, seq: Sequence) -> int:
        return min(seq.params.max_tokens, self.max_model_len - seq.prompt_len)

    def _admission_error(self, seq: Sequence, policy: Policy) -> str | None:
        error = policy.request_error(seq.params)
        if error:
            return error
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(seq.params, name)
            if n is not None and n > self.vocab_size:
                return f"{name}={n} asks for more alternatives than the vocabulary ({self.vocab_size}) has"
        if seq.params.prompt_logprobs is not None and (policy.drafter == "shallow"
                                                         or (policy.uses_small and not policy.drafts)):
            return (f"prompt_logprobs come from the large model's prefill: {policy.name} has none of its own "
                    f"(shallow-deep decoding and SmallOnly cannot give them)")
        bad = [t for t, _ in seq.params.logit_bias if t >= self.vocab_size]
        if bad:
            return f"logit_bias names token id {bad[0]}, outside the vocabulary [0, {self.vocab_size})"
        if seq.prompt_len >= self.max_model_len:
            return f"prompt has {seq.prompt_len} tokens; max_model_len={self.max_model_len} leaves no room to generate"
        if self._worst_blocks(seq, policy) > self.kv_cache_blocks:
            return (f"the KV cache ({self.kv_cache_blocks} blocks of {self.block_size} tokens) is too small for this "
                    f"request ({self._worst_blocks(seq, policy)} blocks needed)")
        return None

    def _finish(self, seq: Sequence, new: list[int]) -> str | None:
        """Apply stop conditions to the tokens just committed; truncate and return the reason."""
        out_start = seq.prompt_len
        first_new = len(seq.tokens) - len(new)
        limit = out_start + self._max_new(seq)
        stop_ids = {s for s in seq.params.stop if isinstance(s, int)}
        by_token = False  # (ended by EOS or a stop id: that token's text is not the output's, as in vLLM)
        for i in range(first_new, len(seq.tokens)):
            tok = seq.tokens[i]
            if i >= limit:
                del seq.tokens[i:]
                seq.finish_reason = "length"
                break
            if (tok in self.eos_ids and not seq.params.ignore_eos) or tok in stop_ids:
                del seq.tokens[i + 1:]
                seq.finish_reason = "eos" if tok in self.eos_ids and tok not in stop_ids else "stop"
                by_token = True
                break
        else:
            if len(seq.tokens) >= limit:
                seq.finish_reason = "length"
        del new[len(seq.tokens) - first_new:]
        stop_strs = [s for s in seq.params.stop if isinstance(s, str)]
        if stop_strs and self.tokenizer is not None:  # (also where a length limit, EOS or a stop id ended it after)
            if Detokenizer.truncate_at_stop(self.tokenizer, seq, stop_strs, first_new):
                del new[max(len(seq.tokens) - first_new, 0):]
                seq.finish_reason = "stop"
                by_token = False
        if by_token and self.tokenizer is not None and not seq.params.include_stop_str_in_output:
            seq.text_cut = Detokenizer.text_before_last(self.tokenizer, seq)
        seq.metrics.generated_tokens = len(seq.output_ids)
        seq.trim_logprobs()
        return seq.finish_reason

    def load(self) -> dict:
        """What the engine holds now (a snapshot, for monitoring): requests running and waiting (of those, the ones
        preempted, waiting to resume), each model's free KV blocks of kv_cache_blocks, and the prefix cache's positions
        and hits."""
        sch = self._scheduler
        with sch.cv:
            out = {"running": len(sch.running), "waiting": len(sch.waiting),
                   "preempted": sum(r.seq.metrics.preemptions > 0 for r in sch.waiting),
                   "kv_cache_blocks": self.kv_cache_blocks,
                   "free_kv_blocks": {name: r.num_free_blocks() for name, r in self.runners.items()}}
        pc = self.prefix_cache
        if pc is not None:
            out["prefix_cache"] = {"tokens": pc.tokens, "max_tokens": pc.max_tokens, "prompts": len(pc),
                                   "queries": pc.queries, "hits": pc.hits, "hit_tokens": pc.hit_tokens}
        return out

    def _output(self, seq: Sequence, detok: Detokenizer, error: str | None) -> RequestOutput:
        text = detok.text(seq) if error is None else None
        return RequestOutput(seq.request_id, seq.tokens[:seq.prompt_len], [] if error else seq.output_ids, text,
                             seq.finish_reason, seq.metrics, error, *seq.logprobs_of(0), seq.prompt_logprobs,
                             seq.prompt_top_logprobs)

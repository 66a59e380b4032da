"""One request's state as the engine steps it, and what it hands back."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from bild_kernels.engine.params import SamplingParams


@dataclass
class RequestMetrics:
    """Counters of one request; `Engine.aggregate` sums them over many."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt positions copied from the prefix cache instead of prefilled
    generated_tokens: int = 0
    large_passes: int = 0  # forward passes of the large model that included this request
    small_steps: int = 0  # forward passes of the small model that included this request
    prefill_chunks: int = 0  # passes over a chunk of the prompt alone before its first pass (Engine's prefill_chunk)
    drafted_tokens: int = 0  # tokens the small model proposed for verification
    accepted_tokens: int = 0  # drafted tokens the large model kept
    lookup_drafted_tokens: int = 0  # of the drafted tokens, those the n-gram lookup proposed (NGram, `lookup=`)
    lookup_accepted_tokens: int = 0  # of those, the ones the large model kept
    fallbacks: int = 0  # draft runs the small model ended itself (low confidence)
    rollbacks: int = 0  # verification passes that rejected at least one drafted token
    preemptions: int = 0  # times its KV blocks were taken back for others (Engine's kv_admission="preempt")
    accepted_lengths: Counter = field(default_factory=Counter)  # accepted tokens per verification -> count
    start_time: float = 0.0
    end_time: float = 0.0
    first_token_time: float = 0.0  # when the step that produced the first output token ended (0: none yet)
    scheduled_time: float = 0.0  # when it first got a row of the running batch (0: never)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        n = sum(self.accepted_lengths.values())
        return sum(k * c for k, c in self.accepted_lengths.items()) / n if n else 0.0

    @property
    def iterations_per_token(self) -> float:
        """Large-model passes per generated token (1.0 for plain decoding; lower is better)."""
        return self.large_passes / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def wall_time(self) -> float:
        return max(self.end_time - self.start_time, 0.0)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def time_to_first_token(self) -> float:
        """Seconds from the request's arrival to its first output token (its prompt's prefill, and any wait)."""
        return max(self.first_token_time - self.start_time, 0.0) if self.first_token_time else 0.0

    @property
    def queue_time(self) -> float:
        """Seconds from the request's arrival to its first row in the running batch (waiting for a row or blocks)."""
        return max(self.scheduled_time - self.start_time, 0.0) if self.scheduled_time else 0.0

    @property
    def time_per_output_token(self) -> float:
        """The decode phase's seconds per token after the first (vLLM's time per output token; 0 below two)."""
        return self.decode_time / (self.generated_tokens - 1) if self.generated_tokens > 1 else 0.0

    @property
    def decode_time(self) -> float:
        """Seconds from the first output token to the last: the decode phase, where speculation acts."""
        return max(self.end_time - self.first_token_time, 0.0) if self.first_token_time else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "large_passes": self.large_passes, "small_steps": self.small_steps,
            "drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens,
            "lookup_drafted_tokens": self.lookup_drafted_tokens, "lookup_accepted_tokens": self.lookup_accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "accepted_length_histogram": dict(sorted(self.accepted_lengths.items())),
            "fallbacks": self.fallbacks, "rollbacks": self.rollbacks, "preemptions": self.preemptions,
            "iterations_per_token": round(self.iterations_per_token, 4),
            "wall_time_s": round(self.wall_time, 6), "tokens_per_s": round(self.tokens_per_s, 2),
            "time_to_first_token_s": round(self.time_to_first_token, 6), "decode_time_s": round(self.decode_time, 6),
            "queue_time_s": round(self.queue_time, 6),
            "time_per_output_token_s": round(self.time_per_output_token, 6),
        }

    @staticmethod
    def aggregate(items) -> RequestMetrics:
        total = RequestMetrics()
        items = list(items)
        for m in items:
            for name in ("prompt_tokens", "cached_prompt_tokens", "generated_tokens", "large_passes", "small_steps",
                         "prefill_chunks", "drafted_tokens", "accepted_tokens", "lookup_drafted_tokens",
                         "lookup_accepted_tokens", "fallbacks", "rollbacks", "preemptions"):
                setattr(total, name, getattr(total, name) + getattr(m, name))
            total.accepted_lengths.update(m.accepted_lengths)
        if items:
            total.start_time = min(m.start_time for m in items)
            total.end_time = max(m.end_time for m in items)
        return total


@dataclass
class Drafts:
    """What one draft phase hands to verification, per running sequence (metadata, not state)."""

    tokens: list[list[int]]  # drafted (or guessed) ids
    probs: list[list] | None = None  # speculative sampling: the [V] distributions the drafts came from
    confidences: list[list[float]] | None = None  # calibration: max p_S of each drafted token
    unsure: list[tuple[int, float] | None] | None = None  # calibration: the discarded token, its max p_S
    looked_up: list[bool] | None = None  # per row: its drafts came from the n-gram lookup, not a model


@dataclass
class RequestOutput:
    """What `Engine.generate` returns per prompt. `error` is set when the request was refused (then
    token_ids is empty), timed out, was cancelled or hit a numeric fault (then token_ids holds what it
    committed before); the other requests of the batch are unaffected."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "length" | "stop" | "eos" | "error"
    metrics: RequestMetrics
    error: str | None = None
    # SamplingParams.logprobs: each output token's log-probability, and the top alternatives [(id, logprob)] at
    # its position (most likely first); None when not asked for
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # SamplingParams.prompt_logprobs: the same for each prompt token (None at the first, which nothing predicts)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class StreamChunk:
    """A piece of a streamed request: the tokens committed in one step and their text."""

    request_id: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    output: RequestOutput | None = None  # set on the last chunk
    logprobs: list[float] | None = None  # the chunk's tokens' (SamplingParams.logprobs)
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Sequence:
    """A request in flight. `tokens` = prompt + committed output. Each model's KV cache holds a
    prefix of `tokens` (plus, transiently, drafted tokens); `cached[model]` counts it."""

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_len = len(prompt_ids)
        self.tokens = list(prompt_ids)
        self.params = params
        self.row = -1  # row in the block tables, -1 while waiting
        # Shallow-deep decoding: "large" counts the shallow layer group, "deep" the deep one.
        self.cached = {"large": 0, "small": 0, "deep": 0}
        self.hidden: list = []  # shallow-deep: residual streams entering the deep layers, of the pending tokens
        # A feature draft: the large model's last hidden states [n, H] of the positions from cached["small"] on
        # (every verified position the draft has not been fed yet), in chunks.
        self.features: list = []
        self.pass_features = None  # (first position, hidden [n, H]) of the large model's last pass, until verified
        # Prefix caching: the large model's hidden states at the prompt's positions (chunks, with a feature draft),
        # until the prompt is kept after its first pass
        self.prompt_features: list | None = None
        self.small_kept = False  # the feature draft's keys and values of the prompt went to the prefix cache
        self.guesses: list[int] = []  # Jacobi: the last pass's predictions past the committed tokens
        self.ngram = None  # NGram / a policy's `lookup`: the NGramIndex of `tokens`, built on first use
        # SamplingParams' penalties: `tokens` as an int64 host tensor (in a head's columns), grown as tokens commit
        self.penalty_history: dict = {}
        self.guide = None  # SamplingParams.structured_outputs: a structured.guide.Guide at the committed output
        self.fault: str | None = None  # why this request fails after the step (a logits processor raised)
        self.iteration = 0  # verification rounds so far: addresses this request's random numbers
        # Preempted (its KV blocks taken back) after its first pass, to recompute: once re-admitted, its caches are
        # rebuilt from `tokens` (all but the last, as a step leaves them: `prefill_chunks`) before it steps on
        self.resumed = False
        self.swapped: dict | None = None  # preempted by swapping: {model: (keys and values [layers, 2, n, H, D], n)}
        self.finish_reason: str | None = None
        self.metrics = RequestMetrics(prompt_tokens=len(prompt_ids), start_time=time.perf_counter())
        self.text_len = 0  # characters of output text already streamed
        self.text_cut: int | None = None  # a stop string's start in the output text, where the text ends
        # SamplingParams.logprobs: per output token, its log-probability and the top alternatives at its position
        self.logprobs: list[float] | None = None if params.logprobs is None else []
        self.top_logprobs: list[list[tuple[int, float]]] | None = None if params.logprobs is None else []
        self.prompt_logprobs: list | None = None  # SamplingParams.prompt_logprobs, once the prefill has run
        self.prompt_top_logprobs: list | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def trim_logprobs(self) -> None:
        """Drop the log-probabilities of tokens the stop conditions (or a fault) took back."""
        if self.logprobs is not None:
            n = len(self.tokens) - self.prompt_len
            del self.logprobs[n:], self.top_logprobs[n:]

    def logprobs_of(self, start: int, end: int | None = None) -> tuple[list | None, list | None]:
        """(logprobs, top_logprobs) of output tokens [start, end), or (None, None) when not asked for."""
        if self.logprobs is None:
            return None, None
        return self.logprobs[start:end], self.top_logprobs[start:end]

    def evict(self, swapped: dict | None = None) -> None:
        """Its blocks were freed (preempted). swapped: each model's keys and values of its positions, copied out, to be
        copied back at re-admission (everything else as it was); None: forget what the caches held, and recompute
        them from `tokens` once re-admitted. What was committed, and everything that addresses it (iteration,
        penalties, guide, n-gram index), stays either way."""
        self.metrics.preemptions += 1
        if swapped is not None:
            self.swapped = swapped
            return
        self.cached = dict.fromkeys(self.cached, 0)
        self.hidden, self.features, self.pass_features, self.prompt_features = [], [], None, None
        self.resumed = self.metrics.large_passes > 0 or self.metrics.small_steps > 0

    def pending(self, model: str) -> list[int]:
        """Committed tokens the model has not cached yet (at least the last one)."""
        return self.tokens[self.cached[model]:]

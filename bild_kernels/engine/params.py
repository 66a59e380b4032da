"""Request-level parameters: how to sample, when to stop."""
from __future__ import annotations

from dataclasses import dataclass, field

from bild_kernels.structured import StructuredOutputs

MAX_LOGPROBS = 20  # alternatives per position that SamplingParams.logprobs may ask for (as OpenAI's chat API)
MAX_LOGIT_BIAS = 1024  # token ids one request's logit_bias may name (each kernel pass compares a column with them all)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request (the large model's distribution is the target).

    temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters; `min_p` (0: off; in [0, 1]) keeps only
    the tokens whose probability, after temperature, is at least min_p times the most likely one's (the min-p of
    vLLM, Hugging Face and llama.cpp); a token must pass each filter. `seed` makes sampling
    reproducible whatever else is in the batch. `stop` holds strings and/or token ids that end the
    request: a stop id is the last output token (its text, like EOS's, is not the output's text); a stop string ends
    the text where it begins (the output's token ids end with the token that completed it, as vLLM's do, and a stream
    holds back a tail that could be its start); the tokenizer's EOS ends it unless `ignore_eos`.
    `include_stop_str_in_output` (vLLM's) ends the text after the stop string, stop id or EOS instead;
    `skip_special_tokens` (True, vLLM's default) leaves special tokens (EOS, chat markers) out of the text.
    `timeout_s` bounds the request's whole life from submission (waiting included): past it the request
    ends with finish_reason "timeout", keeps the tokens committed so far, and its KV blocks are freed.
    `logprobs` (None: none) returns, for each output token, its log-probability under the model that decided it
    (the large model; the small one under `SmallOnly()`), and with logprobs = n > 0 the n most likely tokens at that
    position with theirs: the model's own log-softmax, before temperature and the filters (vLLM's "raw" logprobs).
    `prompt_logprobs` (None: none) does the same for the prompt's tokens under the large model (the first has none:
    None), from the request's own prefill pass, which then runs over the whole prompt (no prefix cache hit);
    not with `SmallOnly()` or shallow-deep decoding.
    `repetition_penalty` (1.0: off; > 0) divides the large model's positive logits (multiplies its negative ones) of
    every token the prompt or the output holds so far (Hugging Face's and vLLM's rule); `presence_penalty` and
    `frequency_penalty` (0: off; in [-2, 2]) subtract from the logit of every token the output holds, once / once per
    occurrence (OpenAI's rule); `min_tokens` (0: off; <= max_tokens) holds back EOS (unless `ignore_eos`) and the
    stop token ids until the output has that many tokens, and stop strings do not end it before. They shape the large
    model's distribution, the one every policy verifies against (drafts count as output at the positions after
    them), so `Greedy()` stays exact against the penalised greedy text and `SpeculativeSampling()` samples the
    penalised distribution; not with `SmallOnly()`, which verifies nothing. `logprobs` stay the raw ones.
    `logit_bias` ({token id: bias in [-100, 100]}, OpenAI's; empty: off) is added to those ids' logits first, as
    vLLM does; it is kept as (id, bias) pairs sorted by id.
    `structured_outputs` (None: off; a `StructuredOutputs`, or a dict of its fields) holds the output text to a
    regular expression, a JSON Schema, a list of choices or any JSON object (vLLM's structured outputs): the large
    model's distribution is masked to the tokens that keep the text on the pattern, at every position it verifies,
    so every policy keeps to the constrained distribution; the request ends (EOS) once nothing may follow. Not with
    `ignore_eos` or `min_tokens` (the pattern decides where the text ends), nor `SmallOnly()`.
    `allowed_token_ids` (None: all; vLLM's) keeps the large model's distribution to those ids (EOS only if listed), and
    `bad_words` (strings; vLLM's) bans the last token of each word's token sequence (the word as written and after a
    space) wherever the output's last tokens are the rest of it: both mask the distribution every policy verifies
    against, as structured outputs do (and beside them); where the bad words would leave no allowed token, they give
    way. Not with `SmallOnly()`.
    `logits_processors` (vLLM's): functions f(output_ids, logits) or f(prompt_ids, output_ids, logits) -> logits on
    the large model's logits row at every position it verifies (the output so far plus the drafts before that position
    as output_ids), after the penalties and masks, in order: every policy verifies against what they return, so
    `Greedy()` is exactly the processed greedy text. One that raises fails its request alone. Not with `SmallOnly()`.
    `truncate_prompt_tokens` (None: off; an int >= 1, vLLM's) keeps only the prompt's last that many tokens (after its
    chat template): a long conversation's oldest turns give way instead of the request failing as too long.
    `priority` (0; any int, the lower the sooner, vLLM's convention): waiting requests are admitted in priority order
    (arrival order among equals); under Engine(kv_admission="preempt") a request that finds no free blocks or batch
    row preempts running requests of a later priority (the latest admitted first) when that lets it in, and a pool
    running short preempts the latest priority first. A later priority may wait as long as earlier ones keep coming.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple = field(default_factory=tuple)
    ignore_eos: bool = False
    timeout_s: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple = ()
    min_p: float = 0.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    priority: int = 0
    allowed_token_ids: tuple | None = None
    bad_words: tuple = ()
    logits_processors: tuple = ()
    truncate_prompt_tokens: int | None = None

    def __post_init__(self):
        bias = self.logit_bias
        if isinstance(bias, dict):
            bias = bias.items()
        if bias is None:
            bias = ()
        try:
            pairs = [(i, b) for i, b in bias]
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must be a dict {{token id: bias}} (or (id, bias) pairs), got {bias!r}") \
                from None
        pairs.sort(key=lambda x: x[0] if isinstance(x[0], int) else -1)  # (a bad key is reported by validate)
        object.__setattr__(self, "logit_bias", tuple(pairs))
        object.__setattr__(self, "structured_outputs", StructuredOutputs.of(self.structured_outputs))
        if isinstance(self.logits_processors, list) or callable(self.logits_processors):
            fns = self.logits_processors
            object.__setattr__(self, "logits_processors", (fns,) if callable(fns) else tuple(fns))
        for name in ("allowed_token_ids", "bad_words"):
            v = getattr(self, name)
            if isinstance(v, (list, set, frozenset)):
                object.__setattr__(self, name, tuple(sorted(v)) if name == "allowed_token_ids" else tuple(v))
            elif isinstance(v, str) and name == "bad_words":
                object.__setattr__(self, name, (v,))
        if isinstance(self.stop, (str, int)):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    @property
    def guided(self) -> bool:
        """Whether the large model's distribution is masked by a Guide (structured outputs, allowed ids, bad words)."""
        return self.structured_outputs is not None or self.allowed_token_ids is not None or bool(self.bad_words)

    @property
    def penalized(self) -> bool:
        """Whether the large model's logits need `ops.apply_penalties` (a logit bias, a penalty or min_tokens)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0 or bool(self.logit_bias))

    def validate(self) -> None:
        a = self.allowed_token_ids
        if a is not None and (not isinstance(a, tuple) or not a
                              or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in a)):
            raise ValueError(f"allowed_token_ids must be None or a non-empty list of token ids (ints >= 0), got {a!r}")
        if not isinstance(self.bad_words, tuple) or any(not isinstance(w, str) or not w.strip()
                                                        for w in self.bad_words):
            raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"truncate_prompt_tokens must be None or an int >= 1, got {k!r}")
        if not isinstance(self.logits_processors, tuple):
            raise ValueError(f"logits_processors must be a list of callables, got {self.logits_processors!r}")
        from bild_kernels.engine.processing import arity
        for fn in self.logits_processors:
            arity(fn)
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority must be an int (the lower, the sooner), got {self.priority!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1] (0 disables), got {self.min_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        t = self.timeout_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")):
            raise ValueError(f"timeout_s must be a positive number of seconds (or None), got {t!r}")
        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(self, name)
            if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}] (the top alternatives "
                                 f"returned beside each token's own), got {lp!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 is off), got {r!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not -2 <= x <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 is off), got {x!r}")
        m = self.min_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {m!r}")
        ids = [i for i, _ in self.logit_bias]
        if len(ids) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias names {len(ids)} token ids; at most {MAX_LOGIT_BIAS}")
        for i, x in self.logit_bias:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {i!r}")
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not -100 <= x <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {x!r} for token {i}")
        if len(set(ids)) != len(ids):
            raise ValueError("logit_bias names a token id twice")
        if self.structured_outputs is not None and (self.ignore_eos or self.min_tokens):
            raise ValueError("structured_outputs decides where the text ends: not with ignore_eos or min_tokens")
        for s in self.stop:
            if isinstance(s, bool) or not isinstance(s, (str, int)) or s == "" or (isinstance(s, int) and s < 0):
                raise ValueError(f"stop entries must be non-empty strings or token ids >= 0, got {s!r}")

"""The engine's one scheduler: any number of threads submit requests, one running batch serves them all.

Continuous batching without a background thread: a thread that waits for its requests' chunks steps the
whole engine when no other thread is stepping ("whoever waits, steps"). One engine iteration admits
waiting requests (FIFO: the head is admitted once its next step fits in the free KV blocks; when the running
requests' next steps do not fit, the one admitted last is preempted back to the head of the queue, its keys and
values swapped out or to be recomputed; with Engine(kv_admission="reserve") each request reserves its worst case
instead and is never preempted), steps each policy group of the running batch in turn, and hands every request's
chunks to its own queue. A thread never steps across a `yield`, so a paused stream stalls nobody; its chunks wait
in its queue while the others step.

Requests end in one of these ways, each freeing the request's blocks before anyone can see it end:
  "length" | "stop" | "eos"   stop conditions (Engine._finish)
  "error"                     refused at submission (empty tokens), or a NaN/inf in a model's logits
                              for that row (the tokens committed before it are kept)
  "timeout"                   past SamplingParams.timeout_s (checked before and after every step)
  "cancelled"                 Engine.cancel, or a stream closed / garbage-collected by its consumer
Any other exception raised by a step ends that step's policy group: its requests are freed and the
exception is re-raised in each of their consumers; the other groups go on.

Lock order: `cv` (the queues and lists), then `tok_lock` (the tokenizer is not shared across threads).
Only the stepping thread touches the block tables; `cancel` and `exclusive` wait for it to stop.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from bild_kernels.engine.guiding import make_guide
from bild_kernels.engine.params import SamplingParams
from bild_kernels.engine.policies import Policy
from bild_kernels.engine.runner import take_nonfinite
from bild_kernels.engine.sequence import RequestOutput, Sequence, StreamChunk
from bild_kernels.engine.tokenizer import Detokenizer, resolve_prompts
from bild_kernels.ops import trusted_inputs


@dataclass(eq=False)
class Request:
    """A submitted request: its sequence, its policy, and the queue its consumer reads."""

    seq: Sequence
    policy: Policy
    deadline: float | None
    chunks: deque = field(default_factory=deque)  # StreamChunk, or the exception that ended the request
    end: str | None = None  # "cancelled" | "timeout": to be ended at the next reap
    done: bool = False


def _guides(eng, params: list[SamplingParams], tok_lock) -> list[tuple]:
    """Each request's (Guide or None, why it cannot have one or None): SamplingParams.structured_outputs,
    allowed_token_ids and bad_words."""
    out, made = [], {}
    for p in params:
        if not p.guided:
            out.append((None, None))
            continue
        key = id(p)
        if key not in made:  # (one SamplingParams for many prompts: the guides share a grammar, not a state)
            try:
                made[key] = make_guide(eng, p, tok_lock)
            except ValueError as e:
                made[key] = (None, f"structured_outputs: {e}")
        guide, why = made[key]
        out.append((None, why) if guide is None else (guide.copy(), None))
    return out


def _order(req: Request) -> tuple[int, int]:
    """A waiting request's place in the queue: its priority, then its arrival."""
    return req.seq.params.priority, req.seq.request_id


def _group_key(policy: Policy):
    # Equal fixed policies share a batch; a calibrated one carries its own state, so it steps alone.
    if policy.calibration is not None:
        return id(policy)
    try:
        return hash(policy), policy
    except TypeError:
        return id(policy)


class Scheduler:
    def __init__(self, engine):
        self.engine = engine
        self.detok = Detokenizer(engine.tokenizer)
        self.cv = threading.Condition()
        self.tok_lock = threading.RLock()
        self.waiting: list[Request] = []  # in admission order: by priority, then arrival (`_wait`)
        self.running: list[Request] = []
        self.stepper: int | None = None  # ident of the thread stepping (or otherwise owning the tables) now
        self.next_id = 0

    # -- submission ---------------------------------------------------------------------------------
    def submit(self, prompts, params, policy, chat_template) -> list[Request]:
        """Validate and enqueue; a request refused here is already finished (error chunk queued)."""
        eng = self.engine
        params = SamplingParams() if params is None else params
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: got {len(params)} SamplingParams for {len(prompts)} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
        policy = eng._check_policy(policy)
        with self.tok_lock:
            resolved = list(resolve_prompts(prompts, eng.tokenizer, eng.vocab_size, chat_template))
        guides = _guides(eng, params, self.tok_lock)  # (before the lock the stepping thread needs: a new pattern's
        now = time.perf_counter()                      # grammar takes a moment to build)
        reqs = []
        with self.cv:
            for (ids, error), p, (guide, why) in zip(resolved, params, guides):
                if ids and p.truncate_prompt_tokens is not None:
                    ids = ids[-p.truncate_prompt_tokens:]  # (vLLM's left truncation)
                seq = Sequence(self.next_id, ids or [], p)
                seq.guide = guide
                self.next_id += 1
                req = Request(seq, policy, None if p.timeout_s is None else now + p.timeout_s)
                error = error or eng._admission_error(seq, policy) or why
                if error:
                    seq.finish_reason = "error"
                    seq.metrics.end_time = seq.metrics.start_time
                    req.chunks.append(StreamChunk(seq.request_id, [], "", True, "error",
                                                  eng._output(seq, self.detok, error), *seq.logprobs_of(0)))
                    req.done = True
                else:
                    self._wait(req)
                reqs.append(req)
            self.cv.notify_all()
        return reqs

    # -- consumption --------------------------------------------------------------------------------
    def chunks(self, reqs: list[Request]) -> Iterator[StreamChunk]:
        """Yield the chunks of `reqs` as they come, stepping the engine whenever nobody else is."""
        left = list(reqs)
        while left:
            ready, step = [], False
            with self.cv:
                for r in left:
                    while r.chunks:
                        ready.append((r, r.chunks.popleft()))
                if not ready:
                    if self.stepper is None:
                        self.stepper, step = threading.get_ident(), True
                    else:
                        self.cv.wait()  # the stepper notifies after every step
                        continue
            if step:
                try:
                    self._step_all()
                finally:
                    with self.cv:
                        self.stepper = None
                        self.cv.notify_all()
                continue
            for r, c in ready:
                if isinstance(c, BaseException):
                    left.remove(r)
                    raise c
                if c.finished:
                    left.remove(r)
                yield c

    def cancel(self, req: Request, reason: str = "cancelled") -> bool:
        """End `req` and free its blocks before returning (unless called from inside a step, e.g. by the
        garbage collector: then at the end of that step). False if it had already ended."""
        with self.cv:
            if req.done:
                return False
            req.end = req.end or reason
            if self.stepper == threading.get_ident():
                return True
            while self.stepper is not None and not req.done:
                self.cv.wait()
            if not req.done:  # nobody steps, and nobody can start while we hold cv
                # Act as the stepper while reaping: a cancel that the garbage collector runs meanwhile in
                # this thread (an abandoned stream) then only marks its request, and is reaped below.
                self.stepper = threading.get_ident()
                try:
                    while any(r.end is not None and not r.done for r in (*self.waiting, *self.running)):
                        self._reap()
                finally:
                    self.stepper = None
                self.cv.notify_all()
            return True

    def find(self, request_id: int) -> Request | None:
        with self.cv:
            return next((r for r in (*self.waiting, *self.running) if r.seq.request_id == request_id), None)

    @contextmanager
    def exclusive(self):
        """Own the block tables (no step runs meanwhile), for work outside the batch such as scoring."""
        me = threading.get_ident()
        with self.cv:
            if self.stepper == me:
                raise RuntimeError("the engine cannot be re-entered from inside its own step")
            while self.stepper is not None:
                self.cv.wait()
            self.stepper = me
        try:
            yield
        finally:
            with self.cv:
                self.stepper = None
                self.cv.notify_all()

    # -- stepping (only the thread in self.stepper) ---------------------------------------------------
    def _step_all(self) -> None:
        eng = self.engine
        with self.cv:
            self._reap()
            self._admit()
            groups: dict = {}
            for r in self.running:
                groups.setdefault(_group_key(r.policy), []).append(r)
            self.cv.notify_all()
            if not groups:
                if self.waiting:  # cannot happen: admission refuses what would never fit an empty batch
                    raise RuntimeError("scheduler: requests wait but none can be admitted into an empty batch")
                return
        for group in groups.values():
            try:
                with trusted_inputs():  # every request was checked at admission: no device reads in the ops
                    committed = eng._step([r.seq for r in group], group[0].policy)
                faulted = self._take_faults()
                if eng.prefix_cache is not None:  # a prompt just prefilled is kept before its row can be freed
                    for r in group:
                        if r.seq.row not in faulted:
                            eng._prefix_store(r.seq, r.policy)
            except BaseException as exc:
                self._take_faults()
                with self.cv:
                    for r in group:
                        self._end(r, "error", f"the engine step failed: {type(exc).__name__}: {exc}", exc)
                    self.cv.notify_all()
                if not isinstance(exc, Exception):
                    raise
                continue
            with self.cv, self.tok_lock:
                for r, new in zip(group, committed):
                    # a logits processor failed, or a model's logits went NaN / inf: the request ends before the
                    # tokens drawn from this step
                    if r.seq.fault is not None or r.seq.row in faulted:
                        del r.seq.tokens[len(r.seq.tokens) - len(new):]
                        r.seq.trim_logprobs()
                        self._end(r, "error", r.seq.fault or f"the {faulted[r.seq.row]} model produced non-finite "
                                  f"logits (NaN or inf) after {len(r.seq.output_ids)} output tokens")
                        continue
                    if new and not r.seq.metrics.first_token_time:
                        r.seq.metrics.first_token_time = time.perf_counter()
                    reason = eng._finish(r.seq, new)
                    text = self.detok.delta(r.seq)
                    n_out = len(r.seq.output_ids)
                    lps = r.seq.logprobs_of(n_out - len(new), n_out)
                    if reason:
                        self._release(r)
                        r.seq.metrics.end_time = time.perf_counter()
                        r.chunks.append(StreamChunk(r.seq.request_id, new, text, True, reason,
                                                    eng._output(r.seq, self.detok, None), *lps))
                        r.done = True
                    elif new:
                        r.chunks.append(StreamChunk(r.seq.request_id, new, text, False, None, None, *lps))
                self.cv.notify_all()
        with self.cv:
            self._reap()

    def _take_faults(self) -> dict[int, str]:
        """The rows whose logits went NaN / inf in the step, by the first model that noted them: as the step's
        verification read them with its verdicts (`step_faults`), else in one host read."""
        eng, faulted = self.engine, {}
        read, eng.step_faults = eng.step_faults, None
        names, runners = zip(*eng.runners.items())
        rows_of = [read[n] for n in names] if read is not None else take_nonfinite(list(runners))
        for name, rows in zip(names, rows_of):
            for row in rows:
                faulted.setdefault(row, name)
        return faulted

    def _wait(self, req: Request) -> None:
        """Queue `req` in admission order: by priority, then by arrival (a preempted request goes back to its place:
        before every later arrival of its priority)."""
        bisect.insort(self.waiting, req, key=_order)

    def _admit(self) -> None:
        if self.engine.kv_admission == "reserve":
            self._admit_reserving()
            return
        spare = self._make_room()
        eng = self.engine
        # vLLM's watermark: a newcomer leaves ~1% of the pool free beside a running batch, so that it is not preempted
        # again at the next block boundary of the requests before it
        watermark = eng.kv_cache_blocks // 100
        while self.waiting:
            req = self.waiting[0]
            need = eng._step_blocks(req.seq, req.policy)
            names = eng._caches_of(req.policy)
            want = need + (watermark if self.running else 0)
            if len(self.running) >= eng.max_batch_size or any(want > spare[n] for n in names):
                if not self._preempt_for(req, want, names, spare):
                    break  # the head (a preempted request first) waits for blocks, and nobody overtakes it
                spare = self._spare()
                continue
            self._start(req)
            for n in names:
                spare[n] -= need

    def _holds(self, r: Request):
        """(cache, blocks the running request `r` holds in it, blocks it may hold by the end of its next step), for
        each cache its policy fills."""
        eng = self.engine
        bound = eng._step_blocks(r.seq, r.policy)
        for name in eng._caches_of(r.policy):
            yield name, eng.runners[name].blocks.blocks_held([r.seq.row])[0], bound

    def _spare(self) -> dict[str, int]:
        """The blocks each cache has free beyond what the running requests' next steps may take."""
        spare = {name: r.num_free_blocks() for name, r in self.engine.runners.items()}
        for r in self.running:
            for name, held, bound in self._holds(r):
                spare[name] -= max(0, bound - held)
        return spare

    def _make_room(self) -> dict[str, int]:
        """Preempt running requests, the latest priority and the latest admitted first, until every running request's
        next step fits in the free blocks (kv_admission="preempt"); the last one is never preempted (its worst case
        fits the pool). Returns `_spare()`."""
        while True:
            spare = self._spare()
            if len(self.running) <= 1 or min(spare.values()) >= 0:
                return spare
            self._preempt(self._victim())

    def _victim(self) -> Request:
        """The running request to preempt first: of the latest priority, the one admitted last."""
        i = max(range(len(self.running)), key=lambda i: (self.running[i].seq.params.priority, i))
        return self.running[i]

    def _preempt_for(self, req: Request, need: int, names, spare: dict[str, int]) -> bool:
        """Preempt the running requests of a later priority than `req` (the latest first) if that lets it in: a batch
        row and `need` blocks in each of its caches. False, preempting nobody, if it would not."""
        later = [r for r in self.running if r.seq.params.priority > req.seq.params.priority]
        if not later:
            return False
        freed = dict.fromkeys(spare, 0)  # a preempted request gives back its blocks and what its next step would take
        for r in later:
            for name, held, bound in self._holds(r):
                freed[name] += max(bound, held)
        if any(need > spare[n] + freed[n] for n in names):
            return False
        self._preempt(self._victim())
        return True

    def _preempt(self, victim: Request) -> None:
        eng = self.engine
        swapped = eng._swap_out(victim.seq) if eng.preemption == "swap" else None
        self._release(victim)
        victim.seq.evict(swapped)
        self._wait(victim)

    def _admit_reserving(self) -> None:
        eng = self.engine
        used = sum(eng._worst_blocks(r.seq, r.policy) for r in self.running)
        while self.waiting and len(self.running) < eng.max_batch_size:  # (by priority, then arrival)
            req = self.waiting[0]
            need = eng._worst_blocks(req.seq, req.policy)
            if used + need > eng.kv_cache_blocks:
                break  # FIFO: the head waits for blocks, and nobody overtakes it (no starvation)
            self._start(req)
            used += need

    def _start(self, req: Request) -> None:
        eng = self.engine
        self.waiting.pop(0)
        if not req.seq.metrics.scheduled_time:
            req.seq.metrics.scheduled_time = time.perf_counter()
        req.seq.row = min(set(range(eng.max_batch_size)) - {r.seq.row for r in self.running})
        for runner in eng.runners.values():
            runner.add(req.seq.row)
        self.running.append(req)
        if req.seq.swapped is not None:
            eng._swap_in(req.seq)
        else:
            eng._prefix_restore(req.seq, req.policy)

    def _reap(self) -> None:
        now = time.perf_counter()
        for r in (*self.waiting, *self.running):
            if r.end is None and r.deadline is not None and now >= r.deadline:
                r.end = "timeout"
            if r.end == "timeout":
                self._end(r, "timeout", f"timed out after {r.seq.params.timeout_s} s")
            elif r.end is not None:
                self._end(r, r.end, None)

    def _release(self, r: Request) -> None:
        if r in self.running:
            for runner in self.engine.runners.values():
                runner.free(r.seq.row)
            self.running.remove(r)
            r.seq.row = -1
        elif r in self.waiting:
            self.waiting.remove(r)

    def _end(self, r: Request, reason: str, error: str | None, exc: BaseException | None = None) -> None:
        """End a request early (cancel, timeout, fault): free its blocks, queue its last chunk."""
        self._release(r)
        seq = r.seq
        seq.finish_reason = reason
        seq.metrics.generated_tokens = len(seq.output_ids)
        seq.metrics.end_time = time.perf_counter()
        if exc is not None:
            r.chunks.append(exc)
        else:
            with self.tok_lock:
                text = self.detok.text(seq)
                tail = self.detok.delta(seq)  # what the stream held back (a stop string's possible start), now final
            out = RequestOutput(seq.request_id, seq.tokens[:seq.prompt_len], seq.output_ids, text, reason,
                                seq.metrics, error, *seq.logprobs_of(0), seq.prompt_logprobs, seq.prompt_top_logprobs)
            r.chunks.append(StreamChunk(seq.request_id, [], tail, True, reason, out, *seq.logprobs_of(0, 0)))
        r.done = True

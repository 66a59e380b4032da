"""Engine(kv_admission="preempt"): requests are admitted on what their next step needs, and when the pool runs short
the one admitted last gives its blocks back and recomputes its keys and values when re-admitted. A preempted
request's tokens, log-probabilities and stream are what it gives alone; no block leaks; the oldest request always
goes on; "reserve" keeps the worst-case reservation."""
import random
import threading

import pytest

from bild_kernels import (BiLD, Greedy, Jacobi, LargeOnly, SamplingParams, ShallowDeep, SmallOnly,
                          SpeculativeSampling)
from bild_kernels.engine.policies import NGram
from bild_kernels.structured import StructuredOutputs
from tests.conftest import requires_gpu

from .conftest import assert_all_free, hf_greedy, tiny_engine
from .test_feature_draft_engine import pair as feature_pair  # noqa: F401  (the module's feature-draft fixture)
from .test_feature_draft_engine import _engine as feature_engine

POLICIES = [LargeOnly(), Greedy(max_draft_len=3), BiLD(fallback_threshold=0.4, rollback_threshold=2.0, max_draft_len=4),
            SpeculativeSampling(max_draft_len=3), Jacobi(block_size=3), ShallowDeep(exit_layer=2), SmallOnly(),
            NGram(max_draft_len=3, max_ngram=2, min_ngram=1),
            Greedy(max_draft_len=2, lookup=NGram(max_draft_len=3, max_ngram=2, min_ngram=1))]
IDS = ["large-only", "greedy", "bild", "speculative-sampling", "jacobi", "shallow-deep", "small-only", "ngram",
       "greedy-lookup"]
MODES = ["swap", "recompute"]  # what a preempted request keeps (Engine's preemption)


def _items(n, seed, sampled=True, **kw):
    rng = random.Random(seed)
    return [([rng.randrange(97) for _ in range(rng.randint(1, 12))],
             SamplingParams(max_tokens=rng.randint(12, 36), temperature=0.9 if sampled and rng.random() < 0.5 else 0.0,
                            seed=rng.randrange(1000), **kw))
            for _ in range(n)]


def _solo(engine, items, policy):
    return [engine.generate([p], s, policy=policy)[0] for p, s in items]


def _close(got, want):
    """Log-probability lists (floats, None, or (id, logprob) lists) equal up to float64 rounding (batch shapes)."""
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-9)
    else:
        assert got == want


def _same(got, want):
    for g, w in zip(got, want):
        assert g.error is None and g.token_ids == w.token_ids
        _close([g.logprobs, g.top_logprobs, g.prompt_logprobs, g.prompt_top_logprobs],
               [w.logprobs, w.top_logprobs, w.prompt_logprobs, w.prompt_top_logprobs])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_preempted_requests_give_what_they_give_alone(large_model, small_model, policy, mode):
    # 16 blocks of 4 tokens for 8 requests that grow to 48 tokens at most: they cannot all stay
    items = _items(8, 3, sampled=policy.name not in ("jacobi", "ngram"), logprobs=2)
    want = _solo(tiny_engine(large_model, small_model, max_batch_size=8), items, policy)
    eng = tiny_engine(large_model, small_model, max_batch_size=8, kv_cache_blocks=16, preemption=mode)
    assert eng.preemption == mode
    got = eng.generate([p for p, _ in items], [s for _, s in items], policy=policy)
    _same(got, want)
    assert sum(o.metrics.preemptions for o in got) > 0
    assert got[0].metrics.preemptions == 0  # the oldest request always goes on
    assert eng._scheduler.running == [] and not eng._scheduler.waiting
    assert_all_free(eng)


def test_reserve_admits_by_worst_case_and_never_preempts(large_model, small_model):
    items = _items(6, 4, sampled=False)
    policy = Greedy(max_draft_len=3)
    want = _solo(tiny_engine(large_model, small_model, max_batch_size=8), items, policy)
    sizes = {}
    for mode in ("reserve", "preempt"):
        eng = tiny_engine(large_model, small_model, max_batch_size=8, kv_cache_blocks=24, kv_admission=mode)
        seen, step = [], eng._step
        eng._step = lambda running, pol: seen.append(len(running)) or step(running, pol)
        got = eng.generate([p for p, _ in items], [s for _, s in items], policy=policy)
        _same(got, want)
        sizes[mode] = max(seen)
        if mode == "reserve":
            assert all(o.metrics.preemptions == 0 for o in got)
        assert_all_free(eng)
    # worst cases of 13 to 52 positions (4 to 13 blocks): at most three at a time in 24 blocks; on what their next
    # steps need, all six
    assert sizes == {"reserve": 3, "preempt": 6}


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_prompt_logprobs_and_penalties_survive_preemption(large_model, small_model, mode):
    rng = random.Random(9)
    items = [([rng.randrange(97) for _ in range(rng.randint(10, 20))],
              SamplingParams(max_tokens=20, logprobs=1, prompt_logprobs=2, repetition_penalty=1.3,
                             presence_penalty=0.4, min_tokens=3, seed=i, temperature=0.8 if i % 2 else 0.0))
             for i in range(6)]
    for policy in (Greedy(max_draft_len=3), SpeculativeSampling(max_draft_len=2)):
        want = _solo(tiny_engine(large_model, small_model, max_batch_size=6, prefill_chunk=4), items, policy)
        eng = tiny_engine(large_model, small_model, max_batch_size=6, kv_cache_blocks=20, prefill_chunk=4,
                          preemption=mode)
        got = eng.generate([p for p, _ in items], [s for _, s in items], policy=policy)
        _same(got, want)
        assert sum(o.metrics.preemptions for o in got) > 0
        assert_all_free(eng)


@pytest.mark.parametrize("mode", MODES)
def test_structured_outputs_survive_preemption(mode):
    from .test_structured_outputs import _tokenizer, pair
    large, small = pair.__wrapped__()
    so = StructuredOutputs(regex=r"[^{}\[\]]{10,40}")
    kw = dict(max_batch_size=6, tokenizer=_tokenizer(), max_model_len=96)
    items = [([i + 1, 2 * i + 3, 5], SamplingParams(max_tokens=30, structured_outputs=so, seed=i,
                                                    temperature=0.7 if i % 2 else 0.0)) for i in range(6)]
    policy = Greedy(max_draft_len=3)
    want = _solo(tiny_engine(large, small, **kw), items, policy)
    eng = tiny_engine(large, small, kv_cache_blocks=24, preemption=mode, **kw)
    got = eng.generate([p for p, _ in items], [s for _, s in items], policy=policy)
    _same(got, want)
    assert [o.text for o in got] == [o.text for o in want]
    assert sum(o.metrics.preemptions for o in got) > 0
    assert_all_free(eng)


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_goes_on_across_its_preemption(large_model, small_model, mode):
    """A stream's chunks add up to its output, each token once, while other threads' requests preempt it."""
    eng = tiny_engine(large_model, small_model, max_batch_size=4, kv_cache_blocks=14, preemption=mode)
    policy = BiLD(fallback_threshold=0.4, rollback_threshold=2.0, max_draft_len=4)
    params = SamplingParams(max_tokens=40)
    alone = tiny_engine(large_model, small_model, max_batch_size=4).generate([[3, 1, 4]], params, policy=policy)[0]
    others = _items(6, 7, sampled=False)
    chunks, box = [], []
    it = eng.stream([3, 1, 4], params, policy=policy)
    chunks.append(next(it))
    t = threading.Thread(target=lambda: box.append(eng.generate([p for p, _ in others], [s for _, s in others],
                                                                policy=policy)))
    t.start()
    chunks += list(it)  # this thread steps too, as the others' requests come and go
    t.join(timeout=120)
    assert box and all(o.error is None for o in box[0])
    out = chunks[-1].output
    assert sum((c.token_ids for c in chunks), []) == out.token_ids == alone.token_ids
    assert out.metrics.preemptions + sum(o.metrics.preemptions for o in box[0]) > 0
    assert_all_free(eng)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("draft_loop", ["native", "eager"])
def test_a_feature_draft_resumes_where_it_was(feature_pair, draft_loop, mode):  # noqa: F811
    """Recomputed, the feature draft is fed the large model's features of every position again before it drafts on:
    the same drafts as without preemption, so that BiLD's text (which keeps drafts the large model finds likely
    enough) does not change either."""
    teacher, _, path = feature_pair
    items = _items(6, 11, sampled=False)
    policies = (Greedy(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4))
    for prefix_cache in (None, 128):
        plain = feature_engine(teacher, path, max_batch_size=6, draft_loop=draft_loop)
        eng = feature_engine(teacher, path, max_batch_size=6, kv_cache_blocks=16, draft_loop=draft_loop,
                             prefix_cache=prefix_cache, preemption=mode)
        for policy in policies:
            want = _solo(plain, items, policy)
            got = eng.generate([p for p, _ in items], [s for _, s in items], policy=policy)
            _same(got, want)
            assert sum(o.metrics.accepted_tokens for o in got) > 0
            assert sum(o.metrics.preemptions for o in got) > 0
        assert_all_free(eng)


@pytest.mark.parametrize("mode", MODES)
def test_a_preempted_request_can_be_cancelled(large_model, small_model, mode):
    eng = tiny_engine(large_model, small_model, max_batch_size=4, kv_cache_blocks=14, preemption=mode)
    policy = Greedy(max_draft_len=3)
    seen = []
    step = eng._step

    def spy(running, pol):  # cancel the first request found preempted (waiting again, with tokens)
        sch = eng._scheduler
        for r in sch.waiting:
            if r.seq.metrics.preemptions and not seen:
                seen.append(r.seq.request_id)
                assert eng.load()["preempted"] >= 1  # (what /health and /metrics show)
                r.end = "cancelled"  # (what Engine.cancel asks from another thread; reaped after this step)
        return step(running, pol)
    eng._step = spy
    items = _items(4, 5, sampled=False)
    got = eng.generate([p for p, _ in items], [s for _, s in items], policy=policy)
    assert seen and [o.finish_reason for o in got].count("cancelled") == 1
    assert all(o.error is None and o.token_ids for o in got if o.finish_reason != "cancelled")
    assert_all_free(eng)


def test_bad_kv_admission_is_refused_by_name(large_model, small_model):
    with pytest.raises(ValueError, match="kv_admission must be 'preempt' or 'reserve'"):
        tiny_engine(large_model, small_model, kv_admission="lazy")
    with pytest.raises(ValueError, match="preemption must be 'auto', 'swap' or 'recompute'"):
        tiny_engine(large_model, small_model, preemption="drop")
    assert tiny_engine(large_model, small_model).preemption == "swap"  # "auto" on a CPU
    # a request whose worst case exceeds the whole pool is still refused, alone
    eng = tiny_engine(large_model, small_model, kv_cache_blocks=8)
    outs = eng.generate([[1, 2], [3] * 30], SamplingParams(max_tokens=8), policy=Greedy())
    assert outs[0].error is None and "KV cache" in outs[1].error
    assert_all_free(eng)


def test_many_threads_on_a_tiny_pool(large_model, small_model):
    """Threads come and go on a pool too small for their requests' worst cases: the same tokens as alone."""
    eng = tiny_engine(large_model, small_model, max_batch_size=6, kv_cache_blocks=18, preemption="recompute")
    rng = random.Random(21)
    work = [(p, s, POLICIES[i % 4]) for i, (p, s) in enumerate(_items(24, 21))]
    alone = tiny_engine(large_model, small_model, max_batch_size=6)
    want = [alone.generate([p], s, policy=pol)[0].token_ids for p, s, pol in work]
    results = [None] * len(work)

    def worker(k):
        for i in range(k, len(work), 6):
            p, s, pol = work[i]
            results[i] = eng.generate([p], s, policy=pol)[0]
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    rng.shuffle(ts)
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert [r.token_ids for r in results] == want
    assert sum(r.metrics.preemptions for r in results) > 0
    assert_all_free(eng)


def test_preemptions_are_counted_in_the_aggregate(large_model, small_model):
    eng = tiny_engine(large_model, small_model, max_batch_size=8, kv_cache_blocks=16)
    items = _items(8, 3, sampled=False)
    got = eng.generate([p for p, _ in items], [s for _, s in items], policy=LargeOnly())
    from bild_kernels.engine.sequence import RequestMetrics
    total = RequestMetrics.aggregate(o.metrics for o in got)
    assert total.preemptions == sum(o.metrics.preemptions for o in got) > 0
    assert got[0].metrics.as_dict()["preemptions"] == got[0].metrics.preemptions


@requires_gpu
@pytest.mark.parametrize("mode", MODES)
def test_preemption_on_gpu_under_the_graphed_loops(large_model, small_model, mode):
    """On a GPU (float32, graphed draft runs and passes; "recompute" its default): the large model's greedy text for
    the lossless policies, with requests preempted and re-admitted into other rows of the graphs' buffers."""
    import torch
    from bild_kernels import Engine
    eng = Engine(large=large_model, small=small_model, device="cuda", dtype=torch.float32, max_batch_size=8,
                 max_model_len=64, block_size=4, kv_cache_blocks=16, preemption=mode)
    assert Engine(large=large_model, device="cuda", dtype=torch.float32, max_model_len=64).preemption == "recompute"
    items = _items(8, 3, sampled=False)
    want = [hf_greedy(large_model, p, s.max_tokens) for p, s in items]
    for policy in (LargeOnly(), Greedy(max_draft_len=3), BiLD(fallback_threshold=0.0, rollback_threshold=0.0,
                                                             max_draft_len=4)):
        got = eng.generate([p for p, _ in items], [s for _, s in items], policy=policy)
        assert [o.token_ids for o in got] == want, policy.name
        assert sum(o.metrics.preemptions for o in got) > 0
    assert_all_free(eng)


@pytest.mark.parametrize("admission", ["preempt", "reserve"])
def test_waiting_requests_are_admitted_by_priority_then_arrival(large_model, small_model, admission):
    eng = tiny_engine(large_model, small_model, max_batch_size=1, kv_admission=admission)
    order, step = [], eng._step
    eng._step = lambda running, pol: order.append(running[0].request_id) or step(running, pol)
    prios = [2, 0, 1, 0, -3]
    outs = eng.generate([[5, 17, 3]] * 5, [SamplingParams(max_tokens=3, priority=p) for p in prios], policy=LargeOnly())
    first = outs[0].request_id
    assert list(dict.fromkeys(order)) == [first + i for i in (4, 1, 3, 2, 0)]
    assert len({tuple(o.token_ids) for o in outs}) == 1
    assert_all_free(eng)


@pytest.mark.parametrize("admission", ["preempt", "reserve"])
def test_an_earlier_priority_preempts_its_way_in(large_model, small_model, admission):
    """A running request of priority 5 holds the only batch row when one of priority 0 arrives: under "preempt" it is
    preempted and the newcomer ends first; under "reserve" the newcomer waits. Both give what they give alone."""
    eng = tiny_engine(large_model, small_model, max_batch_size=1, kv_admission=admission)
    policy = Greedy(max_draft_len=3)
    low_p, high_p = SamplingParams(max_tokens=40, priority=5), SamplingParams(max_tokens=6, priority=0)
    alone = tiny_engine(large_model, small_model, max_batch_size=1)
    want_low = alone.generate([[3, 1, 4]], low_p, policy=policy)[0].token_ids
    want_high = alone.generate([[9, 2, 6]], high_p, policy=policy)[0].token_ids
    box = []
    it = eng.stream([3, 1, 4], low_p, policy=policy)
    chunks = [next(it)]
    t = threading.Thread(target=lambda: box.append(eng.generate([[9, 2, 6]], high_p, policy=policy)[0]))
    t.start()
    while t.is_alive():  # step the engine from this thread too, keeping the low request's stream read
        chunks.append(next(it))
        if chunks[-1].finished:
            break
    t.join(timeout=120)
    chunks += list(it)
    low, high = chunks[-1].output, box[0]
    assert low.token_ids == sum((c.token_ids for c in chunks), []) == want_low and high.token_ids == want_high
    if admission == "preempt":
        assert low.metrics.preemptions == 1 and high.metrics.preemptions == 0
        assert high.metrics.end_time < low.metrics.end_time
    else:
        assert low.metrics.preemptions == 0 and high.metrics.end_time > low.metrics.end_time
    assert_all_free(eng)


def test_a_short_pool_preempts_the_latest_priority_first(large_model, small_model):
    items = _items(6, 3, sampled=False)
    prios = [3, 0, 2, 1, 5, 4]
    params = [SamplingParams(max_tokens=s.max_tokens, priority=p) for (_, s), p in zip(items, prios)]
    want = _solo(tiny_engine(large_model, small_model, max_batch_size=6), [(p, s) for (p, _), s in zip(items, params)],
                 LargeOnly())
    eng = tiny_engine(large_model, small_model, max_batch_size=6, kv_cache_blocks=14)
    got = eng.generate([p for p, _ in items], params, policy=LargeOnly())
    _same(got, want)
    assert got[1].metrics.preemptions == 0  # priority 0 is never the one preempted
    by_prio = {p: o for p, o in zip(prios, got)}
    ends = [by_prio[p].metrics.end_time for p in range(4)]
    assert ends == sorted(ends)  # the earlier priorities run on while the later ones wait
    assert sum(o.metrics.preemptions for o in got) > 0
    assert_all_free(eng)


@pytest.mark.parametrize("bad", [1.5, "high", True, None])
def test_a_bad_priority_is_refused(bad):
    with pytest.raises(ValueError, match="priority must be an int"):
        SamplingParams(priority=bad)

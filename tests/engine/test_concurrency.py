"""Many threads, one engine: continuous batching, a tiny KV pool, cancellation and timeouts.

Every lossless or seeded request must give the same tokens as when it runs alone, and no block may leak.
"""
import gc
import random
import threading
import time

import pytest

from bild_kernels import BiLD, Greedy, Jacobi, LargeOnly, SamplingParams, ShallowDeep, SpeculativeSampling

from .conftest import assert_all_free, hf_greedy, tiny_engine

POLICIES = [LargeOnly(), Greedy(max_draft_len=3), BiLD(fallback_threshold=0.4, rollback_threshold=2.0, max_draft_len=4),
            SpeculativeSampling(max_draft_len=3), Jacobi(block_size=3), ShallowDeep(exit_layer=2)]


def _engine(large_model, small_model, **kw):
    return tiny_engine(large_model, small_model, **{"max_batch_size": 4, **kw})


def _all_free(engine):
    assert not engine._scheduler.running and not engine._scheduler.waiting
    assert_all_free(engine)


def _requests(n, seed):
    """(prompt, params, policy) triples: greedy and seeded sampling, every policy, odd lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        policy = POLICIES[i % len(POLICIES)]
        sample = policy.name in ("speculative-sampling", "large-only", "bild") and rng.random() < 0.5
        params = SamplingParams(max_tokens=rng.randint(1, 14), temperature=0.9 if sample else 0.0,
                                top_p=rng.choice([1.0, 0.8]), seed=rng.randrange(1000))
        out.append(([rng.randrange(97) for _ in range(rng.randint(1, 12))], params, policy))
    return out


def _run_threads(fn, items, threads):
    results, errors = [None] * len(items), []

    def worker(k):
        try:
            for i in range(k, len(items), threads):
                results[i] = fn(*items[i])
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in ts), "a worker thread hangs"
    return results


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return _engine(large_model, small_model)


@pytest.fixture(scope="module")
def reqs():
    return _requests(30, seed=7)


@pytest.fixture(scope="module")
def alone(engine, reqs):
    return [engine.generate([p], s, policy=pol)[0].token_ids for p, s, pol in reqs]


def test_concurrent_generate_equals_one_by_one(engine, reqs, alone):
    outs = _run_threads(lambda p, s, pol: engine.generate([p], s, policy=pol)[0], reqs, threads=6)
    assert [o.token_ids for o in outs] == alone
    assert all(o.error is None and o.finish_reason == "length" for o in outs)
    _all_free(engine)


def test_concurrent_streams_equal_one_by_one(engine, reqs, alone):
    def stream(p, s, pol):
        chunks = list(engine.stream(p, s, policy=pol))
        assert chunks[-1].finished and sum((c.token_ids for c in chunks), []) == chunks[-1].output.token_ids
        return chunks[-1].output.token_ids

    assert _run_threads(stream, reqs, threads=8) == alone
    _all_free(engine)


def test_lossless_under_load_equals_the_oracle(engine, large_model):
    rng = random.Random(3)
    items = [([rng.randrange(97) for _ in range(rng.randint(1, 9))], SamplingParams(max_tokens=10),
              rng.choice([LargeOnly(), Greedy(max_draft_len=4), Jacobi(block_size=4), ShallowDeep(exit_layer=2),
                          BiLD(fallback_threshold=0.5, rollback_threshold=0.0)])) for _ in range(16)]
    outs = _run_threads(lambda p, s, pol: engine.generate([p], s, policy=pol)[0].token_ids, items, threads=5)
    assert outs == [hf_greedy(large_model, p, 10) for p, _, _ in items]
    _all_free(engine)


def test_a_request_joins_the_running_batch(engine, reqs, alone, monkeypatch):
    seen = []
    step = engine._step
    monkeypatch.setattr(engine, "_step", lambda running, policy: seen.append({s.request_id for s in running})
                        or step(running, policy))
    assert reqs[1][2] == Greedy(max_draft_len=3)  # equal fixed policies share a batch
    long = engine.stream([5, 17, 3], SamplingParams(max_tokens=30), policy=Greedy(max_draft_len=3))
    first = next(long)
    # While this thread holds its stream, another thread's generate steps the engine for both requests.
    box = []
    t = threading.Thread(target=lambda: box.append(engine.generate([reqs[1][0]], reqs[1][1], policy=reqs[1][2])))
    t.start()
    t.join(timeout=60)
    assert box and box[0][0].token_ids == alone[1]
    rest = list(long)
    assert any({first.request_id, box[0][0].request_id} <= ids for ids in seen), "never batched together"
    alone_long = engine.generate([[5, 17, 3]], SamplingParams(max_tokens=30), policy=Greedy(max_draft_len=3))[0]
    assert first.token_ids + sum((c.token_ids for c in rest), []) == alone_long.token_ids
    _all_free(engine)


def test_tiny_pool_many_requests_wait_and_never_corrupt(large_model, small_model):
    # 11 blocks of 4 tokens: room for two of these requests' worst cases at a time, with 24 wanting in.
    eng = _engine(large_model, small_model, kv_cache_blocks=11)
    rng = random.Random(5)
    items = [([rng.randrange(97) for _ in range(rng.randint(1, 8))], SamplingParams(max_tokens=8),
              rng.choice([Greedy(max_draft_len=3), LargeOnly(), BiLD(fallback_threshold=0.3, rollback_threshold=0.0)]))
             for _ in range(24)]
    outs = _run_threads(lambda p, s, pol: eng.generate([p], s, policy=pol)[0], items, threads=8)
    assert [o.token_ids for o in outs] == [hf_greedy(large_model, p, 8) for p, _, _ in items]
    # One that can never fit fails alone, with its reason; the others still run.
    outs = eng.generate([[1, 2], [3] * 40], SamplingParams(max_tokens=8), policy=Greedy())
    assert outs[0].token_ids == hf_greedy(large_model, [1, 2], 8) and "KV cache" in outs[1].error
    _all_free(eng)


def test_closed_garbage_collected_and_cancelled_streams_free_their_blocks(engine):
    it = engine.stream([5, 17, 3], SamplingParams(max_tokens=40), policy=Greedy())
    next(it)
    it.close()
    _all_free(engine)
    it = engine.stream([5, 17, 3], SamplingParams(max_tokens=40), policy=Greedy())
    next(it)
    del it
    gc.collect()
    _all_free(engine)
    # Cancelled from another thread while this one streams: the stream ends with "cancelled".
    it = engine.stream([8, 9], SamplingParams(max_tokens=40), policy=LargeOnly())
    first = next(it)
    t = threading.Thread(target=lambda: engine.cancel(first.request_id))
    t.start()
    t.join(timeout=60)
    _all_free(engine)
    rest = list(it)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].output.error is None
    assert len(rest[-1].output.token_ids) < 40
    assert not engine.cancel(first.request_id)


def test_generate_hands_its_request_ids_out_to_cancel_them(engine, alone, reqs):
    """generate(on_submit=f) calls f with the requests' ids before any step: another thread can cancel them (the
    others of the batch go on); a callback that raises ends the call with its exception and frees every block."""
    got = []

    def cancel_first(ids):
        got.append(ids)
        threading.Thread(target=engine.cancel, args=(ids[0],)).start()
    p, s, pol = reqs[0]
    outs = engine.generate([[5, 17, 3], p], [SamplingParams(max_tokens=55, ignore_eos=True), s], policy=pol,
                           on_submit=cancel_first)
    assert [o.request_id for o in outs] == got[0] and len(got) == 1
    assert outs[0].finish_reason == "cancelled" and len(outs[0].token_ids) < 55
    assert outs[1].token_ids == alone[0]

    def fail(ids):
        raise RuntimeError("no")
    with pytest.raises(RuntimeError, match="no"):
        engine.generate([[5, 17, 3]], SamplingParams(max_tokens=8), on_submit=fail)
    _all_free(engine)


def test_stream_many_yields_each_request_s_chunks_as_generate_gives_them(engine, reqs, alone):
    """stream_many: the chunks of several requests (mixed parameters) as they come, joining per request to what each
    gives alone; on_submit gets their ids in the prompts' order; closing it early cancels the rest."""
    items = reqs[:6]
    ids, got = [], {}
    prompts, params = [p for p, _, _ in items], [s for _, s, _ in items]
    for c in engine.stream_many(prompts, params, policy=items[0][2], on_submit=ids.extend):
        got.setdefault(c.request_id, []).extend(c.token_ids)
    assert sorted(got) == ids == sorted(ids)
    want = engine.generate(prompts, params, policy=items[0][2])
    assert [got[i] for i in ids] == [o.token_ids for o in want]
    it = engine.stream_many([[5, 17, 3], [8, 9]], SamplingParams(max_tokens=40, ignore_eos=True))
    next(it)
    it.close()
    _all_free(engine)


def test_cancelled_request_leaves_the_others_intact(engine, reqs, alone):
    victim = engine.stream([4, 4, 4], SamplingParams(max_tokens=40), policy=Greedy())
    first = next(victim)

    def run(p, s, pol):
        if p is None:
            time.sleep(0.01)
            return engine.cancel(first.request_id)
        return engine.generate([p], s, policy=pol)[0].token_ids

    items = [(None, None, None)] + reqs[:8]
    outs = _run_threads(run, items, threads=3)
    assert outs[0] is True and outs[1:] == alone[:8]
    assert list(victim)[-1].finish_reason == "cancelled"
    _all_free(engine)


def test_timeouts_free_blocks_running_or_waiting(large_model, small_model, monkeypatch):
    eng = _engine(large_model, small_model, max_batch_size=1)
    step = eng._step
    monkeypatch.setattr(eng, "_step", lambda running, policy: time.sleep(0.02) or step(running, policy))
    box = []
    t = threading.Thread(target=lambda: box.append(eng.generate([[1, 2]], SamplingParams(max_tokens=40, timeout_s=0.2),
                                                                policy=LargeOnly())[0]))
    t.start()
    time.sleep(0.05)
    # The only row is busy: this one waits for admission, and times out before it gets in.
    waited = eng.generate([[3, 4]], SamplingParams(max_tokens=40, timeout_s=0.05), policy=LargeOnly())[0]
    t.join(timeout=60)
    out = box[0]
    assert out.finish_reason == "timeout" and "timed out" in out.error
    assert 0 < len(out.token_ids) < 40 and out.token_ids == hf_greedy(large_model, [1, 2], len(out.token_ids))
    assert waited.finish_reason == "timeout" and waited.token_ids == []
    _all_free(eng)


def test_bad_timeout_raises():
    for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="timeout_s"):
            SamplingParams(timeout_s=bad)

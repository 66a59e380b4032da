"""Prompt prefix caching (`Engine(prefix_cache=N)`): kept prompts, their reuse by later prompts that begin alike,
the same tokens as without it for every policy, the cache's budget, and bad input."""
import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams, SmallOnly, SpeculativeSampling
from bild_kernels.engine.policies import Jacobi, NGram, ShallowDeep
from bild_kernels.engine.prefix_cache import PrefixCache, PrefixEntry
from bild_kernels.evaluate import evaluate

from .conftest import assert_all_free, hf_greedy, tiny_engine

SYSTEM = [5, 17, 3, 44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15]  # a "system prompt" the requests share (14 tokens)
PROMPTS = [SYSTEM + [33, 34, 35], SYSTEM + [8, 9], SYSTEM + [33, 34, 36, 40, 41], SYSTEM[:6] + [50, 51, 52]]
N = 10


def _engine(large, small, **kw):
    return tiny_engine(large, small, **{"max_batch_size": 2, **kw})


@pytest.fixture(scope="module")
def cached(large_model, small_model):
    return _engine(large_model, small_model, prefix_cache=256)


@pytest.fixture(scope="module")
def plain(large_model, small_model):
    return _engine(large_model, small_model)


def _entry(n: int, features: bool = False) -> PrefixEntry:
    return PrefixEntry(torch.zeros(2, 2, n, 1, 4), torch.zeros(n, 8) if features else None)


# -- the cache itself ------------------------------------------------------------------------------
def test_match_finds_the_longest_shared_prefix_and_leaves_the_last_token():
    pc = PrefixCache(100)
    pc.insert([1, 2, 3, 4], _entry(4))
    pc.insert([1, 2, 9], _entry(3))
    assert pc.match([1, 2, 3, 7, 7])[1] == 3
    assert pc.match([1, 2, 9, 9])[1] == 3
    assert pc.match([1, 2, 3, 4])[1] == 3  # the whole prompt kept: its last token still runs, for its logits
    assert pc.match([5, 1, 2]) == (None, 0)
    assert pc.match([1]) == (None, 0)
    assert (pc.queries, pc.hits, pc.hit_tokens) == (5, 3, 9)


def test_need_features_skips_entries_without_them():
    pc = PrefixCache(100)
    pc.insert([1, 2, 3, 4], _entry(4))
    pc.insert([1, 2, 5], _entry(3, features=True))
    assert pc.match([1, 2, 3, 4, 5], need_features=True)[1] == 2
    assert pc.match([1, 2, 3, 4, 5])[1] == 4


def test_insert_keeps_each_prompt_once_and_evicts_the_least_recently_used():
    pc = PrefixCache(10)
    pc.insert([1, 2], _entry(2))
    pc.insert([1, 2], _entry(2))  # the same prompt again: replaced, not kept twice
    pc.insert([1, 2, 3], _entry(3))  # begins with [1, 2], which stays kept beside it
    assert len(pc) == 2 and pc.tokens == 5
    assert pc.discard([1, 2, 3]) and pc.match([1, 2, 3, 4])[1] == 2
    pc.insert([1, 2, 3], _entry(3))
    pc.discard([1, 2])
    pc.insert([4, 5, 6, 7], _entry(4))
    pc.match([1, 2, 3, 9])  # [1, 2, 3] is now the most recently used
    pc.insert([8, 9, 10, 11], _entry(4))  # 11 > 10: the least recently used goes
    assert pc.tokens == 7 and pc.match([4, 5, 6, 7, 1]) == (None, 0) and pc.match([1, 2, 3, 1])[1] == 3
    pc.insert(list(range(20, 31)), _entry(11))  # longer than the whole budget: not kept, nothing evicted
    assert pc.tokens == 7
    assert pc.discard([8, 9, 10, 11]) and not pc.discard([8, 9, 10, 11])
    pc.clear()
    assert len(pc) == 0 and pc.tokens == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bad_budget_is_refused(bad):
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(bad)


def test_entry_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="positions"):
        PrefixCache(10).insert([1, 2, 3], _entry(2))


@pytest.mark.parametrize("bad", [-1, 2.0, True, "16"])
def test_engine_refuses_a_bad_prefix_cache(large_model, bad):
    with pytest.raises(ValueError, match="prefix_cache"):
        Engine(large=large_model, dtype=torch.float64, max_model_len=32, prefix_cache=bad)


def test_engine_without_a_budget_has_no_cache(plain, large_model):
    assert plain.prefix_cache is None
    assert Engine(large=large_model, dtype=torch.float64, max_model_len=32, prefix_cache=0).prefix_cache is None


# -- in the engine ---------------------------------------------------------------------------------
POLICIES = [LargeOnly(), Greedy(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=1.0, max_draft_len=4),
            NGram(max_draft_len=3), Jacobi(block_size=3), Greedy(max_draft_len=2, lookup=NGram(max_draft_len=3))]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_same_tokens_with_the_prefix_cache_one_request_at_a_time(cached, plain, policy):
    cached.prefix_cache.clear()
    params = SamplingParams(max_tokens=N)
    want = [plain.generate([p], params, policy=policy)[0].token_ids for p in PROMPTS]
    outs = [cached.generate([p], params, policy=policy)[0] for p in PROMPTS]
    assert [o.token_ids for o in outs] == want
    # the first prompt prefills everything; the others reuse what they share with the prompts before them
    assert [o.metrics.cached_prompt_tokens for o in outs] == [0, 14, 16, 6]
    assert [o.metrics.as_dict()["cached_prompt_tokens"] for o in outs] == [0, 14, 16, 6]
    assert_all_free(cached)


def test_lossless_policies_with_hits_match_hf_greedy(cached, large_model):
    cached.prefix_cache.clear()
    cached.generate([PROMPTS[0]], SamplingParams(max_tokens=2), policy=LargeOnly())
    for policy in (Greedy(max_draft_len=4), BiLD(fallback_threshold=0.0, rollback_threshold=0.0, max_draft_len=3)):
        for p in PROMPTS[1:3]:
            o = cached.generate([p], SamplingParams(max_tokens=N), policy=policy)[0]
            assert o.metrics.cached_prompt_tokens >= 14
            assert o.token_ids == hf_greedy(large_model, p, N)
    # a prompt that is all kept still runs its last token
    o = cached.generate([PROMPTS[0]], SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=2))[0]
    assert o.metrics.cached_prompt_tokens == len(PROMPTS[0]) - 1
    assert o.token_ids == hf_greedy(large_model, PROMPTS[0], N)
    assert_all_free(cached)


def test_speculative_sampling_draws_the_same_tokens_with_hits(cached, plain):
    cached.prefix_cache.clear()
    params = SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=7)
    policy = SpeculativeSampling(max_draft_len=3)
    want = [plain.generate([p], params, policy=policy)[0].token_ids for p in PROMPTS]
    outs = [cached.generate([p], params, policy=policy)[0] for p in PROMPTS]
    assert [o.token_ids for o in outs] == want
    assert sum(o.metrics.cached_prompt_tokens for o in outs) > 0
    assert_all_free(cached)


def test_batched_requests_reuse_prompts_kept_by_earlier_ones(cached, plain):
    cached.prefix_cache.clear()
    policy, params = Greedy(max_draft_len=3), SamplingParams(max_tokens=N)
    want = [o.token_ids for o in plain.generate(PROMPTS, params, policy=policy)]
    outs = cached.generate(PROMPTS, params, policy=policy)  # two at a time: the last two find the first two kept
    assert [o.token_ids for o in outs] == want
    assert [o.metrics.cached_prompt_tokens for o in outs[:2]] == [0, 0]
    assert all(o.metrics.cached_prompt_tokens > 0 for o in outs[2:])
    assert_all_free(cached)


@pytest.mark.parametrize("policy", [SmallOnly(), ShallowDeep(exit_layer=2)], ids=["small-only", "shallow-deep"])
def test_policies_the_cache_does_not_serve_run_as_before(cached, plain, policy):
    cached.prefix_cache.clear()
    cached.generate([PROMPTS[0]], SamplingParams(max_tokens=2), policy=LargeOnly())
    kept = len(cached.prefix_cache)
    params = SamplingParams(max_tokens=N)
    for p in PROMPTS[1:]:
        o = cached.generate([p], params, policy=policy)[0]
        assert o.metrics.cached_prompt_tokens == 0
        assert o.token_ids == plain.generate([p], params, policy=policy)[0].token_ids
    assert len(cached.prefix_cache) == kept  # nor are their prompts kept
    assert_all_free(cached)


def test_the_budget_bounds_what_is_kept(large_model, small_model):
    eng = _engine(large_model, small_model, prefix_cache=20)
    for p in PROMPTS:
        eng.generate([p], SamplingParams(max_tokens=3), policy=LargeOnly())
        assert eng.prefix_cache.tokens <= 20
    assert len(eng.prefix_cache) == 1
    assert_all_free(eng)


def test_a_kept_prefix_is_the_prefill_s_own_kv(large_model):
    """The copied positions hold what a prefill writes: the logits after them equal a fresh prefill's."""
    eng = Engine(large=large_model, dtype=torch.float64, max_batch_size=2, max_model_len=64, block_size=4,
                 prefix_cache=64)
    eng.generate([PROMPTS[0]], SamplingParams(max_tokens=1), policy=LargeOnly())
    runner = eng.runners["large"]
    entry, n = eng.prefix_cache.match(PROMPTS[2])
    assert n == 16
    runner.add(0)
    runner.write_kv(0, entry.kv, n)
    assert torch.equal(runner.read_kv(0, n), entry.kv[:, :, :n])
    got = runner.extend([0], [PROMPTS[2][n:]], [1])[0, 0]
    runner.free(0)
    runner.add(1)
    want = runner.extend([1], [PROMPTS[2]], [1])[0, 0]
    runner.free(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        hf = large_model(torch.tensor([PROMPTS[2]])).logits[0, -1]
    torch.testing.assert_close(got, hf, rtol=1e-9, atol=1e-9)
    assert_all_free(eng)


def test_write_kv_refuses_a_row_that_holds_tokens(large_model):
    eng = Engine(large=large_model, dtype=torch.float64, max_batch_size=1, max_model_len=32, block_size=4)
    runner = eng.runners["large"]
    runner.add(0)
    runner.extend([0], [[1, 2, 3]], [1])
    kv = runner.read_kv(0, 3)
    with pytest.raises(ValueError, match="already holds"):
        runner.write_kv(0, kv, 2)
    with pytest.raises(ValueError, match="outside"):
        runner.blocks.slots_of(0, 0, 4)
    runner.free(0)
    runner.add(0)
    with pytest.raises(ValueError, match="cannot fill"):
        runner.write_kv(0, kv, 4)
    runner.free(0)


def test_eval_never_lets_a_prompt_reuse_itself(cached):
    """`bild eval` with the cache: each prompt reuses only what it shares with the others, in every policy and
    round (else a policy running a prompt after another would skip its prefill)."""
    cached.prefix_cache.clear()
    rows = evaluate(cached, PROMPTS, [Greedy(max_draft_len=3)], max_tokens=4, repeat=2)
    # the first prompt finds nothing (not even its own warm-up run); each later one the prompts before it
    assert [r.cached_prompt for r in rows] == [pytest.approx((0 + 14 + 16 + 6) / 4)] * 2


def test_the_cache_takes_calls_from_many_threads():
    """The engine's stepping thread matches and inserts while a caller clears or discards: no call sees the table
    mid-change, and the positions it counts stay the sum of its prompts'."""
    import sys
    import threading
    pc, errors, stop = PrefixCache(400), [], threading.Event()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: mid-iteration switches are what would break an unguarded table

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            while not stop.is_set():
                n = int(torch.randint(1, 12, (1,), generator=g))
                p = [1, 2, 3] + torch.randint(0, 6, (n,), generator=g).tolist()
                pc.insert(p, _entry(len(p)))
                pc.match(p + [9])
                pc.discard(p[:-1])
        except Exception as e:  # noqa: BLE001 (any error of a call is the failure)
            errors.append(e)

    def clearer():
        try:
            while not stop.is_set():
                pc.clear()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)] + [threading.Thread(target=clearer)]
    try:
        for t in threads:
            t.start()
        stop.wait(1.0)
        stop.set()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    assert pc.tokens == sum(len(k) for k in pc._entries) <= pc.max_tokens


def test_a_feature_draft_s_keys_and_values_join_a_kept_prompt_once():
    pc = PrefixCache(100)
    pc.insert([1, 2, 3, 4], _entry(4, features=True))
    pc.insert([5, 6, 7], _entry(3))  # no hidden states: no feature draft fed it
    assert not pc.attach_small([9, 9], torch.zeros(1, 2, 1, 1, 4))  # not kept
    assert not pc.attach_small([5, 6, 7], torch.zeros(1, 2, 2, 1, 4))
    with pytest.raises(ValueError, match="one fewer"):
        pc.attach_small([1, 2, 3, 4], torch.zeros(1, 2, 4, 1, 4))
    assert pc.attach_small([1, 2, 3, 4], torch.ones(1, 2, 3, 1, 4))
    assert not pc.attach_small([1, 2, 3, 4], torch.zeros(1, 2, 3, 1, 4))  # once: the first stays
    entry, n = pc.match([1, 2, 3, 8], need_features=True)
    assert n == 3 and entry.small_kv.eq(1).all()
    pc.insert([1, 2, 3, 4], _entry(4, features=True))  # a fresh entry for the prompt has none yet
    assert pc.match([1, 2, 3, 8])[0].small_kv is None

"""N-gram lookup drafts (prompt lookup decoding): the index against a brute-force search, `NGram` alone and as
the `lookup` of the small-model policies, exactly the large model's output (greedy, and in distribution when
sampling), in every draft loop."""
import random

import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, NGram, SamplingParams, SpeculativeSampling
from bild_kernels.engine.lookup import NGramIndex

from .conftest import assert_all_free, assert_follows_the_large_model, flat_pair, hf_greedy, tiny_engine, tiny_llama

# Prompts that repeat themselves (lookups match from the first pass) and ones that do not.
PROMPTS = [[5, 17, 3, 5, 17], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 33, 34, 35, 36, 33]]
N = 40  # the tiny model's greedy output repeats itself within this many tokens: later lookups match
METRICS = ("generated_tokens", "large_passes", "small_steps", "drafted_tokens", "accepted_tokens",
           "lookup_drafted_tokens", "lookup_accepted_tokens", "fallbacks", "rollbacks")


def brute_force(tokens, k, max_n, min_n):
    """The continuation of the latest earlier occurrence of the longest matching suffix (n = max_n .. min_n)."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        key = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i:i + n] == key:
                return tokens[i + n:i + n + k]
    return []


def test_index_matches_brute_force_as_tokens_grow():
    rng = random.Random(0)
    for trial in range(200):
        vocab, min_n = rng.choice([2, 3, 5, 20]), rng.randint(1, 3)
        max_n = rng.randint(min_n, 4)
        idx, tokens = NGramIndex(min_n, max_n), []
        for _ in range(rng.randint(1, 12)):
            tokens += [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
            k = rng.randint(0, 6)
            assert idx.propose(tokens, k) == brute_force(tokens, k, max_n, min_n), (trial, tokens)


def test_index_prefers_the_longest_then_the_latest_match():
    idx = NGramIndex(1, 3)
    # "7 8" is followed by 1 early on and by 2 later; "6 7 8" only by 3
    tokens = [6, 7, 8, 3, 9, 7, 8, 1, 7, 8, 2, 4, 6, 7, 8]
    assert idx.propose(tokens, 2) == [3, 9]
    assert NGramIndex(1, 2).propose(tokens, 3) == [2, 4, 6]
    assert idx.propose([1, 2, 3], 4) == [] and idx.propose([], 4) == [] and idx.propose(tokens, 0) == []
    # the continuation may run into the suffix itself (a repeating pattern) and stops at the last token
    assert NGramIndex(1, 1).propose([4, 5, 4, 5, 4], 5) == [5, 4]


def test_index_starts_over_when_tokens_shrink_or_change():
    idx = NGramIndex(1, 2)
    assert idx.propose([1, 2, 3, 1], 2) == [2, 3]
    assert idx.propose([1, 2], 2) == []  # shrank: (1, 2) -> 3 must be forgotten
    assert idx.propose([9, 9, 1, 5, 1], 2) == [5, 1]  # same length as before, other tokens


@pytest.fixture(scope="module")
def oracle(large_model):
    return [hf_greedy(large_model, p, N) for p in PROMPTS]


def _engine(large, small, **kw):
    return tiny_engine(large, small, **{"max_batch_size": 3, "max_model_len": 128, **kw})


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return _engine(large_model, small_model)


@pytest.mark.parametrize("policy", [NGram(), NGram(max_draft_len=8, max_ngram=4, min_ngram=1), NGram(max_draft_len=1),
                                    NGram(max_draft_len=3, max_ngram=1, min_ngram=1)])
def test_ngram_alone_matches_hf_greedy(engine, oracle, policy):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert [o.token_ids for o in outs] == oracle
    for o in outs:
        m = o.metrics
        assert m.small_steps == 0 and m.lookup_drafted_tokens == m.drafted_tokens
        assert m.lookup_accepted_tokens == m.accepted_tokens
        assert m.large_passes + m.accepted_tokens == N  # each pass commits its accepted drafts plus one token
    total = sum(o.metrics.accepted_tokens for o in outs)
    assert 0 < total < sum(o.metrics.drafted_tokens for o in outs)  # lookups both right and wrong
    assert_all_free(engine)


@pytest.mark.parametrize("make", [
    lambda: Greedy(max_draft_len=2, lookup=NGram(max_draft_len=4, max_ngram=3, min_ngram=2)),
    lambda: BiLD(fallback_threshold=0.3, rollback_threshold=0.0, max_draft_len=4, lookup=NGram(max_draft_len=6)),
    lambda: SpeculativeSampling(max_draft_len=3, lookup=NGram(max_draft_len=3)),
])
@pytest.mark.parametrize("loop", ["eager", "static"])
def test_small_model_with_lookup_matches_hf_greedy(large_model, small_model, oracle, make, loop):
    eng = _engine(large_model, small_model, draft_loop=loop)
    policy = make()
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert [o.token_ids for o in outs] == oracle
    m = [o.metrics for o in outs]
    looked, drafted = sum(x.lookup_drafted_tokens for x in m), sum(x.drafted_tokens for x in m)
    assert 0 < looked < drafted  # both the lookup and the small model drafted
    assert 0 < sum(x.lookup_accepted_tokens for x in m) <= sum(x.accepted_tokens for x in m)
    # the small model skipped the passes the lookup served: fewer steps than without it
    without = eng.generate(PROMPTS, SamplingParams(max_tokens=N), policy=type(policy)(
        **{k: getattr(policy, k) for k in policy.__dataclass_fields__ if k not in ("lookup", "calibration")}))
    assert [o.token_ids for o in without] == oracle
    assert sum(x.small_steps for x in m) < sum(o.metrics.small_steps for o in without)
    assert_all_free(eng)


def test_lookup_rows_do_not_depend_on_the_batch(engine):
    policy = Greedy(max_draft_len=3, lookup=NGram(max_draft_len=5, min_ngram=2))
    params = SamplingParams(max_tokens=N)
    together = engine.generate(PROMPTS, params, policy=policy)
    alone = [engine.generate([p], params, policy=policy)[0] for p in PROMPTS]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids
        assert [getattr(a.metrics, k) for k in METRICS] == [getattr(b.metrics, k) for k in METRICS]


def test_feature_draft_with_lookup_is_lossless(tmp_path):
    """A feature draft skips the passes the lookup serves: the large model's features of the positions it missed
    wait for its next run (eager and native loops alike)."""
    from bild_kernels.distill.feature_draft import FeatureDraft, feature_stats, teacher_features
    from bild_kernels.models import load_model
    teacher = tiny_llama(5, layers=3, hidden=64, dtype=torch.float32)
    feats = teacher_features(teacher, [p + hf_greedy(teacher, p, 8) for p in PROMPTS], log=lambda s: None)
    mean, std = feature_stats(feats)
    draft = FeatureDraft.from_teacher(teacher, n_layers=1, feat_mean=mean, feat_std=std)
    base, _ = load_model(teacher, dtype=torch.float32)
    path = draft.save_dir(tmp_path / "fd", base, base_name="tiny")
    ref = [hf_greedy(teacher, p, 24) for p in PROMPTS]
    runs = {}
    for loop in ("eager", "native", "static"):
        eng = Engine(large=teacher, small=str(path), max_batch_size=2, max_model_len=64, block_size=4, draft_loop=loop)
        policy = Greedy(max_draft_len=3, lookup=NGram(max_draft_len=4))
        outs = [eng.generate([p], SamplingParams(max_tokens=24), policy=policy)[0] for p in PROMPTS]
        outs += eng.generate(PROMPTS, SamplingParams(max_tokens=24), policy=policy)
        assert [o.token_ids for o in outs] == ref + ref
        assert sum(o.metrics.lookup_drafted_tokens for o in outs) > 0
        runs[loop] = [[getattr(o.metrics, k) for k in METRICS] for o in outs]
        assert_all_free(eng)
    assert runs["native"] == runs["eager"] == runs["static"]


def test_calibration_learns_from_the_small_models_drafts_only(engine, oracle):
    policy = BiLD(fallback_threshold="auto", rollback_threshold="auto", max_draft_len=4, refit_every=8,
                  lookup=NGram(max_draft_len=4, min_ngram=2))
    seen = []
    observe = policy.calibration.observe
    policy.calibration.observe = lambda *a: seen.append(len(a[0])) or observe(*a)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert all(o.error is None and len(o.token_ids) == N for o in outs)
    assert sum(seen) > 0
    assert_all_free(engine)


@pytest.mark.parametrize("policy", [NGram(max_draft_len=2),
                                    SpeculativeSampling(max_draft_len=2, lookup=NGram(max_draft_len=2))])
def test_sampling_with_lookup_follows_the_large_model(monkeypatch, policy):
    # As test_speculative_sampling: thousands of requests on the reference kernels. The prompt ends with two tokens
    # it held before, so the lookup drafts the prefill's own position (the first token) and the next one.
    monkeypatch.setenv("BILD_BACKEND", "ref")
    large, small = flat_pair()
    prompt = [3, 5, 7, 3, 5]
    eng = Engine(large=large, small=small, dtype=torch.float64, max_batch_size=64, max_model_len=16, block_size=4)
    n = 4000
    outs = eng.generate([prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0, seed=s) for s in range(n)],
                        policy=policy)
    assert_follows_the_large_model(large, prompt, outs)
    looked = sum(o.metrics.lookup_drafted_tokens for o in outs)
    assert looked > n  # every request's first pass drafted from the lookup
    assert 0 < sum(o.metrics.lookup_accepted_tokens for o in outs) < looked


def test_lookup_runs_longer_than_the_policys_drafts_fit_the_kv_budget(large_model, small_model):
    policy = Greedy(max_draft_len=1, lookup=NGram(max_draft_len=12, min_ngram=1))
    assert policy.max_run == 12 and Greedy(max_draft_len=3).max_run == 3
    eng = Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=2, max_model_len=48,
                 block_size=4)
    prompt = [33, 34, 35, 36] * 4
    outs = eng.generate([prompt, prompt[:7]], SamplingParams(max_tokens=48 - len(prompt)), policy=policy)
    assert [o.token_ids for o in outs] == [hf_greedy(large_model, prompt, 32), hf_greedy(large_model, prompt[:7], 32)]
    assert max(k for o in outs for k in o.metrics.accepted_lengths) > 1  # longer runs than the small model's
    assert_all_free(eng)


@pytest.mark.parametrize("kw, match", [
    (dict(max_draft_len=0), "max_draft_len"), (dict(max_draft_len=65), "max_draft_len"),
    (dict(max_ngram=0), "max_ngram"), (dict(min_ngram=0), "min_ngram"), (dict(min_ngram=True), "min_ngram"),
    (dict(max_ngram=2, min_ngram=3), "min_ngram must be <= max_ngram"), (dict(max_ngram=2.0), "max_ngram"),
    (dict(max_ngram=1), "min_ngram defaults to 2"),
])
def test_bad_ngram_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        NGram(**kw)


@pytest.mark.parametrize("make", [lambda: Greedy(lookup=3), lambda: BiLD(lookup=Greedy()),
                                  lambda: SpeculativeSampling(lookup="ngram")])
def test_lookup_must_be_an_ngram(make):
    with pytest.raises(TypeError, match="lookup must be an NGram"):
        make()


def test_ngram_needs_no_small_model(large_model, oracle):
    eng = Engine(large=large_model, small=None, dtype=torch.float64, max_batch_size=3, max_model_len=128, block_size=4)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=N), policy=NGram(max_draft_len=5))
    assert [o.token_ids for o in outs] == oracle
    with pytest.raises(ValueError, match="needs a small model"):
        eng.generate(PROMPTS[:1], SamplingParams(max_tokens=4), policy=Greedy(lookup=NGram()))
    assert_all_free(eng)


def test_a_drafts_manifest_may_recommend_a_lookup(tmp_path, large_model, small_model):
    from bild_kernels.engine.policies import bild_from_dict
    from bild_kernels.models import load_model
    from bild_kernels.models.draft import save_draft
    tuned = {"fallback_threshold": 0.3, "rollback_threshold": 1.0, "max_draft_len": 3,
             "lookup": {"max_draft_len": 4, "max_ngram": 3, "min_ngram": 2}}
    assert bild_from_dict(tuned) == BiLD(0.3, 1.0, 3, lookup=NGram(4, 3, 2))
    assert bild_from_dict({**tuned, "lookup": None}).lookup is None
    with pytest.raises(TypeError, match="lookup must be a dict of NGram's fields"):
        bild_from_dict({**tuned, "lookup": 3})
    with pytest.raises(ValueError, match="min_ngram"):
        bild_from_dict({**tuned, "lookup": {"min_ngram": 0}})
    base, _ = load_model(large_model, dtype=torch.float64)
    save_draft(tmp_path, small_model.state_dict(), base=base, init_layers=[0, 1], base_name="tiny", card="# tiny\n",
               policy=tuned, dtype=torch.float64)
    eng = Engine(large=large_model, small=str(tmp_path), dtype=torch.float64, max_batch_size=2, max_model_len=96,
                 block_size=4)
    assert eng.default_policy == bild_from_dict(tuned)
    outs = eng.generate(PROMPTS[:2], SamplingParams(max_tokens=24))
    assert sum(o.metrics.lookup_drafted_tokens for o in outs) > 0
    assert_all_free(eng)


def test_pack_draft_probs_makes_a_lookups_rows_one_hot():
    from bild_kernels.ops import pack_draft_probs
    p = torch.softmax(torch.randn(2, 6), -1)
    out = pack_draft_probs([[p[0], p[1]], [], []], 3, 6, p, one_hot=[None, [4, 0, 5], [2]])
    assert out.shape == (3, 3, 6)
    assert torch.equal(out[0, :2], p.float()) and not out[0, 2].any()
    want = torch.zeros(2, 3, 6)
    want[0, 0, 4] = want[0, 1, 0] = want[0, 2, 5] = want[1, 0, 2] = 1.0
    assert torch.equal(out[1:], want)

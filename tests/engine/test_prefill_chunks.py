"""Chunked prefill (`Engine(prefill_chunk=N)`): long prompts go through a chunk a step while the others decode; the
same tokens as one pass for every policy, no pass holds more than a chunk of a prompt, the running requests go on
between the chunks, and bad input."""
import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams, SmallOnly, SpeculativeSampling
from bild_kernels.engine.policies import Jacobi, NGram, ShallowDeep

from tests.conftest import requires_gpu

from .conftest import assert_all_free, hf_greedy, tiny_engine
from .test_feature_draft_engine import _engine as _feature_engine
from .test_feature_draft_engine import pair  # noqa: F401 (a fixture)

CHUNK = 5
# 23, 3, 11, 6 and 5 tokens: chunked 4, 0, 2, 1 and 0 times (a prompt of more than CHUNK tokens goes CHUNK at a time
# until CHUNK or fewer are left for its first pass)
PROMPTS = [[(7 * i + 3) % 97 for i in range(23)], [8, 9, 1], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15],
           [33, 34, 35, 36, 37, 38], [5, 17, 3, 9, 9]]
CHUNKS = [4, 0, 2, 1, 0]
N = 10


def _engine(large, small, **kw):
    return tiny_engine(large, small, **{"max_batch_size": 3, **kw})


@pytest.fixture(scope="module")
def chunked(large_model, small_model):
    return _engine(large_model, small_model, prefill_chunk=CHUNK)


@pytest.fixture(scope="module")
def whole(large_model, small_model):
    return _engine(large_model, small_model, prefill_chunk=None)


POLICIES = [LargeOnly(), Greedy(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=1.0, max_draft_len=4),
            SmallOnly(), NGram(max_draft_len=3), Jacobi(block_size=3), ShallowDeep(exit_layer=2),
            Greedy(max_draft_len=2, lookup=NGram(max_draft_len=3)),
            BiLD(fallback_signal="energy", fallback_threshold=-2.0, rollback_threshold=2.0, max_draft_len=3)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_same_tokens_and_metrics_as_one_pass(chunked, whole, policy):
    params = SamplingParams(max_tokens=N)
    want = whole.generate(PROMPTS, params, policy=policy)
    outs = chunked.generate(PROMPTS, params, policy=policy)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    for o, w in zip(outs, want):  # the chunks are passes of their own; every other count is the same
        for name in ("large_passes", "small_steps", "drafted_tokens", "accepted_tokens", "fallbacks", "rollbacks"):
            assert getattr(o.metrics, name) == getattr(w.metrics, name), name
    shallow = policy.name == "shallow-deep"  # (its two layer groups cache apart: prefilled whole)
    assert [o.metrics.prefill_chunks for o in outs] == ([0] * len(PROMPTS) if shallow else CHUNKS)
    assert all(w.metrics.prefill_chunks == 0 for w in want)
    assert_all_free(chunked)


def test_lossless_policies_match_hf_greedy(chunked, large_model, small_model):
    for policy in (Greedy(max_draft_len=4), BiLD(fallback_threshold=0.0, rollback_threshold=0.0, max_draft_len=3),
                   LargeOnly()):
        outs = chunked.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
        assert [o.token_ids for o in outs] == [hf_greedy(large_model, p, N) for p in PROMPTS]
    outs = chunked.generate(PROMPTS, SamplingParams(max_tokens=N), policy=SmallOnly())
    assert [o.token_ids for o in outs] == [hf_greedy(small_model, p, N) for p in PROMPTS]
    assert_all_free(chunked)


def test_speculative_sampling_draws_the_same_tokens(chunked, whole):
    params = SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=7)
    policy = SpeculativeSampling(max_draft_len=3)
    assert ([o.token_ids for o in chunked.generate(PROMPTS, params, policy=policy)]
            == [o.token_ids for o in whole.generate(PROMPTS, params, policy=policy)])


def test_no_pass_holds_more_than_a_chunk_of_a_prompt(large_model, small_model, monkeypatch):
    """Every pass of either model takes at most CHUNK prompt tokens of a row (plus a verification's drafts), where
    the same requests without chunking take whole prompts."""
    widest = {}
    for chunk in (CHUNK, None):
        eng = _engine(large_model, small_model, prefill_chunk=chunk)
        seen = {name: [] for name in eng.runners}
        for name, runner in eng.runners.items():
            def spy(rows, tokens, n_logits, *a, _orig=runner.extend, _seen=seen[name], **k):
                _seen.extend(len(t) for t in tokens)
                return _orig(rows, tokens, n_logits, *a, **k)
            monkeypatch.setattr(runner, "extend", spy)
        eng.generate(PROMPTS, SamplingParams(max_tokens=N), policy=BiLD(fallback_threshold=0.3, rollback_threshold=1.0,
                                                                          max_draft_len=4))
        widest[chunk] = {name: max(v) for name, v in seen.items()}
    assert widest[None]["large"] >= 23 and widest[None]["small"] >= 23
    assert widest[CHUNK]["large"] <= CHUNK + 4 and widest[CHUNK]["small"] <= CHUNK + 4


def test_running_requests_go_on_between_the_chunks(chunked):
    """A request already decoding commits tokens in the steps that prefill a long newcomer's chunks."""
    short, long = [8, 9, 1], PROMPTS[0]
    progress = []
    orig = chunked._prefill_chunk

    def spy(s, policy):
        progress.append(len(first.output_ids) if first is not None else None)
        return orig(s, policy)

    first = None
    chunked._prefill_chunk = spy
    try:
        stream = chunked.stream(short, SamplingParams(max_tokens=30), policy=LargeOnly())
        next(stream)  # the short request runs (its first token out)
        first = next(s.seq for s in chunked._scheduler.running)
        late = chunked.generate([long], SamplingParams(max_tokens=2), policy=LargeOnly())[0]
        for _ in stream:
            pass
    finally:
        del chunked._prefill_chunk
    assert late.metrics.prefill_chunks == 4 and late.token_ids
    assert len(progress) == 4 and progress == sorted(progress) and progress[-1] > progress[0], progress
    assert_all_free(chunked)


def test_a_request_that_times_out_mid_prefill_frees_its_blocks_alone(chunked, whole):
    """A request whose deadline passes between two of its chunks ends with finish_reason "timeout", no tokens and no
    blocks held; the request beside it gets the tokens it gets alone."""
    import time
    orig = chunked._prefill_chunk

    def slow(s, policy):
        time.sleep(0.05)
        return orig(s, policy)

    chunked._prefill_chunk = slow
    try:
        params = [SamplingParams(max_tokens=N, timeout_s=0.08), SamplingParams(max_tokens=N)]
        outs = chunked.generate([PROMPTS[0], PROMPTS[1]], params, policy=Greedy(max_draft_len=3))
    finally:
        del chunked._prefill_chunk
    assert outs[0].finish_reason == "timeout" and outs[0].token_ids == [] and outs[0].metrics.prefill_chunks < 4
    assert outs[1].token_ids == whole.generate([PROMPTS[1]], SamplingParams(max_tokens=N),
                                               policy=Greedy(max_draft_len=3))[0].token_ids
    assert_all_free(chunked)
    # the engine goes on: the same long prompt again, to the end
    again = chunked.generate([PROMPTS[0]], SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=3))[0]
    assert again.metrics.prefill_chunks == 4 and len(again.token_ids) == N


def test_prompt_logprobs_are_the_same(chunked, whole):
    params = SamplingParams(max_tokens=3, prompt_logprobs=2, logprobs=1)
    for policy in (LargeOnly(), Greedy(max_draft_len=3)):
        a = chunked.generate(PROMPTS, params, policy=policy)
        b = whole.generate(PROMPTS, params, policy=policy)
        for x, y in zip(a, b):
            assert len(x.prompt_logprobs) == len(y.prompt_logprobs) and x.prompt_logprobs[0] is None
            torch.testing.assert_close(torch.tensor(x.prompt_logprobs[1:]), torch.tensor(y.prompt_logprobs[1:]),
                                       rtol=1e-9, atol=1e-9)
            assert [[t for t, _ in alt] for alt in x.prompt_top_logprobs[1:]] == \
                [[t for t, _ in alt] for alt in y.prompt_top_logprobs[1:]]
            assert x.token_ids == y.token_ids


def test_with_the_prefix_cache(large_model, small_model, whole):
    """A restored prefix counts as cached: only the rest of a prompt is chunked."""
    eng = _engine(large_model, small_model, prefill_chunk=CHUNK, prefix_cache=256)
    params, policy = SamplingParams(max_tokens=N), Greedy(max_draft_len=3)
    first = eng.generate([PROMPTS[0]], params, policy=policy)[0]
    again = eng.generate([PROMPTS[0][:20] + [4, 4, 4, 4]], params, policy=policy)[0]
    assert first.metrics.prefill_chunks == 4
    assert again.metrics.cached_prompt_tokens == 20 and again.metrics.prefill_chunks == 0
    assert again.token_ids == whole.generate([PROMPTS[0][:20] + [4, 4, 4, 4]], params, policy=policy)[0].token_ids
    assert_all_free(eng)


def test_a_feature_draft_reads_every_chunk_s_features(pair):  # noqa: F811
    teacher, _, path = pair
    prompts = [[(5 * i + 2) % 97 for i in range(30)], [44, 2, 90, 61, 8, 8, 1], [9]]
    runs = {}
    for chunk in (CHUNK, None):
        eng = _feature_engine(teacher, path, prefill_chunk=chunk)
        outs = eng.generate(prompts, SamplingParams(max_tokens=16), policy=Greedy(max_draft_len=3))
        outs += eng.generate(prompts, SamplingParams(max_tokens=16),
                             policy=BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4))
        runs[chunk] = [(o.token_ids, o.metrics.drafted_tokens, o.metrics.accepted_tokens) for o in outs]
        assert sum(o.metrics.prefill_chunks for o in outs) == (12 if chunk else 0)  # 30 and 7 tokens: 5 + 1 a call
        assert_all_free(eng)
    assert runs[CHUNK] == runs[None]


def test_a_feature_draft_s_kept_prompt_holds_every_chunk_s_features(pair, whole):  # noqa: F811
    """With the prefix cache, a chunked prompt is kept with the hidden states of all its positions (the cache checks
    their count), and a later prompt that shares it drafts from them as from a whole prefill's."""
    teacher, _, path = pair
    long = [(5 * i + 2) % 97 for i in range(30)]
    prompts = [long, long[:24] + [3, 3, 3]]
    runs = {}
    for chunk in (CHUNK, None):
        eng = _feature_engine(teacher, path, prefill_chunk=chunk, prefix_cache=256, max_batch_size=1)
        outs = [eng.generate([p], SamplingParams(max_tokens=12), policy=Greedy(max_draft_len=3))[0] for p in prompts]
        assert outs[1].metrics.cached_prompt_tokens == 24
        runs[chunk] = [(o.token_ids, o.metrics.drafted_tokens, o.metrics.accepted_tokens) for o in outs]
        assert [o.metrics.prefill_chunks for o in outs] == ([5, 0] if chunk else [0, 0])
        assert_all_free(eng)
    assert runs[CHUNK] == runs[None]


@requires_gpu
def test_chunked_prefill_on_gpu_under_the_graphed_loop(large_model, small_model):
    """On a GPU (float32, graphed draft runs and passes; chunks run eagerly): the large model's greedy text for the
    lossless policies, chunked as in one pass."""
    outs = {}
    for chunk in (CHUNK, None):
        eng = Engine(large=large_model, small=small_model, device="cuda", dtype=torch.float32, max_batch_size=3,
                     max_model_len=64, block_size=4, prefill_chunk=chunk)
        for policy in (LargeOnly(), Greedy(max_draft_len=4),
                       BiLD(fallback_threshold=0.0, rollback_threshold=0.0, max_draft_len=3)):
            got = eng.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
            outs.setdefault(policy.name, []).append([o.token_ids for o in got])
            assert [o.metrics.prefill_chunks for o in got] == (CHUNKS if chunk else [0] * len(PROMPTS))
        assert_all_free(eng)
    want = [hf_greedy(large_model, p, N) for p in PROMPTS]
    for name, (chunked, whole) in outs.items():
        assert chunked == whole == want, name


@pytest.mark.parametrize("bad", [-1, 2.0, True, "512"])
def test_a_bad_chunk_is_refused(large_model, bad):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(large=large_model, dtype=torch.float64, max_model_len=32, prefill_chunk=bad)


def test_auto_chunks_only_where_it_changes_nothing_but_the_time(large_model):
    # the tiny float64 model's rows are not provably independent of their pass (no packed GGUF blocks)
    assert Engine(large=large_model, dtype=torch.float64, max_model_len=32).prefill_chunk is None
    assert Engine(large=large_model, dtype=torch.float64, max_model_len=32, prefill_chunk=0).prefill_chunk == 0

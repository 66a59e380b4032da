"""SamplingParams.logprobs: each output token's log-probability under the model that decided it, and the top
alternatives there, for every policy, batched, streamed and truncated by the stop conditions."""
import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams, SmallOnly, SpeculativeSampling
from bild_kernels.engine.policies import Jacobi, NGram, ShallowDeep

from tests.conftest import requires_gpu

from .conftest import assert_all_free, flat_pair

PROMPTS = [[5, 17, 3, 44], [2, 90, 61, 7, 7, 12, 30, 1], [15, 8]]
N = 12
TOP = 3


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=3, max_model_len=64,
                  block_size=4)


def _teacher_forced(model, prompt, output):
    """The model's log-softmax at each output position, given the prompt and the output before it: [n, V]."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:len(prompt) + len(output) - 1]
    return torch.log_softmax(logits.double(), -1)


def _assert_logprobs_of(model, prompt, out, top):
    assert len(out.logprobs) == len(out.token_ids) == len(out.top_logprobs)
    want = _teacher_forced(model, prompt, out.token_ids)
    got = torch.tensor(out.logprobs, dtype=torch.float64)
    torch.testing.assert_close(got, want.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0], rtol=0, atol=1e-9)
    vals, ids = want.topk(top, -1)
    for j, alts in enumerate(out.top_logprobs):
        assert [t for t, _ in alts] == ids[j].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in alts], dtype=torch.float64), vals[j], rtol=0, atol=1e-9)


POLICIES = [LargeOnly(), Greedy(max_draft_len=3),
            BiLD(fallback_threshold=0.3, rollback_threshold=3.0, max_draft_len=4),  # lossy: keeps non-argmax drafts
            NGram(max_draft_len=3, min_ngram=1), Jacobi(block_size=3), ShallowDeep(exit_layer=2),
            Greedy(max_draft_len=2, lookup=NGram(max_draft_len=3, min_ngram=1))]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_logprobs_are_the_large_model_s_at_every_committed_token(engine, large_model, policy):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N, logprobs=TOP), policy=policy)
    for p, o in zip(PROMPTS, outs):
        assert len(o.token_ids) == N
        _assert_logprobs_of(large_model, p, o, TOP)
    assert_all_free(engine)


def test_lossy_bild_reports_what_the_large_model_thought_of_its_accepted_drafts(engine, large_model):
    policy = BiLD(fallback_threshold=0.0, rollback_threshold=6.0, max_draft_len=4)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N, logprobs=1), policy=policy)
    kept_non_argmax = 0
    for p, o in zip(PROMPTS, outs):
        _assert_logprobs_of(large_model, p, o, 1)
        kept_non_argmax += sum(t != alts[0][0] for t, alts in zip(o.token_ids, o.top_logprobs))
    assert kept_non_argmax > 0  # the test reaches tokens the large model would not have chosen


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampled_tokens_get_raw_logprobs(engine, large_model, temperature):
    params = SamplingParams(max_tokens=N, temperature=temperature, top_k=20, seed=3, logprobs=2)
    for policy in (SpeculativeSampling(max_draft_len=3), LargeOnly(), BiLD(fallback_threshold=0.2,
                                                                           rollback_threshold=2.0, max_draft_len=3)):
        for p, o in zip(PROMPTS, engine.generate(PROMPTS, params, policy=policy)):
            _assert_logprobs_of(large_model, p, o, 2)


def test_small_only_reports_the_small_model_s(engine, small_model):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N, logprobs=TOP), policy=SmallOnly())
    for p, o in zip(PROMPTS, outs):
        _assert_logprobs_of(small_model, p, o, TOP)


def test_the_same_tokens_with_and_without_logprobs(engine):
    policy = BiLD(fallback_threshold=0.3, rollback_threshold=1.0, max_draft_len=4)
    a = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    b = engine.generate(PROMPTS, SamplingParams(max_tokens=N, logprobs=0), policy=policy)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(o.logprobs is None and o.top_logprobs is None for o in a)
    assert all(len(o.logprobs) == N and o.top_logprobs == [[]] * N for o in b)


def test_stream_chunks_carry_their_tokens_logprobs(engine, large_model):
    params = SamplingParams(max_tokens=N, logprobs=2)
    chunks = list(engine.stream(PROMPTS[1], params, policy=Greedy(max_draft_len=3)))
    assert all(len(c.logprobs) == len(c.token_ids) == len(c.top_logprobs) for c in chunks)
    out = chunks[-1].output
    assert sum((c.logprobs for c in chunks), []) == out.logprobs
    assert sum((c.top_logprobs for c in chunks), []) == out.top_logprobs
    _assert_logprobs_of(large_model, PROMPTS[1], out, 2)
    plain = list(engine.stream(PROMPTS[1], SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=3)))
    assert all(c.logprobs is None and c.top_logprobs is None for c in plain)


def test_stop_conditions_trim_the_logprobs_with_the_tokens(engine, large_model):
    policy = Greedy(max_draft_len=4)
    full = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=N, logprobs=1), policy=policy)[0]
    stop_at = full.token_ids[5]
    cut = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=N, logprobs=1, stop=(stop_at,)), policy=policy)[0]
    k = full.token_ids.index(stop_at) + 1
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[:k]
    # (a pass over fewer drafts may round the last bit differently: float64 logits)
    torch.testing.assert_close(cut.logprobs, full.logprobs[:k], rtol=0, atol=1e-12)
    assert [[t for t, _ in a] for a in cut.top_logprobs] == [[t for t, _ in a] for a in full.top_logprobs[:k]]
    short = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, logprobs=1), policy=policy)[0]
    assert short.token_ids == full.token_ids[:3] and len(short.logprobs) == len(short.top_logprobs) == 3
    torch.testing.assert_close(short.logprobs, full.logprobs[:3], rtol=0, atol=1e-12)
    assert_all_free(engine)


@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("bad", [-1, 21, True, 1.5, "3"])
def test_bad_logprobs_are_refused(name, bad):
    with pytest.raises(ValueError, match=f"^{name} must be None or an int"):
        SamplingParams(**{name: bad})


def test_more_alternatives_than_the_vocabulary_fails_that_request_only():
    large, small = flat_pair(vocab=12)
    eng = Engine(large=large, small=small, dtype=torch.float64, max_batch_size=2, max_model_len=32, block_size=4)
    outs = eng.generate([[1, 2], [3, 4]], [SamplingParams(max_tokens=4, logprobs=13),
                                           SamplingParams(max_tokens=4, logprobs=12)], policy=Greedy())
    assert outs[0].finish_reason == "error" and "logprobs=13" in outs[0].error and outs[0].logprobs == []
    assert len(outs[1].token_ids) == 4 and len(outs[1].top_logprobs[0]) == 12
    assert_all_free(eng)


@requires_gpu
@pytest.mark.parametrize("policy, params", [
    (BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4), SamplingParams(max_tokens=N, logprobs=3)),
    (SpeculativeSampling(max_draft_len=3), SamplingParams(max_tokens=N, temperature=1.0, seed=3, logprobs=3)),
    (LargeOnly(), SamplingParams(max_tokens=N, logprobs=0))], ids=["bild", "speculative-sampling", "large-only"])
def test_logprobs_on_gpu_under_the_graphed_loop_and_passes(large_model, small_model, policy, params):
    """On a GPU (graphed draft runs and extend passes, float32): the same tokens as without logprobs, and the large
    model's log-softmax at each of them within float32 rounding."""
    eng = Engine(large=large_model, small=small_model, device="cuda", dtype=torch.float32, max_batch_size=3,
                 max_model_len=64, block_size=4)
    plain = eng.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=params.temperature, seed=params.seed),
                         policy=policy)
    outs = eng.generate(PROMPTS, params, policy=policy)
    for p, a, o in zip(PROMPTS, plain, outs):
        assert a.token_ids == o.token_ids and len(o.logprobs) == len(o.token_ids) == len(o.top_logprobs)
        want = _teacher_forced(large_model, p, o.token_ids)
        got = torch.tensor(o.logprobs, dtype=torch.float64)
        torch.testing.assert_close(got, want.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0], rtol=0, atol=1e-3)
        assert all(len(a) == params.logprobs for a in o.top_logprobs)
    assert_all_free(eng)


def _assert_prompt_logprobs_of(model, prompt, out, top):
    assert len(out.prompt_logprobs) == len(out.prompt_top_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
    if len(prompt) == 1:
        return
    want = _teacher_forced(model, prompt[:1], prompt[1:])
    got = torch.tensor(out.prompt_logprobs[1:], dtype=torch.float64)
    torch.testing.assert_close(got, want.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], rtol=0, atol=1e-9)
    vals, ids = want.topk(top, -1) if top else (None, None)
    for j, alts in enumerate(out.prompt_top_logprobs[1:]):
        assert [t for t, _ in alts] == (ids[j].tolist() if top else [])
        if top:
            torch.testing.assert_close(torch.tensor([v for _, v in alts], dtype=torch.float64), vals[j], rtol=0,
                                       atol=1e-9)


@pytest.mark.parametrize("policy", [LargeOnly(), Greedy(max_draft_len=3),
                                    BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4),
                                    NGram(max_draft_len=3, min_ngram=1), Jacobi(block_size=3)], ids=lambda p: p.name)
def test_prompt_logprobs_are_the_large_model_s_and_change_no_output(engine, large_model, policy):
    prompts = PROMPTS + [[42]]
    params = [SamplingParams(max_tokens=N, prompt_logprobs=2), SamplingParams(max_tokens=N),  # a row that does not ask
              SamplingParams(max_tokens=N, prompt_logprobs=0, logprobs=1),
              SamplingParams(max_tokens=N, prompt_logprobs=1)]
    outs = engine.generate(prompts, params, policy=policy)
    plain = engine.generate(prompts, SamplingParams(max_tokens=N), policy=policy)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    for p, o, sp in zip(prompts, outs, params):
        if sp.prompt_logprobs is None:
            assert o.prompt_logprobs is None and o.prompt_top_logprobs is None
        else:
            _assert_prompt_logprobs_of(large_model, p, o, sp.prompt_logprobs)
    _assert_logprobs_of(large_model, prompts[2], outs[2], 1)
    assert_all_free(engine)


def test_prompt_logprobs_skip_the_prefix_cache_and_refuse_what_cannot_give_them(large_model, small_model):
    eng = Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=2, max_model_len=64,
                 block_size=4, prefix_cache=256)
    eng.generate([PROMPTS[1]], SamplingParams(max_tokens=2))
    hit = eng.generate([PROMPTS[1] + [3]], SamplingParams(max_tokens=2))[0]
    assert hit.metrics.cached_prompt_tokens == len(PROMPTS[1])
    scored = eng.generate([PROMPTS[1] + [4]], SamplingParams(max_tokens=2, prompt_logprobs=1))[0]
    assert scored.metrics.cached_prompt_tokens == 0  # its prefill scores every prompt token
    _assert_prompt_logprobs_of(large_model, PROMPTS[1] + [4], scored, 1)
    for policy in (SmallOnly(), ShallowDeep(exit_layer=2)):
        out = eng.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(max_tokens=3, prompt_logprobs=0),
                                                      SamplingParams(max_tokens=3)], policy=policy)
        assert out[0].finish_reason == "error" and "prompt_logprobs come from the large model's prefill" in out[0].error
        assert len(out[1].token_ids) == 3
    assert_all_free(eng)


def test_the_fixed_buffer_paths_give_the_same_logprobs(large_model, small_model):
    """The CPU twins of the GPU's graphed paths (draft_loop and extend_passes "static": the same fixed buffers, not
    captured): the same tokens, logprobs and prompt logprobs as the eager engine."""
    params = SamplingParams(max_tokens=N, logprobs=2, prompt_logprobs=1)
    policy = BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4)
    outs = {}
    for mode in ("eager", "static"):
        eng = Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=3, max_model_len=64,
                     block_size=4, draft_loop=mode, extend_passes=mode)
        outs[mode] = eng.generate(PROMPTS, params, policy=policy)
        assert_all_free(eng)
    for a, b, p in zip(outs["eager"], outs["static"], PROMPTS):
        assert a.token_ids == b.token_ids
        assert [t for t, _ in sum(a.top_logprobs, [])] == [t for t, _ in sum(b.top_logprobs, [])]
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.prompt_logprobs[1:], b.prompt_logprobs[1:], rtol=0, atol=1e-12)
        _assert_logprobs_of(large_model, p, b, 2)
        _assert_prompt_logprobs_of(large_model, p, b, 1)

"""FREE's shallow-deep decoding: the large model's first layers draft, its deep layers catch up in one pass."""
import pytest
import torch

from bild_kernels import Engine, SamplingParams, ShallowDeep

from .conftest import assert_all_free, greedy_speculative_reference, hf_greedy, shallow_copy

PROMPTS = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 37, 38]]
N = 12


@pytest.fixture(scope="module")
def engine(large_model):
    return Engine(large=large_model, small=None, dtype=torch.float64, max_batch_size=3, max_model_len=64,
                  block_size=4)


@pytest.fixture(scope="module")
def oracle(large_model):
    return [hf_greedy(large_model, p, N) for p in PROMPTS]


@pytest.mark.parametrize("policy", [ShallowDeep(exit_layer=2), ShallowDeep(exit_layer=1, max_draft_len=4),
                                    ShallowDeep(exit_layer=2, fallback_threshold=0.0, max_draft_len=3),
                                    ShallowDeep(exit_layer=2, fallback_threshold=0.3, max_draft_len=1)],
                         ids=["L2", "L1-draft4", "L2-never-unsure-capped", "L2-draft1"])
def test_shallow_deep_matches_hf_greedy(engine, oracle, policy):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert [o.token_ids for o in outs] == oracle
    m = [o.metrics for o in outs]
    assert sum(x.drafted_tokens for x in m) > 0 and all(x.large_passes <= N for x in m)
    assert all(x.small_steps > 0 for x in m)  # shallow passes
    assert_all_free(engine)


def _reference(large, shallow, prompt, n, threshold, max_draft_len):
    """Greedy speculative decoding with `shallow` (a plain HF model) as the draft, unsure below `threshold`:
    (output, drafted, accepted, fallbacks)."""
    return greedy_speculative_reference(large, shallow, prompt, n, max_draft_len,
                                        unsure=lambda z: torch.softmax(z, 0).max().item() < threshold)


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_the_draft_is_the_first_layers_with_norm_and_head(engine, large_model, exit_layer):
    shallow = shallow_copy(large_model, layers=exit_layer, noise=0.0)  # the large model's first layers, exactly
    policy = ShallowDeep(exit_layer=exit_layer, fallback_threshold=0.4, max_draft_len=4)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    for p, o in zip(PROMPTS, outs):
        ref, drafted, accepted, fallbacks = _reference(large_model, shallow, p, N, 0.4, 4)
        assert o.token_ids == ref
        assert (o.metrics.drafted_tokens, o.metrics.accepted_tokens, o.metrics.fallbacks) == (drafted, accepted,
                                                                                              fallbacks)
    assert sum(o.metrics.accepted_tokens for o in outs) > 0 and sum(o.metrics.fallbacks for o in outs) > 0


def test_batch_composition_does_not_change_sampled_outputs(engine):
    policy = ShallowDeep(exit_layer=2, max_draft_len=4, rollback_threshold=2.0)
    params = SamplingParams(max_tokens=N, temperature=0.8, seed=7)
    together = engine.generate(PROMPTS, params, policy=policy)
    alone = [engine.generate([p], params, policy=policy)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == N for o in together)
    assert_all_free(engine)


def test_stream_and_abandon_free_both_layer_groups(engine, oracle):
    chunks = list(engine.stream(PROMPTS[1], SamplingParams(max_tokens=N), policy=ShallowDeep(exit_layer=2)))
    assert sum((c.token_ids for c in chunks), []) == oracle[1]
    it = engine.stream(PROMPTS[0], SamplingParams(max_tokens=N), policy=ShallowDeep(exit_layer=1))
    next(it)
    it.close()
    assert_all_free(engine)


def test_exit_layer_must_leave_deep_layers(engine):
    for bad in (3, 7):  # the tiny large model has 3 layers
        with pytest.raises(ValueError, match="exit_layer"):
            engine.generate([[1, 2]], SamplingParams(max_tokens=2), policy=ShallowDeep(exit_layer=bad))
    assert_all_free(engine)


@pytest.mark.parametrize("bad, match", [(dict(exit_layer=0), "exit_layer"), (dict(exit_layer=1.0), "exit_layer"),
                                        (dict(exit_layer=True), "exit_layer"),
                                        (dict(exit_layer=1, fallback_threshold=1.5), "fallback_threshold"),
                                        (dict(exit_layer=1, rollback_threshold=-0.5), "rollback_threshold"),
                                        (dict(exit_layer=1, max_draft_len=0), "max_draft_len")])
def test_bad_parameters_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        ShallowDeep(**bad)

"""Numeric faults: a NaN or inf in one row's logits ends that request with a clear error; the rest of
the batch, and every later request that reuses its blocks, is unharmed.

The fault is injected where real ones come from: a NaN row in a model's embedding (corrupt weights),
so the poisoned request also writes NaN keys and values into its KV blocks.
"""
import threading

import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams, ShallowDeep, SmallOnly

from .conftest import assert_all_free, hf_greedy

POISON = 13
CLEAN = [[5, 17, 3], [44, 2, 90, 61, 7], [8], [33, 34, 35, 36]]
N = 10


def _poisoned_engine(large_model, small_model, which=("large",)):
    eng = Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=3, max_model_len=64,
                 block_size=4)
    for name in which:
        ex = eng.runners[name].executor
        ex.embed = ex.embed.clone()  # never touch the shared session models
        ex.embed[POISON] = float("nan")
    return eng


@pytest.fixture(scope="module")
def oracle(large_model):
    assert not any(POISON in p + hf_greedy(large_model, p, N) for p in CLEAN)
    return [hf_greedy(large_model, p, N) for p in CLEAN]


@pytest.mark.parametrize("which, policy, model", [
    (("large",), LargeOnly(), "large"), (("large",), Greedy(max_draft_len=3), "large"),
    (("small",), BiLD(fallback_threshold=0.3, rollback_threshold=0.0), "small"),
    (("large",), ShallowDeep(exit_layer=2), "large")], ids=["large-only", "greedy", "bild-small", "shallow-deep"])
def test_poisoned_prompt_fails_alone(large_model, small_model, oracle, which, policy, model):
    eng = _poisoned_engine(large_model, small_model, which)
    prompts = [CLEAN[0], [1, POISON, 2], CLEAN[1], CLEAN[2], CLEAN[3]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=N), policy=policy)
    bad = outs[1]
    assert bad.finish_reason == "error" and bad.token_ids == []
    assert f"the {model} model produced non-finite logits" in bad.error
    assert [o.token_ids for o in outs[:1] + outs[2:]] == oracle
    assert_all_free(eng)
    # The poisoned request's blocks (NaN keys and values in them) serve the next requests cleanly.
    assert [o.token_ids for o in eng.generate(CLEAN, SamplingParams(max_tokens=N), policy=policy)] == oracle
    assert_all_free(eng)


def test_fault_mid_generation_keeps_the_tokens_before_it(large_model, small_model):
    prompt = CLEAN[1]
    full = hf_greedy(large_model, prompt, N)
    k = next(i for i, t in enumerate(full) if t not in prompt + full[:i])
    eng = Engine(large=large_model, dtype=torch.float64, max_batch_size=2, max_model_len=64, block_size=4)
    ex = eng.runners["large"].executor
    ex.embed = ex.embed.clone()
    ex.embed[full[k]] = float("nan")
    out = eng.generate([prompt], SamplingParams(max_tokens=N), policy=LargeOnly())[0]
    # The token itself is committed; the pass that reads it back produces the NaN.
    assert out.finish_reason == "error" and out.token_ids == full[:k + 1]
    assert f"after {k + 1} output tokens" in out.error
    # asked for, the log-probabilities of the tokens it keeps: as many, all finite
    out = eng.generate([prompt], SamplingParams(max_tokens=N, logprobs=2), policy=LargeOnly())[0]
    assert out.finish_reason == "error" and out.token_ids == full[:k + 1]
    assert len(out.logprobs) == len(out.top_logprobs) == k + 1
    assert all(lp <= 0 for lp in out.logprobs) and torch.isfinite(torch.tensor(out.logprobs)).all()
    assert_all_free(eng)


def test_small_only_and_streams_fail_cleanly(large_model, small_model):
    eng = _poisoned_engine(large_model, small_model, ("small",))
    out = eng.generate([[POISON, 4]], SamplingParams(max_tokens=N), policy=SmallOnly())[0]
    assert out.finish_reason == "error" and "small model" in out.error
    chunks = list(eng.stream([POISON], SamplingParams(max_tokens=N), policy=Greedy()))
    assert [c.finished for c in chunks] == [True] and chunks[-1].finish_reason == "error"
    assert "small model" in chunks[-1].output.error and chunks[-1].output.token_ids == []
    assert_all_free(eng)


def test_concurrent_faults_do_not_disturb_the_others(large_model, small_model, oracle):
    eng = _poisoned_engine(large_model, small_model, ("large", "small"))
    prompts = [[POISON, 1]] + CLEAN + [[2, POISON]] + CLEAN
    results = [None] * len(prompts)

    def run(i):
        results[i] = eng.generate([prompts[i]], SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=3))[0]

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    assert [r.finish_reason for r in (results[0], results[5])] == ["error", "error"]
    assert [r.token_ids for r in results[1:5] + results[6:]] == oracle + oracle
    assert_all_free(eng)


def test_score_refuses_non_finite_logits(large_model, small_model):
    eng = _poisoned_engine(large_model, small_model)
    with pytest.raises(ValueError, match="non-finite"):
        eng.score([POISON, 1], [2, 3])
    assert len(eng.score([1], [2, 3])) == 2
    assert_all_free(eng)


def test_screen_logits_flags_nan_inf_and_empty_rows(large_model):
    eng = Engine(large=large_model, dtype=torch.float64, max_batch_size=6, max_model_len=32, block_size=4)
    runner = eng.runners["large"]
    logits = torch.randn(5, 2, 7, dtype=torch.float64)
    logits[0, 1, 3] = float("nan")
    logits[1, 0, 0] = float("inf")
    logits[2] = float("-inf")  # nothing left to sample from
    logits[3, :, :4] = float("-inf")  # a draft head's reduced vocabulary: fine
    keep = logits[3:].clone()
    out = runner.screen_logits([5, 0, 2, 1, 3], logits)
    assert out is logits and torch.equal(logits[:3], torch.zeros(3, 2, 7, dtype=torch.float64))
    assert torch.equal(logits[3:], keep)
    assert runner.take_nonfinite() == [0, 2, 5] and runner.take_nonfinite() == []
    clean = torch.randn(2, 3, 7, dtype=torch.float64)
    keep = clean.clone()
    assert runner.screen_logits([1, 4], clean) is clean and torch.equal(clean, keep)
    assert runner.take_nonfinite() == []
    masked = torch.randn(2, 3, 7, dtype=torch.float64)
    masked[1, 2, 5] = float("-inf")  # some -inf logits but no empty row: the CPU fast path's sum is -inf, not bad
    keep = masked.clone()
    assert runner.screen_logits([1, 4], masked) is masked and torch.equal(masked, keep)
    assert runner.take_nonfinite() == []


def test_both_models_faulty_rows_are_read_together(large_model, small_model):
    """The step's faults of the large and the small model come back in one host read (engine.runner.take_nonfinite:
    one GPU synchronisation a step, not one per model), each model's rows its own, and are forgotten after."""
    from bild_kernels.engine.runner import take_nonfinite
    eng = Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=4, max_model_len=32,
                 block_size=4)
    large, small = eng.runners["large"], eng.runners["small"]
    large.note_nonfinite([0, 1, 2], torch.tensor([False, True, False]))
    small.note_nonfinite([1, 3], torch.tensor([True, True]))
    assert take_nonfinite([large, small]) == [[1], [1, 3]]
    assert take_nonfinite([large, small]) == [[], []]
    small.note_nonfinite([2], torch.tensor([True]))
    assert take_nonfinite([large, small]) == [[], [2]] and small.take_nonfinite() == []


@pytest.mark.parametrize("which, policy, model", [
    (("large",), LargeOnly(), "large"), (("small",), BiLD(fallback_threshold=0.3, rollback_threshold=0.0), "small")],
    ids=["large-only", "bild-small"])
def test_a_verifying_step_reads_its_faults_with_its_verdicts(large_model, small_model, oracle, monkeypatch, which,
                                                            policy, model):
    """A step that verifies reads every model's fault flags in the same host read as its verdicts (Engine.step_faults):
    the scheduler never reads them a second time (on a GPU: one synchronisation a step fewer)."""
    from bild_kernels.engine import scheduler

    def read_again(runners):
        raise AssertionError("the scheduler read the fault flags again")

    eng = _poisoned_engine(large_model, small_model, which)
    monkeypatch.setattr(scheduler, "take_nonfinite", read_again)
    outs = eng.generate([CLEAN[0], [1, POISON, 2], CLEAN[1]], SamplingParams(max_tokens=N), policy=policy)
    assert outs[1].finish_reason == "error" and f"the {model} model produced non-finite logits" in outs[1].error
    assert [outs[0].token_ids, outs[2].token_ids] == [oracle[0], oracle[1]]
    assert eng.step_faults is None  # taken
    assert_all_free(eng)

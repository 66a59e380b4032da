"""The shipped draft format: own layers on disk, the large model's embedding and head borrowed at load time."""
import json

import pytest
import torch

from bild_kernels import Engine, Greedy, SamplingParams
from bild_kernels.engine.runner import ModelRunner
from bild_kernels.models import load_model
from bild_kernels.models.draft import MANIFEST, load_draft, save_draft

from .conftest import assert_all_free, hf_greedy, shallow_copy, tiny_llama

VOCAB = torch.arange(0, 97, 2)  # the draft's head scores the even ids only


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, large_model, small_model):
    base, _ = load_model(large_model, dtype=torch.float64)
    path = tmp_path_factory.mktemp("draft")
    save_draft(path, small_model.state_dict(), base=base, init_layers=[0, 1], draft_vocab=VOCAB, base_name="tiny",
               card="# tiny draft\n", policy={"fallback_threshold": 0.5, "rollback_threshold": 3.0},
               dtype=torch.float64)
    return path


def _logits(executor, ids):
    runner = ModelRunner(executor, num_blocks=8, block_size=4, max_seqs=1, max_blocks_per_seq=8)
    runner.add(0)
    return runner.extend([0], [ids], [len(ids)])[0]


def test_draft_dir_holds_only_its_own_weights(draft_dir):
    from safetensors.torch import load_file
    names = set(load_file(str(draft_dir / "model.safetensors")))
    assert "draft_vocab" in names and "model.norm.weight" in names
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert json.loads((draft_dir / MANIFEST).read_text())["init_layers"] == [0, 1]
    assert (draft_dir / "README.md").read_text().startswith("# tiny draft")


def test_loaded_draft_equals_the_model_it_was_saved_from(draft_dir, large_model, small_model):
    base, _ = load_model(large_model, dtype=torch.float64)
    draft = load_draft(draft_dir, base)
    assert draft.embed.data_ptr() == base.embed.data_ptr(), "the embedding must be shared, not copied"
    ids = [5, 17, 3, 44, 2, 90]
    got = _logits(draft, ids)
    with torch.no_grad():
        want = small_model(torch.tensor([ids])).logits[0]
    even = VOCAB
    torch.testing.assert_close(got[:, even], want[:, even])
    odd = torch.arange(1, 97, 2)
    assert torch.isinf(got[:, odd]).all() and (got[:, odd] < 0).all()


def test_engine_with_draft_dir_is_lossless_and_takes_the_recommended_policy(draft_dir, large_model):
    eng = Engine(large=large_model, small=str(draft_dir), dtype=torch.float64, max_batch_size=2, max_model_len=64,
                 block_size=4)
    assert (eng.default_policy.fallback_threshold, eng.default_policy.rollback_threshold) == (0.5, 3.0)
    prompts = [[5, 17, 3], [8, 9]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=10), policy=Greedy(max_draft_len=3))
    assert [o.token_ids for o in outs] == [hf_greedy(large_model, p, 10) for p in prompts]
    assert sum(o.metrics.drafted_tokens for o in outs) > 0
    assert_all_free(eng)


def test_greedy_drafts_over_the_reduced_head_equal_the_full_vocabulary_ones(draft_dir, large_model, monkeypatch):
    """Greedy rows draft from logits over the head's own ids (no [n, V] expansion): the same drafts,
    fallbacks and accepted counts as drafting from the full-vocabulary logits, for BiLD and SmallOnly."""
    from bild_kernels import BiLD, SmallOnly
    from bild_kernels.engine.drafting import Drafting

    def run(reduced: bool):
        eng = Engine(large=large_model, small=str(draft_dir), dtype=torch.float64, max_batch_size=3,
                     max_model_len=64, block_size=4)
        calls = []
        real = Drafting._head_vocab

        def spy(self, running):
            got = real(self, running)
            calls.append(got is not None)
            return got if reduced else None
        monkeypatch.setattr(Drafting, "_head_vocab", spy)
        prompts = [[5, 17, 3], [8, 9], [40, 41, 42, 43]]
        outs = [eng.generate(prompts, SamplingParams(max_tokens=12), policy=pol)
                for pol in (BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=3), SmallOnly())]
        monkeypatch.setattr(Drafting, "_head_vocab", real)
        assert calls and all(calls), "greedy rows with a reduced head should draft over it"
        assert_all_free(eng)
        return [(o.token_ids, o.metrics.drafted_tokens, o.metrics.accepted_tokens, o.metrics.fallbacks)
                for batch in outs for o in batch]

    got, want = run(True), run(False)
    assert got == want
    assert sum(d for _, d, _, _ in got) > 0 and sum(f for *_, f in got) > 0  # drafts and fallbacks both seen


def test_small_only_logprobs_over_the_reduced_head_equal_the_full_vocabulary_ones(draft_dir, large_model,
                                                                                  monkeypatch):
    """SmallOnly's logprobs (SamplingParams.logprobs) from logits over the head's own ids: its top alternatives
    mapped back to token ids, the same values as from the [n, V] logits (-inf outside the head)."""
    from bild_kernels import SmallOnly
    from bild_kernels.engine.drafting import Drafting
    eng = Engine(large=large_model, small=str(draft_dir), dtype=torch.float64, max_batch_size=2, max_model_len=64,
                 block_size=4)
    prompts, params = [[5, 17, 3], [8, 9]], SamplingParams(max_tokens=8, logprobs=4)
    reduced = eng.generate(prompts, params, policy=SmallOnly())
    assert eng._head_vocab([type("Row", (), {"params": params})()]) is not None
    monkeypatch.setattr(Drafting, "_head_vocab", lambda self, running: None)
    full = eng.generate(prompts, params, policy=SmallOnly())
    for a, b in zip(reduced, full):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-12)
        assert [[t for t, _ in x] for x in a.top_logprobs] == [[t for t, _ in x] for x in b.top_logprobs]
        assert all(t == x[0][0] for t, x in zip(a.token_ids, a.top_logprobs))  # greedy: the top alternative
    assert_all_free(eng)


def test_sampled_rows_draft_over_the_full_vocabulary(draft_dir, large_model):
    eng = Engine(large=large_model, small=str(draft_dir), dtype=torch.float64, max_batch_size=2, max_model_len=64,
                 block_size=4)

    class Row:
        def __init__(self, t):
            self.params = SamplingParams(max_tokens=4, temperature=t)
    assert eng._head_vocab([Row(0.0), Row(0.0)]) is not None
    assert eng._head_vocab([Row(0.0), Row(0.7)]) is None  # a sampled row's noise is indexed by token id


def test_draft_for_another_large_model_is_refused(draft_dir):
    other, _ = load_model(tiny_llama(7, layers=3), dtype=torch.float64)
    with pytest.raises(ValueError, match="draft was made for"):
        load_draft(draft_dir, other)
    with pytest.raises(ValueError, match="small given without large"):
        Engine(small=str(draft_dir))


def test_draft_without_its_large_model_is_refused(draft_dir):
    with pytest.raises(ValueError, match="borrows a large model"):
        load_model(str(draft_dir), dtype=torch.float64)


def test_draft_of_another_shape_is_refused(tmp_path, large_model):
    wide = tiny_llama(4, layers=2, hidden=32)
    base, _ = load_model(wide, dtype=torch.float64)
    save_draft(tmp_path, shallow_copy(wide, layers=1, noise=0.0).state_dict(), base=base, init_layers=[0])
    other, _ = load_model(large_model, dtype=torch.float64)
    with pytest.raises(ValueError, match="hidden_size=32 vs 64"):
        load_draft(tmp_path, other)


@pytest.mark.parametrize("ids, match", [(torch.tensor([3, 2]), "sorted"), (torch.tensor([0, 97]), r"\[0, 97\)"),
                                        (torch.tensor([0.5]), "int tensor"), (torch.tensor([], dtype=torch.int64),
                                                                              r"\[0, 97\)")])
def test_bad_head_vocab(large_model, ids, match):
    from bild_kernels.models import LlamaExecutor
    base, _ = load_model(large_model, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        LlamaExecutor(base.config, large_model.state_dict(), head_vocab=ids)

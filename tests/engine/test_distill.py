"""The distillation tool's pieces on a tiny teacher: layer copying, targets, agreement, a training step;
distill() on a device, with more samples per prompt, a corpus time budget and a warm start; file parts."""
import json
import re
import shutil
from collections import Counter

import pytest
import torch

from bild_kernels import cli
from bild_kernels.distill import parts
from bild_kernels.distill.corpus import chat_ids, generate_corpus
from bild_kernels.distill.pipeline import distill
from bild_kernels.distill.prompts import all_train_prompts, held_out_prompts
from bild_kernels.distill.train import agreement, build_draft, frequent_tokens, teacher_targets, train
from bild_kernels.hf import hf_model
from tests.conftest import requires_gpu

from .conftest import hf_greedy, tiny_llama, word_tokenizer


def _teacher():
    t = tiny_llama(5, layers=3, dtype=torch.float32)
    return t


def test_a_draft_with_every_layer_agrees_with_its_teacher_everywhere():
    teacher = _teacher()
    prompts = [[5, 17, 3], [44, 2, 90, 61]]
    pairs = [(p + hf_greedy(teacher, p, 8), len(p)) for p in prompts]
    full = build_draft(teacher, [0, 1, 2])
    assert agreement(full, pairs) == 1.0
    shallow = build_draft(teacher, [0])
    assert 0.0 <= agreement(shallow, pairs) < 1.0


def test_a_qwen3_teachers_layers_draft_keeps_its_norms_and_loads_beside_it(tmp_path):
    """A Qwen3 teacher: the draft is a Qwen3 model (per-head q/k norms, each layer's sliding or full attention
    kept), saved as a draft directory that the engine loads beside the teacher."""
    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
    from bild_kernels.distill.feature_model import check_feature_teacher
    from bild_kernels.models import load_model
    from bild_kernels.models.draft import save_draft

    from .test_model_families import tiny_qwen3
    teacher = tiny_qwen3(5, 3, torch.float32, window=8)
    prompts = [[5, 17, 3], [44, 2, 90, 61]]
    pairs = [(p + hf_greedy(teacher, p, 8), len(p)) for p in prompts]
    full = build_draft(teacher, [0, 1, 2])
    assert type(full).__name__ == "Qwen3ForCausalLM" and agreement(full, pairs) == 1.0
    draft = build_draft(teacher, [0, 2])
    assert draft.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.equal(draft.model.layers[1].self_attn.k_norm.weight, teacher.model.layers[2].self_attn.k_norm.weight)
    teacher.save_pretrained(tmp_path / "large")
    save_draft(tmp_path / "draft", draft.state_dict(), base=load_model(teacher, dtype=torch.float32)[0],
               init_layers=[0, 2], base_name="tiny-qwen3", dtype=torch.float32)
    engine = Engine(large=str(tmp_path / "large"), small=str(tmp_path / "draft"), dtype=torch.float32,
                    max_model_len=64, block_size=4)
    assert engine.runners["small"].executor.layers[1].k_norm is not None
    params = SamplingParams(max_tokens=8)
    want = [o.token_ids for o in engine.generate(prompts, params, policy=LargeOnly())]
    outs = engine.generate(prompts, params, policy=Greedy(max_draft_len=3))
    assert [o.token_ids for o in outs] == want and sum(o.metrics.accepted_tokens for o in outs) > 0
    check_feature_teacher(teacher)  # a feature draft copies its layer too (tests/engine/test_feature_draft_engine.py)
    check_feature_teacher(_teacher())


@pytest.mark.parametrize("family, kind", [("qwen3", "layers"), ("qwen3", "feature"), ("gemma3", "layers"),
                                          ("gemma3", "feature"), ("granite", "layers"), ("granite", "feature")])
def test_distill_other_families_end_to_end(tmp_path, family, kind):
    """`bild distill` on a Qwen3, Gemma 3 or Granite teacher (its own tokenizer on disk): a draft the engine loads
    beside it, lossless; a feature draft of Gemma's or Granite's layer form is refused before any work."""
    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams

    from .test_model_families import tiny_model
    tiny_model(family, 5, 3, torch.float32, window=8).save_pretrained(tmp_path / "large")
    _tokenizer().save_pretrained(tmp_path / "large")
    run = lambda: distill(large=tmp_path / "large", out=tmp_path / "out", prompts=4, max_new_tokens=4,  # noqa: E731
                          minutes=0.003, bf16=False, work_dir=tmp_path / "work", draft_vocab=30, kind=kind, **QUIET)
    if family != "qwen3" and kind == "feature":
        with pytest.raises(ValueError, match=r"kind='feature' copies a Llama-form layer \(SwiGLU, pre-norms\); the "
                                             rf"large model's \({family}(_text)?\) has another form"):
            run()
        assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
        return
    stats = run()
    assert stats.get("kind", "layers") == kind
    engine = Engine(large=str(tmp_path / "large"), small=str(tmp_path / "out"), dtype=torch.float32,
                    max_model_len=64, block_size=4)
    assert all((w.q_norm is not None) == (family != "granite") for w in engine.runners["small"].executor.layers)
    prompts, params = [[5, 17, 3], [44, 2, 90, 61]], SamplingParams(max_tokens=8)
    want = [o.token_ids for o in engine.generate(prompts, params, policy=LargeOnly())]
    assert [o.token_ids for o in engine.generate(prompts, params, policy=Greedy(max_draft_len=3))] == want


def test_distill_refuses_an_image_text_teacher_by_name(tmp_path):
    from .test_model_families import tiny_gemma3_image_text
    tiny_gemma3_image_text().save_pretrained(tmp_path / "mm")
    _tokenizer().save_pretrained(tmp_path / "mm")
    with pytest.raises(ValueError, match=r"is an image-text model \(gemma3\); bild distill trains drafts for text "
                                         r"models"):
        distill(large=tmp_path / "mm", out=tmp_path / "out", prompts=4, max_new_tokens=4, minutes=0.003,
                work_dir=tmp_path / "work", **QUIET)
    assert not (tmp_path / "out").exists()


def test_a_feature_draft_refuses_a_teacher_whose_last_layer_it_cannot_copy():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bild_kernels.distill.feature_model import check_feature_teacher
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, mlp_bias=True))
    with pytest.raises(ValueError, match=r"kind='feature' copies the large model's last layer, whose weights "
                                         r"mlp.down_proj.bias, mlp.gate_proj.bias, mlp.up_proj.bias a feature draft's "
                                         r"layer does not have: distill a layers draft \(kind='layers'\)"):
        check_feature_teacher(teacher)


def test_targets_are_top_k_and_training_updates_only_the_layers():
    teacher = _teacher()
    corpus = [[int(x) for x in torch.randint(0, 97, (12,))] for _ in range(6)]
    targets = teacher_targets(teacher, corpus, k=8, log=lambda s: None)
    for seq, (ids, probs) in zip(corpus, targets):
        assert ids.shape == (len(seq), 8) and probs.shape == (len(seq), 8)
        assert bool((probs.float().sum(-1) <= 1.001).all())
    vocab = frequent_tokens(corpus, 40, always=[0])
    assert 0 in vocab.tolist() and len(vocab) <= 41
    draft = build_draft(teacher, [0])
    embed = draft.model.embed_tokens.weight.clone()
    layer = draft.model.layers[0].mlp.up_proj.weight.clone()
    train(draft, corpus, targets, minutes=0.02, batch_size=4, vocab=vocab, log=lambda s: None)
    assert torch.equal(draft.model.embed_tokens.weight, embed)  # shared with the large model: frozen
    assert not torch.equal(draft.model.layers[0].mlp.up_proj.weight, layer)


def test_held_out_prompts_share_no_template_or_topic_with_training():
    from bild_kernels.distill import prompts as P
    train, held = P.train_prompts(), P.held_out_prompts()
    assert len(held) >= 50 and not set(train) & set(held)
    train_topics = set(P.TRAIN_TOPICS) | set(P.MORE_TRAIN_TOPICS)
    assert not train_topics & set(P.EVAL_TOPICS)
    templates = set(P.TRAIN_TEMPLATES) | set(P.MORE_TRAIN_TEMPLATES)
    assert not templates & set(P.EVAL_TEMPLATES)
    for prompt in train:  # no training prompt is an evaluation template filled with any topic
        assert not any(prompt == t.format(t=topic) for t in P.EVAL_TEMPLATES for topic in train_topics)


def test_extra_training_prompts_are_new_and_share_nothing_with_the_held_out_set():
    from bild_kernels.distill import prompts as P
    extra, train, held = P.extra_train_prompts(), P.train_prompts(), P.held_out_prompts()
    assert len(extra) > 4 * len(train) and len(set(extra)) == len(extra)
    assert not set(extra) & set(train) and not set(extra) & set(held)
    assert not set(P.EXTRA_TRAIN_TOPICS) & set(P.EVAL_TOPICS)
    assert not set(P.EXTRA_TRAIN_TEMPLATES) & set(P.EVAL_TEMPLATES)
    assert not set(P.EXTRA_SENTENCES) & set(P.EVAL_SENTENCES) and not set(P.EXTRA_PARAGRAPHS) & set(P.EVAL_PARAGRAPHS)
    topics = P.TRAIN_TOPICS + P.MORE_TRAIN_TOPICS + P.EXTRA_TRAIN_TOPICS
    evals = {t.format(t=topic) for t in P.EVAL_TEMPLATES for topic in topics}
    assert not evals & set(extra)
    assert P.extra_train_prompts() == extra  # fixed order: chunk files index into it


HELD_OUT_WORDS = ("octopus", "lighthouse", "violin", "fiddle", "glacier", "balloon", "bee", "comet", "cheese",
                  "submarine", "kite", "coral", "reef", "periodic table", "windmill", "owl", "marathon", "great wall")


def _names_held_out_topic(text: str) -> bool:
    words = re.findall(r"[a-z]+", text.lower())
    for held in HELD_OUT_WORDS:
        h = held.split()
        forms = {tuple(h), tuple(h[:-1] + [h[-1] + "s"]), tuple(h[:-1] + [h[-1] + "es"])}
        if any(tuple(words[i:i + len(h)]) in forms for i in range(len(words) - len(h) + 1)):
            return True
    return False


def test_wordnet_topics_are_many_distinct_and_none_is_held_out():
    from bild_kernels.distill import prompts as P
    topics = P.wordnet_topics()
    assert len(topics) >= 5000 and len({t.lower() for t in topics}) == len(topics)
    assert not [t for t in topics if _names_held_out_topic(t)]
    assert _names_held_out_topic("the coral reefs") and not _names_held_out_topic("beef")  # the check itself
    assert {"photosynthesis", "computers", "the Pacific Ocean"} <= set(topics)  # plurals, bare nouns, names


def test_topic_prompts_are_new_seeded_and_share_nothing_with_the_held_out_set():
    from bild_kernels.distill import prompts as P
    topics = P.wordnet_topics()
    n = len(topics) + 50
    got = P.topic_prompts(n, seed=3)
    assert len(got) == n == len(set(got)) and got == P.topic_prompts(n, seed=3) != P.topic_prompts(n, seed=4)
    assert not set(got) & set(P.all_train_prompts()) and not set(got) & set(P.held_out_prompts())
    assert not [p for p in got if _names_held_out_topic(p)]
    templates = P.TRAIN_TEMPLATES + P.MORE_TRAIN_TEMPLATES + P.EXTRA_TRAIN_TEMPLATES
    # every topic once before any twice, but for the few the templated prompts already have under every template
    taken = set(P.all_train_prompts()) | set(P.held_out_prompts())
    full = {topic for topic in topics if all(t.format(t=topic) in taken for t in templates)}
    assert len(full) < 0.05 * len(topics)  # the ~400 templated topics, where WordNet has them too
    named = {t.format(t=topic): topic for topic in topics for t in templates}
    first = [named[p] for p in got[:len(topics) - len(full)]]
    assert len(set(first)) == len(first) and set(first) == set(topics) - full
    assert P.topic_prompts(0) == []
    # another set on other topics: what a draft trained on the first is scored on (python/tools/draft_gap.py)
    used = P.topic_prompt_topics(500, seed=3)
    assert len(used) == 500 and used <= set(topics)
    other = P.topic_prompts(500, seed=5, skip_topics=used)
    assert not {named[p] for p in other} & used and len(set(other)) == 500
    for bad in (-1, True, 2.0, len(topics) * len(templates)):
        with pytest.raises(ValueError, match="topic_prompts must be an int in"):
            P.topic_prompts(bad)


def test_tune_prompts_are_disjoint_from_held_out_and_training_and_distillation_skips_their_topics():
    from bild_kernels.distill import prompts as P
    tune = P.tune_prompts()
    assert len(tune) == 59 == len(set(tune)) and tune == P.tune_prompts()
    assert not set(tune) & set(P.held_out_prompts()) and not set(tune) & set(P.all_train_prompts())
    topics = P.tune_topics()
    assert len(topics) == 59 and all(any(t in p for t in topics) for p in tune)
    # what `bild distill --topic-prompts N` draws (pipeline.distill): never a tuning topic
    drawn = P.topic_prompt_topics(len(P.wordnet_topics()), seed=4, skip_topics=topics)
    assert not drawn & topics and len(drawn) > 0.9 * len(P.wordnet_topics())
    assert not set(P.topic_prompts(2000, seed=4, skip_topics=topics)) & set(tune)


def test_bf16_training_updates_float32_weights_and_lowers_the_loss():
    from bild_kernels.distill.train import fast_bf16
    teacher = _teacher()
    corpus = [[int(x) for x in torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(i))]
              for i in range(4)]
    targets = teacher_targets(teacher, corpus, k=8, log=lambda s: None)
    draft = build_draft(teacher, [0])
    logs = []
    train(draft, corpus, targets, minutes=0.05, batch_size=4, lr=3e-3, log=logs.append, bf16=True)
    assert all(p.dtype == torch.float32 for p in draft.parameters())  # autocast: the weights stay float32
    losses = [float(s.split()[3]) for s in logs if s.startswith("step")]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert fast_bf16("cuda") is True


# ---------------------------------------------------------------------------------------------------
# distill(): devices, more samples per prompt, a corpus time budget, warm starts; parts of files
# ---------------------------------------------------------------------------------------------------
QUIET = dict(log=lambda s: None)


def _tokenizer():
    """Whole words: the 96 most frequent of the held-out and the first training prompts, the rest <unk>.
    (With fewer known words every prompt is a run of <unk> and the held-out references all look alike.)"""
    words = Counter(w for p in held_out_prompts() + all_train_prompts(64) for w in re.findall(r"\w+|[^\w\s]", p))
    return word_tokenizer([w for w, _ in words.most_common(96)])


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory):
    """The tiny teacher on disk with a tokenizer, and its held-out references (made once: every
    distill() run of this module starts from a work dir holding them)."""
    root = tmp_path_factory.mktemp("large")
    _teacher().save_pretrained(root / "large")
    _tokenizer().save_pretrained(root / "large")
    held = generate_corpus(hf_model(root / "large"), _tokenizer(), held_out_prompts(), max_new_tokens=8,
                           temperature=0.0, **QUIET)
    torch.save(held, root / "corpus_eval.pt")
    return root / "large"


def _work(large_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(large_dir.parent / "corpus_eval.pt", work / "corpus_eval.pt")
    return work


def _held_pairs(work):
    held = torch.load(work / "corpus_eval.pt")
    return [(ids, len(chat_ids(_tokenizer(), p))) for p, ids in zip(held_out_prompts(), held)]


def _init_draft(large_dir, path, layers=(0, 2)):
    """A draft directory saved in float32 (so that a warm start sees exactly its weights) whose layers
    differ from the teacher's, with a head vocabulary and a policy of its own."""
    from bild_kernels.models import load_model
    from bild_kernels.models.draft import save_draft
    teacher = hf_model(large_dir)
    draft = build_draft(teacher, list(layers))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.model.layers.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    vocab = torch.tensor(sorted({0, 96} | set(torch.randperm(97, generator=g)[:40].tolist())))
    policy = {"fallback_threshold": 0.1, "rollback_threshold": 3.0, "max_draft_len": 3}
    save_draft(path, draft.state_dict(), base=load_model(teacher, dtype=torch.float32)[0], init_layers=list(layers),
               draft_vocab=vocab, base_name="tiny", dtype=torch.float32, policy=policy)
    return draft, vocab, policy


def test_warm_start_keeps_the_init_drafts_weights_vocabulary_and_agreement(large_dir, tmp_path):
    from safetensors.torch import load_file
    init, vocab, policy = _init_draft(large_dir, tmp_path / "init")
    work, out = _work(large_dir, tmp_path), tmp_path / "out"
    stats = distill(large=large_dir, out=out, prompts=3, max_new_tokens=4, minutes=0.003, work_dir=work, bf16=False,
                    init_draft=tmp_path / "init", samples_per_prompt=2, **QUIET)
    pairs = _held_pairs(work)
    assert stats["agreement_before"] == round(agreement(init, pairs, vocab), 4)  # the init draft, unchanged
    teacher = hf_model(large_dir)
    assert stats["agreement_before"] != round(agreement(build_draft(teacher, [0, 2]), pairs, vocab), 4)
    assert stats["init_draft"] == str(tmp_path / "init") and stats["init_layers"] == [0, 2]
    assert stats["lr"] == 2e-4 and stats["draft_vocab"] == len(vocab)
    assert torch.equal(load_file(str(out / "model.safetensors"))["draft_vocab"], vocab)  # not recomputed
    manifest = json.loads((out / "bild_draft.json").read_text())
    assert manifest["init_layers"] == [0, 2] and manifest["policy"] == policy
    card = (out / "README.md").read_text()
    assert "**Warm start**" in card and "`init`" in card and "2 per prompt" in card
    # samples_per_prompt: every prompt answered twice, cached under a name that says so
    assert stats["corpus_sequences"] == 6 == stats["corpus_planned"] and (work / "corpus_train_3_4_x2.pt").is_file()
    corpus = torch.load(work / "corpus_train_3_4_x2.pt")
    prompt_ids = [chat_ids(_tokenizer(), p) for p in all_train_prompts(3)]
    assert [c[:len(p)] for c, p in zip(corpus, prompt_ids * 2)] == prompt_ids * 2


@pytest.mark.parametrize("kw, match", [
    (dict(init_layers=[0, 1]), "init_layers \\[0, 1\\] conflicts"),
    (dict(draft_vocab=10), "draft_vocab 10 conflicts"),
    (dict(kind="feature"), "is a layers draft; a feature draft warm-starts from a feature draft"),
])
def test_warm_start_refuses_what_contradicts_the_init_draft(large_dir, tmp_path, kw, match):
    _init_draft(large_dir, tmp_path / "init")
    with pytest.raises(ValueError, match=match):
        distill(large="/no/such/model", out=tmp_path / "out", init_draft=tmp_path / "init", **kw, **QUIET)
    with pytest.raises(FileNotFoundError, match="no draft directory"):
        distill(large="/no/such/model", out=tmp_path / "out", init_draft=tmp_path / "none", **QUIET)


def test_a_feature_draft_warm_starts_from_a_feature_draft(large_dir, tmp_path):
    from safetensors.torch import load_file

    from bild_kernels.distill.feature_draft import FeatureDraft, feature_agreement
    work, init_dir = _work(large_dir, tmp_path), tmp_path / "init"
    distill(large=large_dir, out=init_dir, prompts=4, max_new_tokens=4, minutes=0.003, bf16=False, work_dir=work,
            draft_vocab=30, kind="feature", **QUIET)
    policy = {"fallback_threshold": 0.0, "rollback_threshold": 2.2, "max_draft_len": 3}
    manifest = json.loads((init_dir / "bild_draft.json").read_text())
    (init_dir / "bild_draft.json").write_text(json.dumps(dict(manifest, policy=policy)))
    init = FeatureDraft.from_dir(init_dir, hf_model(large_dir))  # exactly the saved weights, in float32
    saved = load_file(str(init_dir / "model.safetensors"))
    assert torch.equal(init.fc.weight, saved["fc.weight"].float()) and torch.equal(init.vocab, saved["draft_vocab"].long())
    assert torch.equal(init.layers[0].mlp.down_proj.weight, saved["model.layers.0.mlp.down_proj.weight"].float())
    before = feature_agreement(init, torch.load(work / "features_eval.pt"), _held_pairs(work), depth=2, max_k=2)["d1"]
    out = tmp_path / "out"
    stats = distill(large=large_dir, out=out, prompts=4, max_new_tokens=4, minutes=0.003, bf16=False, work_dir=work,
                    kind="feature", init_draft=init_dir, corpus_seed=1, **QUIET)
    # fresh answers to the same prompts, cached under their own name
    fresh, first = torch.load(work / "corpus_train_4_4_seed1.pt"), torch.load(work / "corpus_train_4_4.pt")
    assert len(fresh) == len(first) == 4 and fresh != first and stats["corpus_seed"] == 1
    assert stats["agreement_before"] == round(before, 4) and stats["lr"] == 1e-3  # the init draft, unchanged
    assert stats["init_draft"] == str(init_dir) and stats["draft_vocab"] == init.vocab.numel()
    assert torch.equal(load_file(str(out / "model.safetensors"))["draft_vocab"], saved["draft_vocab"])
    written = json.loads((out / "bild_draft.json").read_text())
    assert written["kind"] == "feature" and written["policy"] == policy
    assert "**Warm start**" in (out / "README.md").read_text() and "sampling seed 1" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="is a feature draft; a layers draft warm-starts from a layers draft"):
        distill(large="/no/such/model", out=tmp_path / "x", init_draft=init_dir, **QUIET)
    with pytest.raises(ValueError, match="not a feature draft"):
        _init_draft(large_dir, tmp_path / "layers")
        FeatureDraft.from_dir(tmp_path / "layers", hf_model(large_dir))


def test_a_warm_start_grows_its_head_vocabulary_by_the_corpus_tokens_it_lacks(large_dir, tmp_path):
    """draft_vocab larger than the init draft's (or 0): its head ids stay, the corpus's most frequent tokens it lacks
    join them (the head's rows are the large model's: nothing new to train), both agreements are reported, the card
    says so and the engine runs the result losslessly; a smaller size is refused."""
    from collections import Counter

    from safetensors.torch import load_file

    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
    from bild_kernels.distill.feature_draft import FeatureDraft, feature_agreement
    work, init_dir = _work(large_dir, tmp_path), tmp_path / "init"
    distill(large=large_dir, out=init_dir, prompts=4, max_new_tokens=4, minutes=0.003, bf16=False, work_dir=work,
            draft_vocab=30, kind="feature", **QUIET)
    init = FeatureDraft.from_dir(init_dir, hf_model(large_dir))
    before = feature_agreement(init, torch.load(work / "features_eval.pt"), _held_pairs(work), depth=2, max_k=2)["d1"]
    out = tmp_path / "out"
    stats = distill(large=large_dir, out=out, prompts=4, max_new_tokens=4, minutes=0.003, bf16=False, work_dir=work,
                    kind="feature", init_draft=init_dir, corpus_seed=1, draft_vocab=36, **QUIET)
    grown = load_file(str(out / "model.safetensors"))["draft_vocab"].long()
    old = set(init.vocab.tolist())
    corpus = torch.load(work / "corpus_train_4_4_seed1.pt")
    lacked = Counter(t for seq in corpus for t in seq if t not in old)
    assert set(grown.tolist()) == old | {t for t, _ in lacked.most_common(6)}
    assert len(grown) == min(36, 30 + len(lacked))
    assert stats["draft_vocab"] == len(grown) and stats["draft_vocab_before"] == 30
    assert stats["agreement_before_vocab"] == round(before, 4)
    card = (out / "README.md").read_text()
    assert (f"the 30 token ids of `init` (its `draft_vocab`) and the {len(grown) - 30} most frequent corpus tokens"
            in card)
    assert f"{before:.3f} agreement before this run with its own head vocabulary" in card
    eng = Engine(large=str(large_dir), small=str(out), max_batch_size=2, max_model_len=64)
    prompts, params = [[1, 2, 3], [5, 6, 7, 8, 9]], SamplingParams(max_tokens=8)
    assert [o.token_ids for o in eng.generate(prompts, params, policy=Greedy())] == [
        o.token_ids for o in eng.generate(prompts, params, policy=LargeOnly())]
    whole = distill(large=large_dir, out=tmp_path / "whole", prompts=4, max_new_tokens=4, minutes=0.003, bf16=False,
                    work_dir=work, kind="feature", init_draft=init_dir, draft_vocab=0, **QUIET)
    assert whole["draft_vocab"] is None
    assert "draft_vocab" not in load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert "and every other token" in (tmp_path / "whole" / "README.md").read_text()
    with pytest.raises(ValueError, match="draft_vocab 20 conflicts .* can only add to them"):
        distill(large=large_dir, out=tmp_path / "o2", kind="feature", init_draft=init_dir, draft_vocab=20, **QUIET)
    # a layers draft grows its head the same way
    _, vocab, _ = _init_draft(large_dir, tmp_path / "init_layers")
    stats = distill(large=large_dir, out=tmp_path / "layers", prompts=3, max_new_tokens=4, minutes=0.003, bf16=False,
                    work_dir=work, init_draft=tmp_path / "init_layers", draft_vocab=len(vocab) + 5, **QUIET)
    grown = load_file(str(tmp_path / "layers" / "model.safetensors"))["draft_vocab"]
    assert set(vocab.tolist()) < set(grown.tolist()) and stats["draft_vocab_before"] == len(vocab)


def test_warm_start_refuses_a_draft_of_another_large_model(large_dir, tmp_path):
    other = tmp_path / "other"
    tiny_llama(6, layers=3, dtype=torch.float32).save_pretrained(other)
    _tokenizer().save_pretrained(other)
    _init_draft(large_dir, tmp_path / "init")
    with pytest.raises(ValueError, match="init_draft: this draft was made for tiny"):
        distill(large=other, out=tmp_path / "out", init_draft=tmp_path / "init", work_dir=tmp_path / "w", **QUIET)
    assert not (tmp_path / "w").exists()


def test_samples_per_prompt_multiplies_the_corpus_and_a_time_budget_stops_it(large_dir):
    teacher, tok = hf_model(large_dir), _tokenizer()
    prompts = all_train_prompts(5)
    one = generate_corpus(teacher, tok, prompts, max_new_tokens=6, batch_size=2, **QUIET)
    two = generate_corpus(teacher, tok, prompts, max_new_tokens=6, batch_size=2, samples=2, **QUIET)
    assert len(one) == 5 and len(two) == 10
    assert two[:5] == one  # pass 0 is the one-sample corpus
    prompt_ids = [chat_ids(tok, p) for p in prompts]
    assert [a[:len(p)] for a, p in zip(two[5:], prompt_ids)] == prompt_ids and two[5:] != one  # other answers
    logs = []
    cut = generate_corpus(teacher, tok, prompts, max_new_tokens=6, batch_size=2, samples=2, max_seconds=1e-9,
                          log=logs.append)
    assert cut == one[:2]  # the first batch, then the budget is spent
    assert "time budget" in logs[-1] and "2 of 10 answers" in logs[-1]


def test_the_bild_corpus_backend_writes_the_same_greedy_answers_and_its_own_cache(large_dir, tmp_path):
    """backend="bild" (BatchGenerator; the default on CUDA) answers like transformers' generate at temperature 0
    and samples its own answers otherwise; distill() names its corpus after it and says so in the card."""
    teacher, tok = hf_model(large_dir), _tokenizer()
    prompts = all_train_prompts(5)
    kw = dict(max_new_tokens=6, batch_size=2, temperature=0.0, **QUIET)
    assert generate_corpus(teacher, tok, prompts, backend="bild", **kw) == generate_corpus(teacher, tok, prompts,
                                                                                            backend="hf", **kw)
    kw["temperature"] = 0.7
    info = {}
    a = generate_corpus(teacher, tok, prompts, backend="bild", info=info, **kw)
    assert info == {"backend": "bild"}
    assert a == generate_corpus(teacher, tok, prompts, backend="bild", **kw)  # seeded per row
    assert generate_corpus(teacher, tok, prompts, backend="bild", seed=1, **kw) != a
    with pytest.raises(ValueError, match="backend must be 'auto', 'hf' or 'bild'"):
        generate_corpus(teacher, tok, prompts, backend="vllm", **kw)
    work = _work(large_dir, tmp_path)
    stats = distill(large=large_dir, out=tmp_path / "out", prompts=4, max_new_tokens=4, minutes=0.003, bf16=False,
                    work_dir=work, draft_vocab=30, corpus_backend="bild", **QUIET)
    assert stats["corpus_backend"] == "bild" and (work / "corpus_train_4_4_bild.pt").is_file()
    assert "Written by bild's batch decode loop" in (tmp_path / "out" / "README.md").read_text()


def test_corpus_minutes_cuts_the_corpus_and_the_card_says_so(large_dir, tmp_path):
    work = _work(large_dir, tmp_path)
    stats = distill(large=large_dir, out=tmp_path / "out", prompts=4, max_new_tokens=4, minutes=0.003, bf16=False,
                    work_dir=work, draft_vocab=30, samples_per_prompt=2, corpus_minutes=1e-7, corpus_batch_size=2,
                    train_batch_size=2, **QUIET)
    assert stats["corpus_sequences"] == 2 and stats["corpus_planned"] == 8 and stats["batch_size"] == 2
    assert (work / "corpus_train_4_4_x2_1e-07min.pt").is_file()  # a cut corpus is never taken for a whole one
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2 of 8 answers" in card and "batch 2" in card and "CPU thread" in card


def test_a_feature_draft_card_says_its_batch_device_and_corpus_budget(large_dir, tmp_path):
    work = _work(large_dir, tmp_path)
    stats = distill(large=large_dir, out=tmp_path / "out", prompts=4, max_new_tokens=4, minutes=0.003, bf16=False,
                    work_dir=work, draft_vocab=30, corpus_minutes=1e-7, corpus_batch_size=2, train_batch_size=3,
                    kind="feature", **QUIET)
    assert stats["kind"] == "feature" and stats["corpus_planned"] == 4 and stats["batch_size"] == 3
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("# Feature draft") and "2 of 4 answers" in card and "batch 3" in card
    assert "CPU thread" in card and "batch 8" not in card
    # TF32 products are a GPU's: the card says so only for a run that had them
    from bild_kernels.distill.card import draft_card
    assert stats["tf32"] is False and "TF32" not in card
    assert stats["group_by_length"] is True and "batch 3 (answers of similar lengths together), float32," in card
    assert ", float32 (matrix products on TF32 tensor cores)," in draft_card("x.gguf", dict(stats, tf32=True), 2)


def test_a_feature_draft_is_written_at_each_better_evaluation_and_a_cut_run_keeps_its_best(large_dir, tmp_path,
                                                                                          monkeypatch):
    """Each evaluation that beats the ones before it writes the draft at once (swapped in whole), so a run killed
    after its second evaluation leaves that evaluation's weights and a card that says which; without the feature
    cache the features are not written to the work dir."""
    import bild_kernels.distill.feature_draft as fd
    from safetensors.torch import load_file
    work, out = _work(large_dir, tmp_path), tmp_path / "out"

    def staged(scores, cut_after=None):
        def train(draft, *a, eval_fn, on_eval, **k):
            history = []
            for i, d1 in enumerate(scores):
                with torch.no_grad():
                    draft.fc.bias.fill_(float(i + 1))  # which evaluation the written weights come from
                history.append({"minutes": float(i + 1), "step": i, "tokens": 10 * i, "d1": d1})
                on_eval(draft, history)
                if cut_after == i:
                    raise KeyboardInterrupt  # a timeout's SIGTERM, as far as the written draft can tell
            return history
        return train

    monkeypatch.setattr(fd, "train_feature_draft", staged([0.2, 0.5, 0.4]))
    stats = distill(large=large_dir, out=out, prompts=4, max_new_tokens=4, minutes=3, bf16=False, work_dir=work,
                    draft_vocab=30, kind="feature", feature_cache=False, **QUIET)
    assert stats["agreement"] == 0.5 and stats["minutes"] == 2.0 and stats["evaluations"] == 2
    assert torch.all(load_file(str(out / "model.safetensors"))["fc.bias"] == 2.0)
    card = (out / "README.md").read_text()
    assert "**0.500** after" in card and "best of 2 evaluations, at 2\n  of the 3 planned minutes" in card
    assert not list(work.glob("features_*_*.pt")) and not list(tmp_path.glob("out.*"))
    monkeypatch.setattr(fd, "train_feature_draft", staged([0.3, 0.6, 0.7], cut_after=1))
    with pytest.raises(KeyboardInterrupt):
        distill(large=large_dir, out=out, prompts=4, max_new_tokens=4, minutes=3, bf16=False, work_dir=work,
                draft_vocab=30, kind="feature", **QUIET)
    assert torch.all(load_file(str(out / "model.safetensors"))["fc.bias"] == 2.0)
    assert "**0.600** after" in (out / "README.md").read_text() and list(work.glob("features_*_*.pt"))


def test_a_feature_draft_of_two_layers(large_dir, tmp_path):
    """feature_layers=2: a feature draft of the large model's last two layers, its manifest and card say so, it
    runs in the engine losslessly, and it warm-starts only as a two-layer draft."""
    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
    from bild_kernels.distill.feature_draft import FeatureDraft
    work, out = _work(large_dir, tmp_path), tmp_path / "out"
    stats = distill(large=large_dir, out=out, prompts=4, max_new_tokens=4, minutes=0.003, bf16=False, work_dir=work,
                    draft_vocab=30, kind="feature", feature_layers=2, **QUIET)
    L = hf_model(large_dir).config.num_hidden_layers
    manifest = json.loads((out / "bild_draft.json").read_text())
    assert stats["init_layers"] == manifest["init_layers"] == [L - 2, L - 1] and manifest["num_layers"] == 2
    assert f"2 decoder layers initialised from the large model's layers [{L - 2}, {L - 1}]" in (
        out / "README.md").read_text()
    assert len(FeatureDraft.from_dir(out, hf_model(large_dir)).layers) == 2
    eng = Engine(large=str(large_dir), small=str(out), max_batch_size=2, max_model_len=64)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9]]
    params = SamplingParams(max_tokens=8)
    assert [o.token_ids for o in eng.generate(prompts, params, policy=Greedy())] == [
        o.token_ids for o in eng.generate(prompts, params, policy=LargeOnly())]
    with pytest.raises(ValueError, match="feature_layers 1 conflicts with init_draft"):
        distill(large=large_dir, out=tmp_path / "o2", kind="feature", init_draft=out, feature_layers=1, **QUIET)


@pytest.mark.parametrize("kw, match", [
    (dict(device="tpu"), "device must be 'cpu' or 'cuda'"),
    (dict(device="cuda:x"), "device must be 'cpu' or 'cuda'"),
    pytest.param(dict(device="cuda"), "no CUDA GPU is usable here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (dict(samples_per_prompt=0), "samples_per_prompt must be a positive int"),
    (dict(corpus_batch_size=0), "corpus_batch_size must be a positive int"),
    (dict(train_batch_size=2.5), "train_batch_size must be a positive int"),
    (dict(corpus_minutes=0), "corpus_minutes must be > 0 or None"),
    (dict(lr=-1.0), "lr must be > 0 or None"),
    (dict(corpus_seed=-1), "corpus_seed must be an int >= 0"),
    (dict(kind="feature", feature_layers=0), "feature_layers must be a positive int"),
    (dict(kind="feature", feature_layers=True), "feature_layers must be a positive int"),
    (dict(feature_layers=2), "feature_layers applies to kind='feature' only"),
    (dict(feature_cache=False), "feature_cache=False applies to kind='feature' only"),
])
def test_bad_arguments_are_refused_before_anything_is_loaded(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):  # a missing large model would be the next error
        distill(large="/no/such/model", out=tmp_path / "out", work_dir=tmp_path / "w", **kw, **QUIET)
    assert not (tmp_path / "w").exists()


def test_split_and_join_are_byte_identical(tmp_path):
    data = bytes(torch.randint(0, 256, (2500,), generator=torch.Generator().manual_seed(0)).tolist())
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    pieces = parts.split_file(f, 1000, remove=True)
    assert [p.name for p in pieces] == [f"model.safetensors.part00{i}" for i in range(3)] and not f.exists()
    assert [p.stat().st_size for p in pieces] == [1000, 1000, 500]
    parts.join_parts(f)
    assert f.read_bytes() == data and all(p.exists() for p in pieces)  # parts kept unless remove=True
    pieces[1].write_bytes(b"x" * 1000)
    f.unlink()
    with pytest.raises(ValueError, match="SHA-256"):
        parts.join_parts(f)
    assert not f.exists() and not (tmp_path / "model.safetensors.joining").exists()
    pieces[1].unlink()
    with pytest.raises(FileNotFoundError, match="missing part"):
        parts.join_parts(f)
    # the module's command line, on a directory: only files over the size are split
    d = tmp_path / "draft"
    d.mkdir()
    (d / "model.safetensors").write_bytes(data)
    (d / "bild_draft.json").write_text("{}")
    assert parts.main(["split", str(d), "--mib", str(1000 / parts.MIB), "--remove"]) == 0
    assert sorted(p.name for p in d.iterdir()) == ["bild_draft.json", "model.safetensors.part000",
                                                   "model.safetensors.part001", "model.safetensors.part002",
                                                   "model.safetensors.parts.json"]
    assert parts.main(["join", str(d), "--remove"]) == 0
    assert sorted(p.name for p in d.iterdir()) == ["bild_draft.json", "model.safetensors"]
    assert (d / "model.safetensors").read_bytes() == data
    assert parts.main(["split", str(d), "--mib", "0"]) == 2


def _cli(capsys, *argv):
    code = cli.main(["distill", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    pytest.param(["--device", "cuda"], "no CUDA GPU is usable here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--device", "gpu"], "device must be 'cpu' or 'cuda'"),
    (["--samples-per-prompt", "0"], "samples_per_prompt must be a positive int"),
    (["--corpus-minutes", "-1"], "corpus_minutes must be > 0"),
    (["--corpus-batch-size", "0"], "corpus_batch_size must be a positive int"),
    (["--train-batch-size", "0"], "train_batch_size must be a positive int"),
    (["--corpus-seed", "-2"], "corpus_seed must be an int >= 0"),
    (["--split-mib", "0"], "--split-mib must be > 0"),
    (["--layers", "0,x"], "--layers must be comma-separated"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--init-draft", "{tmp}/none"], "init_draft: no draft directory"),
    (["--kind", "feature", "--feature-layers", "0"], "feature_layers must be a positive int"),
    (["--feature-layers", "2"], "feature_layers applies to kind='feature' only"),
    (["--no-feature-cache"], "feature_cache=False applies to kind='feature' only"),
])
def test_cli_refuses_bad_values_in_one_line(capsys, large_dir, tmp_path, argv, match):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, err = _cli(capsys, "--large", large_dir, "--out", tmp_path / "d", "--work-dir", tmp_path / "w", *argv)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("bild: error:") and match in err.strip().splitlines()[-1], err
    assert not (tmp_path / "w").exists() and not (tmp_path / "d").exists()


def test_cli_feature_draft_without_the_feature_cache(capsys, large_dir, tmp_path):
    """`--kind feature --no-feature-cache` (what gpu_distill.sh passes): the draft is written, the teacher's targets
    (from the features' pass) are cached, its features are not."""
    work = _work(large_dir, tmp_path)
    code, err = _cli(capsys, "--large", large_dir, "--out", tmp_path / "d", "--work-dir", work, "--kind", "feature",
                     "--prompts", 4, "--max-new-tokens", 4, "--minutes", 0.003, "--draft-vocab", 30,
                     "--no-feature-cache")
    assert code == 0, err
    assert (tmp_path / "d" / "bild_draft.json").is_file() and "draft written to" in err
    assert list(work.glob("targets_*.pt")) and not list(work.glob("features_*_*.pt"))


def test_cli_warm_start_with_a_budget_writes_parts_that_join_into_a_loadable_draft(capsys, large_dir, tmp_path):
    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
    _init_draft(large_dir, tmp_path / "init")
    work, out = _work(large_dir, tmp_path), tmp_path / "out"
    code, err = _cli(capsys, "--large", large_dir, "--out", out, "--work-dir", work, "--prompts", 4,
                     "--max-new-tokens", 4, "--minutes", 0.003, "--no-bf16", "--init-draft", tmp_path / "init",
                     "--samples-per-prompt", 2, "--corpus-minutes", 1e-7, "--corpus-batch-size", 2,
                     "--train-batch-size", 2, "--split-mib", 0.05)
    assert code == 0, err
    assert "time budget" in err and "split into parts of at most 0.05 MiB" in err
    assert not (out / "model.safetensors").exists()
    assert all(p.stat().st_size <= 0.05 * parts.MIB for p in out.glob("model.safetensors.part*"))
    assert parts.main(["join", str(out)]) == 0
    eng = Engine(large=str(large_dir), small=str(out), max_batch_size=1, max_model_len=64)
    o = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=Greedy())[0]
    assert o.token_ids == eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=LargeOnly())[0].token_ids


@requires_gpu
def test_distill_on_gpu_end_to_end(large_dir, tmp_path):
    """The whole pipeline on the GPU: corpus, targets, warm start, training; the draft loads on the CPU."""
    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
    init, vocab, _ = _init_draft(large_dir, tmp_path / "init")
    teacher = hf_model(large_dir)
    corpus = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 12, 9)]
    cpu_t = teacher_targets(teacher, corpus, k=8, **QUIET)
    gpu_t = teacher_targets(teacher, corpus, k=8, device="cuda", **QUIET)
    for (ci, cp), (gi, gp) in zip(cpu_t, gpu_t):
        assert gi.device.type == "cpu" and gp.device.type == "cpu"  # stored targets stay on the CPU
        torch.testing.assert_close(gp.float(), cp.float(), atol=2e-3, rtol=0)
        assert (gi == ci).float().mean() > 0.9
    work, out = _work(large_dir, tmp_path), tmp_path / "out"
    stats = distill(large=large_dir, out=out, prompts=6, max_new_tokens=6, minutes=0.02, work_dir=work, device="cuda",
                    init_draft=tmp_path / "init", samples_per_prompt=2, corpus_minutes=5.0, **QUIET)
    assert stats["device"] != "cpu" and stats["bf16"] is True and stats["batch_size"] == 64
    assert stats["corpus_sequences"] == 12
    pairs = _held_pairs(work)
    assert abs(stats["agreement_before"] - agreement(init, pairs, vocab)) < 0.02
    targets = torch.load(next(work.glob("targets_*_x2_*.pt")))
    assert all(t.device.type == "cpu" for pair in targets for t in pair)
    eng = Engine(large=str(large_dir), small=str(out), device="cpu", max_batch_size=1, max_model_len=64)
    o = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=Greedy())[0]
    assert o.token_ids == eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=LargeOnly())[0].token_ids


@requires_gpu
def test_feature_distill_on_gpu_end_to_end(large_dir, tmp_path):
    """A feature draft on the GPU: features from bild's executor there, training there; the draft it writes
    loads on the CPU and lossless decoding with it equals the large model alone."""
    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
    work, out = _work(large_dir, tmp_path), tmp_path / "out"
    stats = distill(large=large_dir, out=out, prompts=6, max_new_tokens=6, minutes=0.02, work_dir=work, device="cuda",
                    kind="feature", draft_vocab=30, **QUIET)
    assert stats["kind"] == "feature" and stats["device"] != "cpu" and stats["batch_size"] == 64
    assert 0.0 <= stats["agreement"] <= 1.0 and stats["history"]
    eng = Engine(large=str(large_dir), small=str(out), device="cpu", max_batch_size=1, max_model_len=64)
    assert eng.small_kind == "feature"
    o = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=Greedy())[0]
    assert o.token_ids == eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=LargeOnly())[0].token_ids


def _eos_tokenizer():
    tok = _tokenizer()
    tok.eos_token = "."  # one of its words: a text the model ends with "." is a complete prompt
    return tok


def test_self_written_prompts_are_complete_new_and_deterministic(large_dir):
    from bild_kernels.distill.corpus import generate_self_prompts
    teacher, tok = hf_model(large_dir), _eos_tokenizer()
    kw = dict(max_new_tokens=24, batch_size=8, **QUIET)
    logs = []
    first = generate_self_prompts(teacher, tok, 4, seed=3, log=logs.append, **{k: v for k, v in kw.items() if k != "log"})
    assert 1 <= len(first) <= 4 and len(set(first)) == len(first) and all(p and p == p.strip() for p in first)
    assert "kept of" in logs[-1]
    assert generate_self_prompts(teacher, tok, 4, seed=3, **kw) == first  # a seed gives the same prompts
    again = generate_self_prompts(teacher, tok, 4, seed=3, exclude=first, **kw)
    assert not set(again) & set(first)  # excluded texts are never returned
    # The GPU's default writer; a word the tiny model writes more often than "." ends its turns.
    tok3 = _eos_tokenizer()
    tok3.eos_token = tok3.convert_ids_to_tokens([2])[0]
    bild = generate_self_prompts(teacher, tok3, 4, seed=3, backend="bild", **kw)
    assert 1 <= len(bild) <= 4 and len(set(bild)) == len(bild) and all(p and p == p.strip() for p in bild)
    assert generate_self_prompts(teacher, tok3, 4, seed=3, backend="bild", **kw) == bild
    with pytest.raises(ValueError, match="n must be a positive int"):
        generate_self_prompts(teacher, tok, 0, **kw)
    with pytest.raises(ValueError, match="chat template or an EOS token"):
        generate_self_prompts(teacher, _tokenizer(), 2, **kw)


def test_a_chat_templates_user_turn_frames_the_self_written_prompts():
    from bild_kernels.distill.corpus import _user_turn
    tok = _eos_tokenizer()
    open_w, close_w = tok.convert_ids_to_tokens([3, 4])
    tok.chat_template = "{% for m in messages %}" + open_w + " {{ m['content'] }} " + close_w + " {% endfor %}"
    assert _user_turn(tok) == ([3], {4, tok.eos_token_id})
    tok.chat_template = None
    assert _user_turn(tok) == ([tok.eos_token_id], {tok.eos_token_id})  # no BOS: EOS starts a text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
def test_distill_mixes_self_written_prompts_into_the_corpus(large_dir, tmp_path, device):
    """Self-written prompts join the templated ones in the corpus, its cache names and the card; on a GPU this is
    also a run of the device-resident training batches (PackedCorpus)."""
    large = tmp_path / "large"
    shutil.copytree(large_dir, large)
    _eos_tokenizer().save_pretrained(large)
    work = _work(large_dir, tmp_path)
    bf16, bk = ("", "") if device == "cpu" else ("_bf16", "_bild")  # a GPU's corpus comes from BatchGenerator
    stats = distill(large=large, out=tmp_path / "out", prompts=4, max_new_tokens=4, minutes=0.01,
                    bf16=device != "cpu", work_dir=work, draft_vocab=30, self_prompts=3, corpus_batch_size=8,
                    kind="feature", device=device, **QUIET)
    n_self = stats["self_prompts"]
    assert 1 <= n_self <= 3 and stats["prompts"] == 4 and stats["corpus_sequences"] == 4 + n_self
    assert (work / f"self_prompts_3{bf16}{bk}_seed0.pt").is_file()
    assert (work / f"corpus_train_{4 + n_self}_4{bf16}_self{n_self}{bk}.pt").is_file()
    assert stats["corpus_backend"] == ("hf" if device == "cpu" else "bild")
    assert f"and {n_self} prompts it wrote itself" in (tmp_path / "out" / "README.md").read_text()
    assert stats["history"] and 0.0 <= stats["agreement"] <= 1.0
    with pytest.raises(ValueError, match="self_prompts must be an int >= 0"):
        distill(large=large, out=tmp_path / "o2", self_prompts=-1, **QUIET)
    with pytest.raises(ValueError, match="chat template or an EOS token"):  # the original tokenizer has neither
        distill(large=large_dir, out=tmp_path / "o3", work_dir=tmp_path / "w3", self_prompts=2, **QUIET)


def test_distill_mixes_topic_prompts_into_the_corpus(large_dir, tmp_path):
    work = _work(large_dir, tmp_path)
    stats = distill(large=large_dir, out=tmp_path / "out", prompts=3, max_new_tokens=4, minutes=0.003, bf16=False,
                    work_dir=work, topic_prompts=2, corpus_seed=1, **QUIET)
    assert stats["prompts"] == 3 and stats["topic_prompts"] == 2 and stats["corpus_sequences"] == 5
    assert (work / "corpus_train_5_4_topics2_seed1.pt").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2 more under the same templates about everyday topics from WordNet" in card
    assert "3 templated chat" in card and "besides that list of topics" in card
    with pytest.raises(ValueError, match="topic_prompts must be an int in"):
        distill(large=large_dir, out=tmp_path / "o2", topic_prompts=-1, **QUIET)
    assert not (tmp_path / "o2").exists()


def test_distill_mixes_json_prompts_into_the_corpus(large_dir, tmp_path):
    work = _work(large_dir, tmp_path)
    stats = distill(large=large_dir, out=tmp_path / "out", prompts=3, max_new_tokens=4, minutes=0.003, bf16=False,
                    work_dir=work, topic_prompts=1, json_prompts=2, corpus_seed=1, **QUIET)
    assert (stats["prompts"], stats["topic_prompts"], stats["json_prompts"], stats["corpus_sequences"]) == (3, 1, 2, 6)
    assert (work / "corpus_train_6_4_topics1_json2_seed1.pt").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2 asking for JSON about such topics" in card and "3 templated chat" in card
    with pytest.raises(ValueError, match="json_prompts must be an int in"):
        distill(large=large_dir, out=tmp_path / "o2", json_prompts=-1, **QUIET)
    assert not (tmp_path / "o2").exists()


def test_json_prompts_ask_for_json_about_topics_none_of_the_tuning_set():
    from bild_kernels.distill import prompts as P
    got = P.json_prompts(300, seed=2, skip_topics=P.tune_topics())
    assert len(got) == 300 == len(set(got)) and got == P.json_prompts(300, seed=2, skip_topics=P.tune_topics())
    assert all("JSON" in p for p in got) and got != P.json_prompts(300, seed=3)
    assert not set(got) & set(P.held_out_prompts())
    tune = {t for t in P.tune_topics()}
    assert not any(p == t.format(t=topic) for p in got for t in P.JSON_TEMPLATES for topic in tune)
    assert P.json_prompts(0) == []
    many = P.json_prompts(len(P.wordnet_topics()) + 5, seed=1)  # (past one pass: topics again, other templates)
    assert len(many) == len(set(many))


def test_an_auto_corpus_falls_back_to_hf_when_batch_generator_fails(large_dir, monkeypatch):
    """backend="auto" (BatchGenerator on CUDA) must still write a corpus if BatchGenerator cannot: a build or
    first-batch failure is logged and HF generate answers; an explicit backend="bild" raises instead."""
    from bild_kernels.distill import corpus
    from bild_kernels.engine.bulk import BatchGenerator
    teacher, tok = hf_model(large_dir), _tokenizer()
    prompts = all_train_prompts(4)
    kw = dict(max_new_tokens=5, batch_size=2, temperature=0.0)
    want = generate_corpus(teacher, tok, prompts, backend="hf", **kw, **QUIET)
    monkeypatch.setattr(corpus, "_backend", lambda backend, dev: "bild")  # as on CUDA
    for where in ("__init__", "generate"):
        with monkeypatch.context() as m:
            def broken(*a, **k):
                raise RuntimeError("no graph today")
            m.setattr(BatchGenerator, where, broken)
            logs, info = [], {}
            assert generate_corpus(teacher, tok, prompts, backend="auto", log=logs.append, info=info, **kw) == want
            assert any("BatchGenerator failed (RuntimeError: no graph today)" in line for line in logs)
            assert info == {"backend": "hf"}
            with pytest.raises(RuntimeError, match="no graph today"):
                generate_corpus(teacher, tok, prompts, backend="bild", **kw, **QUIET)


def test_the_topic_lists_tool_writes_plurals_and_spots_held_out_phrases():
    """python/tools/wordnet_topics.py's helpers (the tool itself needs WordNet's files, which CI does not have)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "python" / "tools" / "wordnet_topics.py"
    spec = importlib.util.spec_from_file_location("wordnet_topics", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    irregular = {"mouse": "mice"}
    assert [tool.plural(w, irregular) for w in ("lighthouse", "box", "city", "day", "mouse", "computer mouse",
                                                "goggles", "cattle")] == [
        "lighthouses", "boxes", "cities", "days", "mice", "computer mice", "goggles", "cattle"]
    banned = {"coral reef", "owl"}
    assert tool.mentions("Coral Reefs", banned) and tool.mentions("barn owls", banned)
    assert not tool.mentions("owlet", banned) and not tool.mentions("coral", banned)

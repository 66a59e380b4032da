"""The distillation tool's pieces on a tiny teacher: layer copying, targets, agreement, a training step."""
import torch

from bild_kernels.distill.train import agreement, build_draft, frequent_tokens, teacher_targets, train

from .conftest import hf_greedy, tiny_llama


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

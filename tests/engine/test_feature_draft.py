"""The EAGLE-style feature draft on a tiny random teacher: layer maths, chaining, training, agreement."""
import pytest
import torch

from bild_kernels.distill.feature_draft import (FeatureDraft, _batch, feature_agreement, feature_loss,
                                                feature_stats, teacher_features, teacher_self_agreement,
                                                train_feature_draft)

from .conftest import hf_greedy, tiny_llama


def _teacher():
    return tiny_llama(5, layers=3, dtype=torch.float32)


def _setup(vocab=None, n_layers=1):
    teacher = _teacher()
    prompts = [[5, 17, 3], [44, 2, 90, 61], [7, 7, 30]]
    pairs = [(p + hf_greedy(teacher, p, 10), len(p)) for p in prompts]
    feats = teacher_features(teacher, [ids for ids, _ in pairs], log=lambda s: None)
    mean, std = feature_stats(feats)
    draft = FeatureDraft.from_teacher(teacher, n_layers=n_layers, vocab=vocab, feat_mean=mean, feat_std=std)
    return teacher, pairs, feats, draft


def test_features_are_the_pre_norm_last_hidden_state_and_the_layer_maths_matches_the_teacher():
    teacher = _teacher()
    ids = [3, 9, 27, 81, 50, 1, 2]
    (f,) = teacher_features(teacher, [ids], log=lambda s: None)
    assert f.shape == (len(ids), teacher.config.hidden_size) and f.dtype == torch.float16
    with torch.no_grad():
        logits = teacher(torch.tensor([ids])).logits[0]
        assert torch.allclose(teacher.lm_head(teacher.model.norm(f.float())), logits, atol=0.05 * logits.abs().max())
    # a "draft" holding all of the teacher's layers, fed the teacher's embeddings, reproduces its features
    cap = {}
    hook = teacher.model.norm.register_forward_pre_hook(lambda m, a: cap.__setitem__("f", a[0]))
    with torch.no_grad():
        teacher(torch.tensor([ids]))
    hook.remove()
    full = FeatureDraft.from_teacher(teacher, n_layers=3)
    x = full.embed[torch.tensor([ids])]
    with torch.no_grad():
        out, _ = full._forward(x, torch.arange(len(ids)), None, None)
    assert torch.allclose(out[0], cap["f"][0], atol=1e-5, rtol=1e-4)


def test_shapes_and_chained_prediction_equals_incremental_decoding():
    teacher, pairs, feats, draft = _setup(n_layers=2)
    ids, plen = pairs[1]
    f = feats[1].float()
    T, H = f.shape
    with torch.no_grad():
        outs = draft.chains(f[None], torch.tensor([ids]), 3)
    assert len(outs) == 3 and all(o.shape == (1, T, H) for o in outs)
    assert draft.logits(outs[0]).shape == (1, T, teacher.config.vocab_size)
    # incremental: true features up to s, then the draft's own features, must match the batched chains
    for s in [0, 3, T - 4]:
        cache = [None] * 2
        for p in range(s + 1):
            pred, _ = draft.step(f[p], ids[p + 1], p, cache)
        assert torch.allclose(pred, outs[0][0, s], atol=1e-4)
        for j in (2, 3):
            pred, _ = draft.step(pred, ids[s + j], s + j - 1, cache)
            assert torch.allclose(pred, outs[j - 1][0, s], atol=1e-4), (s, j)
    # a different (wrong) context changes the chain: the masking does not let it see the future
    f2 = f.clone()
    f2[T - 1] += 5.0
    with torch.no_grad():
        outs2 = draft.chains(f2[None], torch.tensor([ids]), 3)
    assert torch.allclose(outs2[2][0, : T - 3], outs[2][0, : T - 3])
    assert not torch.allclose(outs2[0][0, T - 1], outs[0][0, T - 1])


@pytest.mark.parametrize("group_by_length", [False, True])
def test_training_lowers_the_loss_and_keeps_the_teacher_parts_frozen(group_by_length):
    teacher, pairs, feats, draft = _setup(vocab=torch.arange(0, 97, 2))
    corpus = [ids for ids, _ in pairs]
    targets = []
    for ids in corpus:
        with torch.no_grad():
            p = torch.softmax(teacher(torch.tensor([ids])).logits[0], -1)
        pv, pi = p.topk(8, -1)
        targets.append((pi.to(torch.int32), pv.to(torch.float16)))
    vmap = torch.full((97,), -1, dtype=torch.long)
    vmap[draft.vocab] = torch.arange(len(draft.vocab))
    batch = _batch(corpus, feats, targets, [0, 1, 2], vmap)

    def loss():
        with torch.no_grad():
            return float(feature_loss(draft, *batch, depth=2, w_ce=0.5)[0])

    before = loss()
    embed = draft.embed.clone()
    lines = []
    hist = train_feature_draft(draft, corpus, feats, targets, minutes=5, max_steps=60, lr=3e-3, batch_size=3,
                               depth=2, noise=0.0, w_ce=0.5, warmup=5, log=lines.append,
                               eval_fn=lambda d: feature_agreement(d, feats, pairs, depth=2, max_k=2),
                               group_by_length=group_by_length)
    after = loss()
    # the logged parts are read as numbers, and the tokens seen grow by at least a batch of the shortest a step
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 3 and all(" reg2 " in line and " ce2 " in line for line in steps)
    seen = [int(line.split(" tokens ")[1].split()[0]) for line in steps]
    assert seen[0] >= 20 * 3 * min(map(len, corpus)) and seen[1] > seen[0] and seen[2] > seen[1]
    assert after < 0.7 * before, (before, after)
    assert torch.equal(draft.embed, embed)
    assert "embed" not in draft.state_dict() and draft.trainable_parameters() > 0
    assert len(hist) == 1 and 0.0 <= hist[0]["d1"] <= 1.0


def test_training_runs_its_products_in_tf32_and_its_evaluations_in_float32(monkeypatch):
    """tf32 turns CUDA's TF32 products on for the training steps only: the held-out evaluations run without, and the
    setting before the call is back after it (also when a step raises)."""
    from bild_kernels.distill import feature_draft as fd
    _, pairs, feats, draft = _setup()
    corpus = [ids for ids, _ in pairs]
    flags, real = [], fd.feature_loss

    def spy(*a, **k):
        flags.append(("train", torch.backends.cuda.matmul.allow_tf32))
        return real(*a, **k)

    def evaluate(d):
        flags.append(("eval", torch.backends.cuda.matmul.allow_tf32))
        return {"d1": 0.5}

    monkeypatch.setattr(fd, "feature_loss", spy)
    before = torch.backends.cuda.matmul.allow_tf32
    for tf32 in (True, False):
        flags.clear()
        fd.train_feature_draft(draft, corpus, feats, None, minutes=5, max_steps=3, batch_size=2, tf32=tf32,
                               eval_fn=evaluate, eval_every_s=0.0, log=lambda s: None)
        assert [k for k, _ in flags].count("train") == 3 and [k for k, _ in flags].count("eval") == 4
        assert {x for k, x in flags if k == "train"} == {tf32} and {x for k, x in flags if k == "eval"} == {False}
        assert torch.backends.cuda.matmul.allow_tf32 == before
    monkeypatch.setattr(fd, "feature_loss", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fd.train_feature_draft(draft, corpus, feats, None, minutes=5, max_steps=3, batch_size=2, log=lambda s: None)
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_length_grouped_batches_cut_sorted_pools_and_cover_every_length():
    from bild_kernels.distill.feature_draft import length_grouped_batches
    lens = [5, 90, 7, 60, 61, 3, 88, 30, 31, 29]
    it = length_grouped_batches(lens, 3, torch.Generator().manual_seed(0), pool=8)  # 3: all ten lengths hold
    pools = [[next(it) for _ in range(3)] for _ in range(50)]
    seen = set()
    for pool in pools:
        assert all(len(b) == 3 and all(0 <= i < len(lens) for i in b) for b in pool)
        # a pool's batches are runs of its indices sorted by length: no two batches' length ranges overlap
        spans = sorted((min(lens[i] for i in b), max(lens[i] for i in b)) for b in pool)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        seen |= {i for b in pool for i in b}
    assert seen == set(range(len(lens)))
    again = length_grouped_batches(lens, 3, torch.Generator().manual_seed(0), pool=3)
    assert [next(again) for _ in range(6)] == [b for pool in pools[:2] for b in pool]
    # the batches' order within a pool is shuffled, not always shortest first
    assert any(min(lens[i] for i in pool[0]) > min(lens[i] for b in pool for i in b) for pool in pools)


def test_agreement_scores_an_oracle_draft_1_and_a_shifted_one_low():
    teacher, pairs, feats, draft = _setup()
    assert teacher_self_agreement(teacher, feats, pairs) == 1.0

    class Oracle(FeatureDraft):
        shift = 0  # added to every depth
        wrong_at = ()  # depths whose prediction is -f (its argmax is the teacher's argmin)

        def chains(self, f, tokens, depth, noise=0.0, detach=False):  # the true f_{s+j} (+ shift)
            T = f.shape[1]
            out = []
            for j in range(1, depth + 1):
                idx = (torch.arange(T) + j + self.shift).clamp(0, T - 1)
                out.append(-f[:, idx] if j in self.wrong_at else f[:, idx])
            return out

    oracle = Oracle.from_teacher(teacher, feat_mean=draft.feat_mean, feat_std=draft.feat_std)
    res = feature_agreement(oracle, feats, pairs, depth=4, max_k=5)
    assert res["d1"] == 1.0 and res["d4"] == 1.0 and res["c3"] == 1.0
    assert abs(res["acc_5"] - 5.0) < 1e-9 and abs(res["acc_2"] - 2.0) < 1e-9
    assert res["n_d1"] == sum(len(ids) - p for ids, p in pairs)
    Oracle.wrong_at = (2,)  # right at depths 1, 3, 4, 5: every chain still accepts exactly one token
    first = feature_agreement(oracle, feats, pairs, depth=4, max_k=5)
    assert first["d1"] == 1.0 and first["d2"] == 0.0 and first["d3"] == 1.0 and first["c2"] == 0.0
    assert abs(first["acc_1"] - 1.0) < 1e-9 and abs(first["acc_5"] - 1.0) < 1e-9
    Oracle.wrong_at = ()
    Oracle.shift = -1  # one position late: predicts x_{s+j} instead of x_{s+j+1}
    late = feature_agreement(oracle, feats, pairs, depth=4, max_k=5)
    assert late["d1"] < 0.5 and late["acc_5"] < 2.5
    # a real, untrained draft is somewhere in between and its chain statistics are consistent
    res = feature_agreement(draft, feats, pairs, depth=4, max_k=5)
    assert 0.0 <= res["d1"] <= 1.0 and res["acc_1"] <= res["acc_2"] <= res["acc_5"] <= 5.0
    assert abs(res["acc_1"] - res["d1_chain"]) < 1e-9


def test_executor_features_equal_the_hf_teacher_features():
    from bild_kernels.distill.feature_draft import executor_features
    from bild_kernels.models import load_model
    teacher = _teacher()
    corpus = [[3, 9, 27, 81, 50, 1, 2], [5], [44, 2, 90, 61] * 9]  # ragged, one longer than a batch's blocks
    want = teacher_features(teacher, corpus, log=lambda s: None)
    ex, _ = load_model(teacher, dtype=torch.float32)
    got = executor_features(ex, corpus, batch_tokens=16, block_size=4, log=lambda s: None)
    assert [g.shape for g in got] == [w.shape for w in want] and got[0].dtype == torch.float16
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-3, atol=2e-3 * float(w.abs().max()))


def test_executor_features_with_targets_equal_the_two_passes_they_replace():
    """targets_k: the large model's top-k next-token distribution from the features' own pass, as teacher_targets
    (the HF teacher's pass) gives it, the features unchanged; the head runs over head_rows rows at a time."""
    from bild_kernels.distill.feature_draft import executor_features
    from bild_kernels.distill.train import teacher_targets
    from bild_kernels.models import load_model
    teacher = _teacher()
    corpus = [[3, 9, 27, 81, 50, 1, 2], [5], [44, 2, 90, 61] * 9]
    ex, _ = load_model(teacher, dtype=torch.float32)
    alone = executor_features(ex, corpus, batch_tokens=16, block_size=4, log=lambda s: None)
    feats, targets = executor_features(ex, corpus, batch_tokens=16, block_size=4, log=lambda s: None, targets_k=6,
                                       head_rows=5)
    want = teacher_targets(teacher, corpus, k=6, log=lambda s: None)
    assert all(torch.equal(a, f) for a, f in zip(alone, feats))
    for (ids, probs), (want_ids, want_probs), seq in zip(targets, want, corpus):
        assert ids.shape == (len(seq), 6) and ids.dtype == torch.int32 and probs.dtype == torch.float16
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(probs.float(), want_probs.float(), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("with_vocab, with_targets", [(True, True), (False, True), (True, False)])
def test_packed_corpus_batches_equal_the_host_batches(with_vocab, with_targets):
    """The device-resident batcher a GPU run uses gives exactly `_batch`'s tensors (dtypes, padding, the head's
    id map and the zeroed mass of tokens outside it), for ragged sequences and repeated indices."""
    from bild_kernels.distill.feature_draft import PackedCorpus, vocab_map
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 40, (30,), generator=g).tolist()
    corpus = [torch.randint(0, 100, (n,), generator=g).tolist() for n in lens]
    feats = [torch.randn(n, 8, generator=g).half() for n in lens]
    targets = [(torch.randint(0, 100, (n, 4), generator=g, dtype=torch.int32), torch.rand(n, 4, generator=g).half())
               for n in lens] if with_targets else None
    vmap = vocab_map(torch.randperm(100, generator=g)[:37], 100) if with_vocab else None
    packed = PackedCorpus(corpus, feats, targets, vmap, "cpu")
    for idxs in ([0], [5, 5, 29], torch.randint(0, 30, (16,), generator=g).tolist()):
        for want, got in zip(_batch(corpus, feats, targets, idxs, vmap), packed.batch(idxs)):
            assert want.dtype == got.dtype and torch.equal(want, got)


def test_the_numerics_tools_tf32_emulation_rounds_every_product_input_and_keeps_float32_sums():
    """python/tools/train_numerics.py's TF32 (the evidence that a GPU may train a feature draft in TF32 rests on it):
    inside it, F.linear and @ multiply inputs rounded to a 10-bit mantissa (ties away), forward and backward, with
    float32 sums; outside it, plain float32 again."""
    import importlib.util
    from pathlib import Path

    import torch.nn.functional as F
    path = Path(__file__).resolve().parents[2] / "python" / "tools" / "train_numerics.py"
    spec = importlib.util.spec_from_file_location("train_numerics", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def tf32(x):  # the rounding written another way: to 11 significant bits, halves away from zero
        m, e = torch.frexp(x.double())
        return torch.ldexp(torch.sign(m) * torch.floor(m.abs() * 2048 + 0.5) / 2048, e).float()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 33, generator=g, requires_grad=True)
    w = torch.randn(12, 33, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g)
    v = torch.randn(7, 33, 4, generator=g, requires_grad=True)
    gy, gz = torch.randn(5, 7, 12, generator=g), torch.randn(5, 7, 7, 4, generator=g)
    with tool._tf32_context():
        y = F.linear(x, w, b)
        z = x[:, None] @ v  # a broadcast product: [5, 1, 7, 33] @ [7, 33, 4]
        (y * gy).sum().backward(retain_graph=True)
        (z * gz).sum().backward()
    xr, wr, vr = tf32(x.detach()), tf32(w.detach()), tf32(v.detach())
    torch.testing.assert_close(y, xr @ wr.t() + b, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(z, xr[:, None] @ vr, rtol=1e-6, atol=1e-5)
    gx = tf32(gy) @ wr + (tf32(gz) @ vr.transpose(-1, -2)).sum(1)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad, tf32(gy).reshape(-1, 12).t() @ xr.reshape(-1, 33), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(v.grad, (xr[:, None].transpose(-1, -2) @ tf32(gz)).sum(0), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(y, x.detach() @ w.detach().t() + b, rtol=1e-7, atol=0)  # it did round
    assert F.linear(x, w).grad_fn.name() != "LinearBackward"  # patched names restored: plain autograd again


def test_extra_layer_inputs_start_as_the_plain_draft_and_then_learn_from_them():
    """python/tools/feature_layers_ab.py: a draft that also reads other layers' hidden states at the verified
    positions (a zero-initialised projection added to its input map) predicts exactly as the plain draft until it
    trains; its loss compares predictions with the last layer's features only (feature_loss's target_feats); and
    training moves the projection, while chain steps (the draft's own features, H wide) never use it."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "python" / "tools" / "feature_layers_ab.py"
    spec = importlib.util.spec_from_file_location("feature_layers_ab", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    teacher, pairs, feats, draft = _setup()
    H = teacher.config.hidden_size
    g = torch.Generator().manual_seed(0)
    wide = [torch.cat([f, (torch.randn(f.shape[0], 2 * H, generator=g) * 3 + 1).half()], -1) for f in feats]
    plain = FeatureDraft.from_teacher(teacher, n_layers=1, feat_mean=draft.feat_mean, feat_std=draft.feat_std)
    plain.load_state_dict(draft.state_dict())
    tool._with_layers(draft, wide, H)
    assert draft.aux.weight.shape == (H, 2 * H) and not draft.aux.weight.any()
    corpus = [ids for ids, _ in pairs]
    batch = _batch(corpus, wide, None, [0, 1, 2], None)
    ids, f, n = batch[0], batch[1], batch[2]
    with torch.no_grad():
        a, b = draft.chains(f, ids, 2), plain.chains(f[..., :H], ids, 2)
        torch.testing.assert_close(a, b)
        la, _ = feature_loss(draft, *batch, depth=2, target_feats=f[..., :H])
        lb, _ = feature_loss(plain, ids, f[..., :H], n, batch[3], batch[4], depth=2)
        torch.testing.assert_close(la, lb)
    with pytest.raises(RuntimeError):  # without target_feats the wide input is no target for an H-wide prediction
        feature_loss(draft, *batch, depth=2)
    opt = torch.optim.SGD([draft.aux.weight], lr=1e-2)
    loss, _ = feature_loss(draft, *batch, depth=2, target_feats=f[..., :H])
    loss.backward()
    opt.step()
    assert draft.aux.weight.any()
    with torch.no_grad():
        moved = draft.chains(f, ids, 2)
        assert not torch.allclose(moved[0], b[0])
        # a chain step reads an H-wide feature: the projection plays no part in it
        x_chain = draft._inp(b[0], ids), plain._inp(b[0], ids)
        torch.testing.assert_close(*x_chain)

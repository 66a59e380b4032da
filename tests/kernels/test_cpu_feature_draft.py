"""cpu_feature_draft_chain (a feature draft's greedy draft runs of a batch of sequences in one call of the CPU
extension) and its pieces cpu_rms_norm and cpu_feature_input against their reference twins: drafted tokens,
confidences, the reason a run stops, the cache writes, with float32, int8 and packed int8 weights, a reduced head;
a batch against its sequences alone; bad input."""
import pytest
import torch

from bild_kernels import reference as R
from bild_kernels._backend import cpu_extension
from bild_kernels.models.llama import Int8Weight, int8_x16
from bild_kernels.ops.cpu_decoder_layer import LayerWeights, layer_args
from bild_kernels.ops.cpu_feature_draft import cpu_feature_draft_chain, cpu_feature_input, cpu_rms_norm

needs_ext = pytest.mark.skipif(cpu_extension() is None,
                               reason="bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")


def _vnni() -> bool:
    return cpu_extension() is not None and torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported()


FORMS = ["float32", "int8", pytest.param("int8x16", marks=pytest.mark.skipif(not _vnni(), reason="no AVX-512 VNNI"))]
# packed weights round the activations to int16 per run of 32: a float32 ulp apart, a value may round the other way
TOL = {"float32": 1e-4, "int8": 1e-4, "int8x16": 2e-3}
H, HQ, HKV, D, INTER, BS, V = 64, 4, 2, 16, 96, 4, 97


def _proj(t, form, bias=None):
    if form == "float32":
        return (t, None, bias)
    w = Int8Weight.of(t)
    return (*int8_x16(w), bias) if form == "int8x16" else (w.q, w.scale.float(), bias)


def _case(form, *, layers=1, vocab=True, seed=0, seqs=1, qk_norm=False):
    g = torch.Generator().manual_seed(seed)

    def w(n, k):
        return torch.randn(n, k, generator=g) * k ** -0.5

    def norms():  # Qwen3's per-head norms, or none
        return (0.5 + torch.rand(D, generator=g), 0.5 + torch.rand(D, generator=g)) if qk_norm else (None, None)
    lw = [LayerWeights(1 + 0.1 * torch.randn(H, generator=g), _proj(w((HQ + 2 * HKV) * D, H), form),
                       _proj(w(H, HQ * D), form), 1 + 0.1 * torch.randn(H, generator=g),
                       _proj(w(2 * INTER, H), form), _proj(w(H, INTER), form), *norms()) for _ in range(layers)]
    head_vocab = torch.randperm(V, generator=g)[:48].sort().values if vocab else None
    n_head = 48 if vocab else 96  # a packed head needs a multiple of 16 rows
    blocks = 12
    angle = torch.arange(64).float()[:, None] * (10000.0 ** (-torch.arange(0, D // 2) / (D // 2)))[None]
    emb = torch.cat((angle, angle), -1)
    return dict(
        shift=0.1 * torch.randn(H, generator=g), inv_std=1 + 0.1 * torch.rand(H, generator=g),
        embed=torch.randn(V, H, generator=g), inv_emb_scale=0.5,
        fc=_proj(w(H, 2 * H), form, 0.1 * torch.randn(H, generator=g)), layers=lw,
        key_caches=[torch.randn(blocks * seqs, BS, HKV, D, generator=g) for _ in range(layers)],
        value_caches=[torch.randn(blocks * seqs, BS, HKV, D, generator=g) for _ in range(layers)],
        norm=1 + 0.1 * torch.randn(H, generator=g), head=_proj(3 * w(n_head, H), form), head_vocab=head_vocab,
        cos=emb.cos(), sin=emb.sin(),
        block_tables=torch.randperm(blocks * seqs, generator=g).view(seqs, blocks).int(),
        num_heads=HQ, num_kv_heads=HKV, scale=D ** -0.5, sliding_windows=[0] * layers, eps=1e-5)


def _inputs(counts, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), H, generator=g), torch.randint(0, V, (sum(counts),), generator=g)


def _slots(table, start, n):
    # position p of a sequence lives at slot table[p // BS] * BS + p % BS
    pos = torch.arange(start, start + n)
    return table.long()[pos // BS] * BS + pos % BS


def _run(case, backend, *, T0=3, start=5, steps=5, threshold=0.0, energy=False, seed=1, penalties=None):
    """One sequence's run: (its DraftChain, the caches after it)."""
    c = {**case, "key_caches": [t.clone() for t in case["key_caches"]],
         "value_caches": [t.clone() for t in case["value_caches"]]}
    f, ids = _inputs([T0], seed)
    (run,) = cpu_feature_draft_chain(f, ids, counts=[T0], starts=[start], caps=[steps],
                                     slot_mapping=_slots(c["block_tables"][0], start, T0 + steps - 1),
                                     fallback_threshold=threshold, energy=energy, backend=backend,
                                     penalties=penalties, **c)
    return run, c["key_caches"], c["value_caches"]


@needs_ext
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layers, vocab", [(1, True), (2, False)])
def test_cpu_feature_draft_chain_matches_reference(form, layers, vocab):
    case = _case(form, layers=layers, vocab=vocab)
    want, want_k, want_v = _run(case, "ref")
    got, got_k, got_v = _run(case, "cpu")
    assert got.stop == want.stop == "max_steps" and got.steps == want.steps == 5
    assert got.tokens == want.tokens
    if vocab:
        assert set(got.tokens) <= set(case["head_vocab"].tolist())
    tol = TOL[form]
    torch.testing.assert_close(torch.tensor(got.max_probs), torch.tensor(want.max_probs), atol=tol / 10, rtol=tol)
    for a, b in zip(got_k + got_v, want_k + want_v):  # every position fed, chained ones too, at its slot
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@needs_ext
@pytest.mark.parametrize("form", ["float32", "int8"])
@pytest.mark.parametrize("vocab", [True, False])
def test_cpu_feature_draft_chain_penalties_match_reference(form, vocab):
    """SamplingParams' logit bias and penalties on every step's head logits (the run's own drafts counting as output,
    banned columns while min_tokens holds them back): the same drafts and confidences as the reference, and other
    drafts than without them."""
    case = _case(form, vocab=vocab)
    plain, _, _ = _run(case, "ref", steps=6)
    cols = (lambda t: int((case["head_vocab"] == t).nonzero()[0, 0])) if vocab else (lambda t: t)  # noqa: E731
    first = cols(plain.tokens[0])
    # history: 5 prompt columns then 4 output ones (one of them an id the head lacks: -1), the first plain draft
    # among them; the output holds 5 tokens, min_tokens 8: banned (the plain run's second draft) for 3 steps
    hist = torch.tensor([[3, 7, first, 11, -1, first, 2, -1, 9, -1, -1]])
    rows = torch.tensor([[5, 8, 5]])
    values = torch.tensor([[1.4, 0.3, 0.6]], dtype=torch.float64)
    banned = torch.tensor([[cols(plain.tokens[1]), -1]])
    # a logit bias: the plain run's fourth draft pushed down, another column (also in the history) up
    bias_ids, bias_values = torch.tensor([[cols(plain.tokens[3]), 11, -1]]), torch.tensor([[-4.0, 0.75, 9.0]],
                                                                                        dtype=torch.float64)
    pen = (hist, rows, values, banned, bias_ids, bias_values)
    want, _, _ = _run(case, "ref", steps=6, penalties=pen)
    got, _, _ = _run(case, "cpu", steps=6, penalties=pen)
    assert got.tokens == want.tokens and got.steps == want.steps and got.stop == want.stop
    torch.testing.assert_close(torch.tensor(got.max_probs), torch.tensor(want.max_probs), atol=TOL[form] / 10,
                               rtol=TOL[form])
    assert want.tokens != plain.tokens and plain.tokens[1] not in want.tokens[:3]
    neutral = (hist, rows * torch.tensor([[1, 0, 1]]), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), banned,
               torch.empty((1, 0), dtype=torch.int64), torch.empty((1, 0), dtype=torch.float64))
    assert _run(case, "cpu", steps=6, penalties=neutral)[0].tokens == plain.tokens


@needs_ext
@pytest.mark.parametrize("form", ["float32", "int8"])
def test_cpu_feature_draft_chain_stops_where_the_reference_does(form):
    case = _case(form)
    free, _, _ = _run(case, "ref", steps=6)
    j = min(range(1, 6), key=lambda i: free.max_probs[i])  # the least confident step past the first
    threshold = free.max_probs[j] + 1e-6
    for backend in ("ref", "cpu"):
        run, _, _ = _run(case, backend, steps=6, threshold=threshold)
        first = next(i for i, p in enumerate(free.max_probs) if p < threshold)
        assert run.stop == "unsure" and run.steps == first + 1 and run.tokens == free.tokens[:first]
        assert run.unsure_token == free.tokens[first] if first < len(free.tokens) else True
        assert run.max_probs[-1] < threshold <= min(run.max_probs[:-1], default=1.0)
    # energy: -logsumexp above the threshold is unsure; every step's energy is above -1e9, none above 1e9
    for backend in ("ref", "cpu"):
        assert _run(case, backend, energy=True, threshold=-1e9)[0][:4] == ([], free.max_probs[:1], 1, "unsure")
        assert _run(case, backend, energy=True, threshold=1e9)[0].tokens == free.tokens[:5]


@needs_ext
def test_cpu_feature_draft_chain_stops_at_logits_that_are_not_finite():
    case = _case("float32")
    head = case["head"][0].clone()
    head[7, 0] = float("nan")
    case["head"] = (head, None, None)
    for backend in ("ref", "cpu"):
        run, _, _ = _run(case, backend)
        assert (run.tokens, run.steps, run.stop) == ([], 0, "not_finite")


@needs_ext
@pytest.mark.parametrize("form", FORMS)
def test_cpu_feature_input_and_rms_norm_match_reference(form):
    case = _case(form)
    g = torch.Generator().manual_seed(3)
    f, ids = torch.randn(5, H, generator=g), torch.randint(0, V, (5,), generator=g)
    kw = {k: case[k] for k in ("shift", "inv_std", "embed", "inv_emb_scale", "fc")}
    torch.testing.assert_close(cpu_feature_input(f, ids, backend="cpu", **kw),
                               cpu_feature_input(f, ids, backend="ref", **kw), atol=TOL[form], rtol=TOL[form])
    x = torch.randn(2, 3, H, generator=g)
    torch.testing.assert_close(cpu_rms_norm(x, case["norm"], 1e-5, backend="cpu"),
                               R.cpu_rms_norm_ref(x, case["norm"], 1e-5), atol=1e-6, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("form", FORMS)
def test_cpu_feature_draft_chain_with_qk_norms_matches_reference(form):
    """A Qwen3 teacher's feature draft: its layers RMS-normalise each query and key head before RoPE."""
    case = _case(form, layers=2, vocab=False, qk_norm=True, seed=2)
    want, want_k, want_v = _run(case, "ref")
    got, got_k, got_v = _run(case, "cpu")
    assert got.tokens == want.tokens and got.steps == want.steps == 5
    tol = TOL[form]
    torch.testing.assert_close(torch.tensor(got.max_probs), torch.tensor(want.max_probs), atol=tol / 10, rtol=tol)
    for a, b in zip(got_k + got_v, want_k + want_v):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    plain = {**case, "layers": [w._replace(q_norm=None, k_norm=None) for w in case["layers"]]}
    _, plain_k, _ = _run(plain, "cpu")
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(plain_k, got_k))  # the norms were applied
    with pytest.raises(RuntimeError, match="layer_norms must be empty or hold 4 a layer"):
        f, ids = _inputs([3])
        c = {k: v for k, v in case.items() if k != "layers"}
        torch.ops.bild_kernels_cpu.cpu_feature_draft_chain(
            f, ids, c["shift"], c["inv_std"], c["embed"], 0.5, *c["fc"],
            [a for w in case["layers"] for a in layer_args(w)], c["key_caches"], c["value_caches"], c["norm"],
            *c["head"], None, c["cos"], c["sin"], _slots(c["block_tables"][0], 5, 7), c["block_tables"],
            torch.tensor([3]), torch.tensor([5]), torch.tensor([5]), HQ, HKV, D ** -0.5, [0, 0], 1e-5, 16, 0.0, False,
            [case["layers"][0].q_norm])


@needs_ext
@pytest.mark.parametrize("change, exc, match", [
    (dict(features=torch.randn(3, H).double()), TypeError, "features"),
    (dict(next_ids=torch.tensor([0, 1, V])), ValueError, "next_ids"),
    (dict(next_ids=torch.tensor([0, 1])), ValueError, "next_ids"),
    (dict(caps=[0]), ValueError, "caps"),
    (dict(counts=[2]), ValueError, "counts sum"),
    (dict(starts=[5, 6]), ValueError, "one entry a sequence"),
    (dict(fallback_threshold=1.5), ValueError, "fallback_threshold"),
    (dict(slot_mapping=torch.arange(3)), ValueError, "slot_mapping"),
    (dict(cos=torch.zeros(6, D)), ValueError, "cos"),
    (dict(block_tables=torch.zeros(2, 12, dtype=torch.int32)), ValueError, "block_tables"),
    (dict(sliding_windows=[0, 0]), ValueError, "sliding_windows"),
    (dict(head=(torch.zeros(48, H),)), TypeError, "head"),
])
def test_cpu_feature_draft_chain_bad_input(change, exc, match):
    case = _case("float32")
    kw = dict(features=torch.randn(3, H), next_ids=torch.tensor([0, 1, 2]), slot_mapping=torch.arange(7),
              counts=[3], starts=[5], caps=[5], fallback_threshold=0.5, **case)
    kw.update(change)
    keys = [t.clone() for t in case["key_caches"]]
    with pytest.raises(exc, match=match):
        cpu_feature_draft_chain(**kw)
    assert all(torch.equal(a, b) for a, b in zip(keys, case["key_caches"]))  # nothing ran


@needs_ext
def test_cpu_feature_draft_chain_fake_impl():
    shapes = [None if a is None else a.shape for w in _case("float32")["layers"] for a in layer_args(w)]
    with torch._subclasses.fake_tensor.FakeTensorMode(shape_env=torch.fx.experimental.symbolic_shapes.ShapeEnv()):
        flat = [None if s is None else torch.empty(s) for s in shapes]
        i64 = dict(dtype=torch.int64)
        out = torch.ops.bild_kernels_cpu.cpu_feature_draft_chain(
            torch.empty(5, H), torch.empty(5, **i64), torch.empty(H), torch.empty(H), torch.empty(V, H), 0.5,
            torch.empty(H, 2 * H), None, None, flat, [torch.empty(24, BS, HKV, D)], [torch.empty(24, BS, HKV, D)],
            torch.empty(H), torch.empty(48, H), None, None, None, torch.empty(64, D), torch.empty(64, D),
            torch.empty(11, **i64), torch.empty(2, 12, dtype=torch.int32), torch.empty(2, **i64),
            torch.empty(2, **i64), torch.empty(2, **i64), HQ, HKV, 0.25, [0], 1e-5, 16, 0.5, False, [])
    assert [t.dim() for t in out] == [2, 2, 2] and [t.shape[0] for t in out] == [2, 2, 2] and out[2].shape[1] == 3
    assert [t.dtype for t in out] == [torch.int64, torch.float32, torch.int64]


@needs_ext
@pytest.mark.parametrize("form", FORMS)
def test_cpu_feature_draft_chain_batch_equals_its_sequences_alone(form):
    """Three sequences (different first steps, starts and caps; one stops unsure early) drafted together: each gets
    the bits it gets alone, and the reference's tokens."""
    case = _case(form, seqs=3)
    counts, starts, caps = [3, 1, 2], [5, 9, 0], [4, 2, 5]
    f, ids = _inputs(counts)
    slots = torch.cat([_slots(case["block_tables"][b], s, n + c - 1)
                       for b, (s, n, c) in enumerate(zip(starts, counts, caps))])

    def run(backend, rows, threshold):
        c = {**case, "key_caches": [t.clone() for t in case["key_caches"]],
             "value_caches": [t.clone() for t in case["value_caches"]], "block_tables": case["block_tables"][rows]}
        offs = [sum(counts[:b]) for b in rows]
        soffs = [sum(n + k - 1 for n, k in zip(counts[:b], caps[:b])) for b in rows]
        sel = torch.cat([torch.arange(o, o + counts[b]) for o, b in zip(offs, rows)])
        ssel = torch.cat([torch.arange(o, o + counts[b] + caps[b] - 1) for o, b in zip(soffs, rows)])
        out = cpu_feature_draft_chain(f[sel], ids[sel], counts=[counts[b] for b in rows], starts=[starts[b] for b in rows],
                                      caps=[caps[b] for b in rows], slot_mapping=slots[ssel], fallback_threshold=threshold,
                                      backend=backend, **c)
        return out, c["key_caches"]
    free, _ = run("cpu", [0, 1, 2], 0.0)
    threshold = min(free[2].max_probs[1:]) + 1e-6  # the third sequence stops unsure past its first step
    together, keys = run("cpu", [0, 1, 2], threshold)
    assert any(r.stop == "unsure" for r in together) and any(r.stop == "max_steps" for r in together)
    for b in range(3):
        (alone,), _ = run("cpu", [b], threshold)
        assert alone == together[b]
    want, want_keys = run("ref", [0, 1, 2], threshold)
    assert [r.tokens for r in together] == [r.tokens for r in want]
    assert [r.stop for r in together] == [r.stop for r in want]
    tol = TOL[form]
    for a, b in zip(keys, want_keys):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)

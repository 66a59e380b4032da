"""A Qwen3 pair through the engine (per-head q/k RMSNorm before RoPE, a head_dim wider than hidden / heads,
sliding-window layers): every lossless policy reproduces Hugging Face's greedy text of the large model, in
float64 on the reference ops and in float32 on the CPU extension's fused layer; loading from a saved directory;
the refusals where a Qwen3 model cannot go yet (a distilled draft)."""
import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, Jacobi, LargeOnly, SamplingParams, ShallowDeep, SmallOnly
from bild_kernels._backend import cpu_extension

from .conftest import assert_all_free, hf_greedy

PROMPTS = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 37, 38]]
N = 12


def tiny_qwen3(seed: int, layers: int, dtype=torch.float64, window: int | None = None):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
                      sliding_window=window, use_sliding_window=window is not None, max_window_layers=1)
    model = Qwen3ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)  # sharp distributions: stable argmaxes, confidences over (0, 1)
        for layer in model.model.layers:  # the per-head norms matter (HF initialises them to ones)
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def qwen3_pair(dtype=torch.float64, window=None):
    """A 3-layer large model with a weak last layer and a noisy copy of its first two as the draft."""
    large = tiny_qwen3(1, 3, dtype, window)
    small = tiny_qwen3(2, 2, dtype, window)
    with torch.no_grad():
        large.model.layers[2].self_attn.o_proj.weight.mul_(0.3)
        large.model.layers[2].mlp.down_proj.weight.mul_(0.3)
        small.load_state_dict(large.state_dict(), strict=False)
        torch.manual_seed(2)
        for p in small.model.layers.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    return large, small


@pytest.fixture(scope="module")
def pair():
    return qwen3_pair(window=8)


@pytest.fixture(scope="module")
def engine(pair):
    return Engine(large=pair[0], small=pair[1], dtype=torch.float64, max_batch_size=3, max_model_len=64, block_size=4)


@pytest.fixture(scope="module")
def oracle(pair):
    return [hf_greedy(pair[0], p, N) for p in PROMPTS]


@pytest.mark.parametrize("policy", [LargeOnly(), Greedy(max_draft_len=4), BiLD(0.5, 1e-9, 3),
                                    BiLD(0.0, 0.0, 5), Jacobi(block_size=4), ShallowDeep(exit_layer=2)],
                         ids=["large-only", "greedy-4", "bild-lossless", "bild-lossless-nofallback", "jacobi",
                              "shallow-deep"])
def test_qwen3_lossless_policies_match_hf_greedy(engine, oracle, policy):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert [o.token_ids for o in outs] == oracle
    assert_all_free(engine)


def test_qwen3_small_only_and_drafting(engine, pair, oracle):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=SmallOnly())
    assert [o.token_ids for o in outs] == [hf_greedy(pair[1], p, N) for p in PROMPTS]
    # the draft really drafts, and disagrees sometimes (so the verification matters)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=4))
    drafted = sum(o.metrics.drafted_tokens for o in outs)
    accepted = sum(o.metrics.accepted_tokens for o in outs)
    assert [o.token_ids for o in outs] == oracle and 0 < accepted < drafted
    assert_all_free(engine)


@pytest.mark.skipif(cpu_extension() is None, reason="bild_kernels._cpu not built, or this CPU lacks AVX2/FMA")
def test_qwen3_float32_on_the_fused_cpu_layer():
    """float32 on a CPU: decode steps and verify passes run csrc/cpu_decoder_layer.cpp with the per-head norms;
    Greedy gives LargeOnly's tokens exactly and LargeOnly follows HF's float32 greedy text."""
    large, small = qwen3_pair(torch.float32)
    engine = Engine(large=large, small=small, dtype=torch.float32, max_batch_size=4, max_model_len=64, block_size=4)
    ex = engine.runners["large"].executor
    assert ex._fused is not None and ex.layers[0].q_norm is not None
    params = SamplingParams(max_tokens=N)
    base = [o.token_ids for o in engine.generate(PROMPTS, params, policy=LargeOnly())]
    assert base == [hf_greedy(large, p, N) for p in PROMPTS]
    for policy in (Greedy(max_draft_len=3), BiLD(0.0, 0.0, 4)):
        assert [o.token_ids for o in engine.generate(PROMPTS, params, policy=policy)] == base
    assert_all_free(engine)


def test_qwen3_loads_from_a_saved_directory(tmp_path, pair, oracle):
    pair[0].save_pretrained(tmp_path / "large")
    engine = Engine(large=str(tmp_path / "large"), dtype=torch.float64, max_model_len=64, block_size=4)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=LargeOnly())
    assert [o.token_ids for o in outs] == oracle


def test_qwen3_checkpoint_without_its_norms_is_refused(tmp_path, pair):
    from safetensors.torch import load_file, save_file
    pair[0].save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    weights = {k: v for k, v in load_file(path).items() if "k_norm" not in k}
    save_file(weights, path)
    with pytest.raises(ValueError, match=r"missing weight 'layers.0.self_attn.k_norm.weight'"):
        Engine(large=str(tmp_path / "m"), dtype=torch.float64, max_model_len=64, block_size=4)

"""Pairs of the other families through the engine: Qwen3 (per-head q/k RMSNorm before RoPE, a head_dim wider than
hidden / heads, sliding-window layers), Gemma 3 (its (1 + w) float32 norms, sandwich norms, scaled embedding,
GeGLU, q/k norms and a second RoPE for its sliding layers) and Granite (embedding, residual and attention
multipliers, a logits divisor): every lossless policy reproduces Hugging Face's greedy
text of the large model, in float64 on the reference ops and in float32 on the CPU (on the extension's one-call
layer); loading from a saved directory; a checkpoint missing a norm is refused."""
import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, Jacobi, LargeOnly, SamplingParams, ShallowDeep, SmallOnly
from bild_kernels._backend import cpu_extension
from tests.conftest import requires_gpu

from .conftest import assert_all_free, hf_greedy

PROMPTS = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 37, 38]]
N = 12
FAMILIES = ["qwen3", "gemma3", "granite"]


def tiny_model(family: str, seed: int, layers: int, dtype=torch.float64, window: int | None = None):
    """A tiny random model of `family` with a sharpened head; its q/k norms' weights random (Gemma: every layer
    norm's), where HF starts them at ones (Gemma's w at zeros) and a missing or misplaced norm would go unseen."""
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    if family == "qwen3":
        cfg = transformers.Qwen3Config(sliding_window=window, use_sliding_window=window is not None,
                                       max_window_layers=1, **common)
    elif family == "granite":  # (no sliding windows)
        cfg = transformers.GraniteConfig(embedding_multiplier=0.5, residual_multiplier=1.5, attention_multiplier=0.08,
                                         logits_scaling=0.5, **common)
    else:  # Gemma 3: every other layer sliding (with a window), the others full with a linearly scaled RoPE
        types = ["sliding_attention" if i % 2 == 0 and window else "full_attention" for i in range(layers)]
        cfg = transformers.Gemma3TextConfig(sliding_window=window or 4096, layer_types=types, query_pre_attn_scalar=20,
                                            rope_parameters={
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                                                   "factor": 8.0}}, **common)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)  # sharp distributions: stable argmaxes, confidences over (0, 1)
        for name, p in model.named_parameters():
            if family == "qwen3" and name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
            elif family == "gemma3" and name.endswith("norm.weight") and "layers" in name:
                p.uniform_(-0.5, 0.5)
    return model


def tiny_qwen3(seed: int, layers: int, dtype=torch.float64, window: int | None = None):
    return tiny_model("qwen3", seed, layers, dtype, window)


def family_pair(family: str, dtype=torch.float64, window=None):
    """A 3-layer large model with a weak last layer and a noisy copy of its first two as the draft."""
    large = tiny_model(family, 1, 3, dtype, window)
    small = tiny_model(family, 2, 2, dtype, window)
    with torch.no_grad():
        large.model.layers[2].self_attn.o_proj.weight.mul_(0.3)
        large.model.layers[2].mlp.down_proj.weight.mul_(0.3)
        small.load_state_dict(large.state_dict(), strict=False)
        torch.manual_seed(2)
        for p in small.model.layers.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    return large, small


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return family_pair(request.param, window=8)


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
def test_lossless_policies_match_hf_greedy(engine, oracle, policy):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert [o.token_ids for o in outs] == oracle
    assert_all_free(engine)


def test_small_only_and_drafting(engine, pair, oracle):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=SmallOnly())
    assert [o.token_ids for o in outs] == [hf_greedy(pair[1], p, N) for p in PROMPTS]
    # the draft really drafts, and disagrees sometimes (so the verification matters)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=4))
    drafted = sum(o.metrics.drafted_tokens for o in outs)
    accepted = sum(o.metrics.accepted_tokens for o in outs)
    assert [o.token_ids for o in outs] == oracle and 0 < accepted < drafted
    assert_all_free(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_on_the_cpu(family):
    """float32 on a CPU (decode steps and verify passes on csrc/cpu_decoder_layer.cpp in the family's form: Qwen3's
    per-head norms, Gemma's output norms, GeGLU and local RoPE): Greedy gives LargeOnly's tokens exactly and
    LargeOnly follows HF's float32 greedy text."""
    large, small = family_pair(family, torch.float32, window=8)
    engine = Engine(large=large, small=small, dtype=torch.float32, max_batch_size=4, max_model_len=64, block_size=4)
    ex = engine.runners["large"].executor
    assert (ex.layers[0].q_norm is not None) == (family != "granite")
    assert (ex._fused is not None) == (cpu_extension() is not None and family != "granite")  # (Granite: ops)
    params = SamplingParams(max_tokens=N)
    base = [o.token_ids for o in engine.generate(PROMPTS, params, policy=LargeOnly())]
    assert base == [hf_greedy(large, p, N) for p in PROMPTS]
    for policy in (Greedy(max_draft_len=3), BiLD(0.0, 0.0, 4)):
        assert [o.token_ids for o in engine.generate(PROMPTS, params, policy=policy)] == base
    assert_all_free(engine)


def test_loads_from_a_saved_directory(tmp_path, pair, oracle):
    pair[0].save_pretrained(tmp_path / "large")
    engine = Engine(large=str(tmp_path / "large"), dtype=torch.float64, max_model_len=64, block_size=4)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=LargeOnly())
    assert [o.token_ids for o in outs] == oracle


def test_a_checkpoint_without_its_norms_is_refused(tmp_path, pair):
    from safetensors.torch import load_file, save_file
    pair[0].save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    weights = load_file(path)
    norm = "self_attn.k_norm" if any("k_norm" in k for k in weights) else "post_attention_layernorm"
    save_file({k: v for k, v in weights.items() if norm not in k}, path)
    with pytest.raises(ValueError, match=rf"missing weight 'layers.0.{norm}.weight'"):
        Engine(large=str(tmp_path / "m"), dtype=torch.float64, max_model_len=64, block_size=4)


@requires_gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_families_on_gpu_under_the_graphed_loops(family):
    """On a GPU (float32, Triton attention, graphed extend passes and draft runs): the large model's greedy text
    under LargeOnly and HF's, and Greedy / lossless BiLD give LargeOnly's tokens."""
    import copy
    large, small = family_pair(family, torch.float32, window=8)
    oracle = [hf_greedy(large, p, N) for p in PROMPTS]  # (on the CPU, before the engine takes copies to the GPU)
    engine = Engine(large=copy.deepcopy(large), small=copy.deepcopy(small), device="cuda", dtype=torch.float32,
                    max_batch_size=4, max_model_len=64, block_size=4)
    params = SamplingParams(max_tokens=N)
    base = [o.token_ids for o in engine.generate(PROMPTS, params, policy=LargeOnly())]
    assert base == oracle
    for policy in (Greedy(max_draft_len=3), BiLD(0.0, 0.0, 4)):
        assert [o.token_ids for o in engine.generate(PROMPTS, params, policy=policy)] == base
    assert_all_free(engine)


def tiny_gemma3_image_text(seed: int = 1):
    """A tiny Gemma3ForConditionalGeneration (Gemma 3 4B and up: a vision tower and a projector beside the language
    model), its language model's head sharpened and norms random."""
    import transformers
    torch.manual_seed(seed)
    text = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                         query_pre_attn_scalar=20, sliding_window=8,
                                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                                    image_token_index=96, boi_token_index=94, eoi_token_index=95)
    model = transformers.Gemma3ForConditionalGeneration(cfg).to(torch.float64).eval()
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.mul_(16.0)  # (the head is tied to it)
        for name, p in model.model.language_model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return model


def tiny_mistral3_image_text(seed: int = 1):
    """A tiny Mistral3ForConditionalGeneration (Mistral Small 3.x: a Pixtral vision tower beside a Mistral)."""
    import transformers
    torch.manual_seed(seed)
    text = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, eos_token_id=None,
                                      bos_token_id=None, pad_token_id=None)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14, head_dim=16)
    cfg = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=96,
                                      spatial_merge_size=1)
    model = transformers.Mistral3ForConditionalGeneration(cfg).to(torch.float64).eval()
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.mul_(16.0)  # (tied to the head, as the outer config says)
    return model


@pytest.mark.parametrize("family, text_type", [("gemma3", "gemma3_text"), ("mistral3", "mistral")])
def test_an_image_text_model_runs_as_its_language_model(tmp_path, family, text_type):
    """Gemma 3 4B and up and Mistral Small 3.x are image-text models: the engine runs their language model on text,
    from the model object (transformers' weight names) or its saved directory (the checkpoint's), as Hugging Face
    generates from text; a text Gemma 3 drafts for Gemma's."""
    model = tiny_gemma3_image_text() if family == "gemma3" else tiny_mistral3_image_text()
    prompts = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15]]
    oracle = [hf_greedy(model, p, N) for p in prompts]
    model.save_pretrained(tmp_path / "mm")
    for source in (model, str(tmp_path / "mm")):
        engine = Engine(large=source, dtype=torch.float64, max_model_len=64, block_size=4)
        ex = engine.runners["large"].executor
        assert ex.config.model_type == text_type and ex.config.num_layers == 3
        outs = engine.generate(prompts, SamplingParams(max_tokens=N), policy=LargeOnly())
        assert [o.token_ids for o in outs] == oracle
    if family != "gemma3":
        return
    # the text-only Gemma 3 drafting for it: a noisy copy of its language model's first two layers
    small = tiny_model("gemma3", 2, 2, window=8)
    with torch.no_grad():
        lm = model.model.language_model
        small.model.embed_tokens.weight.copy_(lm.embed_tokens.weight)
        small.lm_head.weight.copy_(lm.embed_tokens.weight)
        small.model.norm.weight.copy_(lm.norm.weight)
        for i in range(2):
            small.model.layers[i].load_state_dict(lm.layers[i].state_dict())
    engine = Engine(large=model, small=small, dtype=torch.float64, max_model_len=64, block_size=4)
    outs = engine.generate(prompts, SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=3))
    assert [o.token_ids for o in outs] == oracle and sum(o.metrics.accepted_tokens for o in outs) > 0
    assert_all_free(engine)

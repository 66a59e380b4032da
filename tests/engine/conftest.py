"""Tiny random Llama pairs for engine tests: a large model and a small one that often disagrees."""
import pytest
import torch


def tiny_llama(seed: int, layers: int, hidden: int = 64, vocab: int = 97, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    # Sharper distributions than the default init: the models' argmaxes are then stable in float64 and
    # the small model's confidence spreads over (0, 1), so fallbacks and rollbacks both happen.
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)
    return model


@pytest.fixture(scope="session")
def large_model():
    large = tiny_llama(1, layers=3)
    # A weak last layer: a copy of the first two layers then agrees with the whole model ~75% of the
    # time (a random 3-layer model's shallow layers would agree ~20%), like a decent draft.
    with torch.no_grad():
        large.model.layers[2].self_attn.o_proj.weight.mul_(0.3)
        large.model.layers[2].mlp.down_proj.weight.mul_(0.3)
    return large


@pytest.fixture(scope="session")
def small_model(large_model):
    return shallow_copy(large_model, layers=2, noise=0.3)


def shallow_copy(large, layers: int, noise: float, seed: int = 2):
    """A draft that agrees with `large` often but not always: its first `layers` layers, embedding,
    norm and head, plus a little noise (the tests need acceptances, fallbacks and rollbacks)."""
    small = tiny_llama(seed, layers=layers, hidden=large.config.hidden_size, vocab=large.config.vocab_size)
    small.load_state_dict(large.state_dict(), strict=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in small.model.layers.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return small


def word_tokenizer(words: list[str]):
    """A whole-word tokenizer for the tiny models: words[i] is id i, anything else <unk> (id len(words))."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<unk>"] = len(words)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def tiny_engine(large, small, **kw):
    """An Engine over a tiny pair in float64 with blocks of 4 tokens and 64 positions (`kw` adds or overrides)."""
    from bild_kernels import Engine
    return Engine(large=large, small=small, **{"dtype": torch.float64, "max_model_len": 64, "block_size": 4, **kw})


def assert_all_free(engine):
    """Every KV block of every model is back in the free pool, and the allocator's invariants hold."""
    for r in engine.runners.values():
        assert r.num_free_blocks() == engine.kv_cache_blocks
        r.check_invariants()


@torch.no_grad()
def greedy_speculative_reference(large, draft, prompt: list[int], n: int, max_draft_len: int, unsure):
    """Greedy speculative decoding on plain HF models, one token at a time: `draft` proposes until
    `unsure(logits)` (that token is discarded: a fallback) or `max_draft_len`; `large` keeps the prefix equal to
    its argmax and emits its own next token. Returns (output, drafted, accepted, fallbacks)."""
    tokens, drafted, accepted, fallbacks = list(prompt), 0, 0, 0
    while len(tokens) - len(prompt) < n:
        proposal, cap = [], min(max_draft_len, n - (len(tokens) - len(prompt)) - 1)
        while len(proposal) < cap:
            z = draft(torch.tensor([tokens + proposal])).logits[0, -1]
            if unsure(z):
                fallbacks += 1
                break
            proposal.append(int(z.argmax()))
        target = large(torch.tensor([tokens + proposal])).logits[0, len(tokens) - 1:].argmax(-1).tolist()
        a = next((i for i, t in enumerate(proposal) if t != target[i]), len(proposal))
        drafted, accepted = drafted + len(proposal), accepted + a
        tokens += proposal[:a] + [target[a]]
    return tokens[len(prompt):], drafted, accepted, fallbacks


def flat_pair(vocab: int = 12):
    """A tiny large / small pair over a small vocabulary with flat distributions (every token has real
    probability mass): what the statistical tests of the sampling policies draw from."""
    large, small = tiny_llama(11, layers=2, vocab=vocab), tiny_llama(12, layers=1, vocab=vocab)
    for m in (large, small):
        with torch.no_grad():
            m.lm_head.weight.mul_(0.02)
    return large, small


def assert_follows_the_large_model(large, prompt: list[int], outs, warp=None) -> None:
    """The outputs' first tokens follow the large model's distribution after `prompt`, and their second tokens its
    distribution after the most frequent first token: total variation within a few standard errors. warp: None, or
    what turns the large model's logits [1, V] into those of the distribution sampled (a Hugging Face warper)."""
    V = large.config.vocab_size
    warp = warp or (lambda z: z)
    with torch.no_grad():
        p = torch.softmax(warp(large(torch.tensor([prompt])).logits[0, -1:])[0], -1)
    second = {}
    for o in outs:
        second.setdefault(o.token_ids[0], []).append(o.token_ids[1])
    t1, seconds = max(second.items(), key=lambda kv: len(kv[1]))
    with torch.no_grad():
        q = torch.softmax(warp(large(torch.tensor([prompt + [t1]])).logits[0, -1:])[0], -1)
    for samples, target in (([o.token_ids[0] for o in outs], p), (seconds, q)):
        emp = torch.bincount(torch.tensor(samples), minlength=V).double() / len(samples)
        tv = 0.5 * (emp - target).abs().sum().item()
        bound = 4 * (V / len(samples)) ** 0.5 / 2  # a few standard errors of the TV estimate
        assert tv < bound, f"total variation {tv:.3f} >= {bound:.3f} over {len(samples)} samples"

"""A pair whose checkpoints pad one tokenizer's embedding to different sizes (Qwen2.5 0.5B-3B: 151,936 rows; 7B and
up: 152,064): the draft takes the large model's vocabulary size, never drafts an id it lacks, embeds the large
model's ids beyond its own as zeros; every lossless policy stays exactly the large model's greedy text."""
import pytest
import torch

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams, SmallOnly

from .conftest import assert_all_free, hf_greedy, tiny_llama, word_tokenizer

WORDS = [f"w{i}" for i in range(60)]  # 61 tokens with <unk>: inside both embeddings
PROMPTS = [[5, 17, 3], [44, 2, 50, 7, 7, 12, 30, 1, 0, 15], [8]]
N = 12


def _pair(small_vocab: int):
    """The shared fixture's 97-row large model and a draft of `small_vocab` rows: its first two layers with a little
    noise, the rows both have copied from the large model's embedding and head."""
    large = tiny_llama(1, layers=3)
    with torch.no_grad():
        large.model.layers[2].mlp.down_proj.weight.mul_(0.3)
    small = tiny_llama(2, layers=2, vocab=small_vocab)
    keep = min(small_vocab, 97)
    with torch.no_grad():
        for i in range(2):
            small.model.layers[i].load_state_dict(large.model.layers[i].state_dict())
            for p in small.model.layers[i].parameters():
                p.add_(0.2 * p.std() * torch.randn_like(p))
        small.model.norm.weight.copy_(large.model.norm.weight)
        small.model.embed_tokens.weight[:keep] = large.model.embed_tokens.weight[:keep]
        small.lm_head.weight[:keep] = large.lm_head.weight[:keep]
    return large, small


def _save(tmp_path, large, small):
    tok = word_tokenizer(WORDS)
    for name, m in (("large", large), ("small", small)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    return str(tmp_path / "large"), str(tmp_path / "small")


def _greedy_within(model, prompt, n, vocab):
    """Greedy decoding of `model` over its first `vocab` ids only."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1, :vocab].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("small_vocab", [90, 101], ids=["draft-smaller", "draft-larger"])
def test_padded_vocabularies_pair_up_and_stay_lossless(tmp_path, small_vocab):
    large, small = _pair(small_vocab)
    engine = Engine(*_save(tmp_path, large, small), dtype=torch.float64, max_model_len=64, block_size=4)
    ex = engine.runners["small"].executor
    assert engine.vocab_size == ex.config.vocab_size == 97 and ex.embed.shape[0] == 97
    oracle = [hf_greedy(large, p, N) for p in PROMPTS]
    params = SamplingParams(max_tokens=N)
    for policy in (LargeOnly(), Greedy(max_draft_len=3), BiLD(0.0, 0.0, 4)):
        outs = engine.generate(PROMPTS, params, policy=policy)
        assert [o.token_ids for o in outs] == oracle
    assert sum(o.metrics.accepted_tokens for o in outs) > 0  # the draft drafts, and is kept
    # the draft alone: its own greedy text over the ids both models have
    outs = engine.generate(PROMPTS, params, policy=SmallOnly())
    assert [o.token_ids for o in outs] == [_greedy_within(small, p, N, min(small_vocab, 97)) for p in PROMPTS]
    assert_all_free(engine)


def test_padded_vocabularies_need_both_tokenizers_and_their_agreement(tmp_path):
    large, small = _pair(90)
    with pytest.raises(ValueError, match=r"the small model's vocabulary \(90\) differs from the large model's \(97\)"):
        Engine(large=large, small=small, dtype=torch.float64)  # in memory: no tokenizer says they share one
    # in memory with tokenizer= naming the one they share: accepted, lossless
    engine = Engine(large=large, small=small, tokenizer=word_tokenizer(WORDS), dtype=torch.float64, max_model_len=64,
                    block_size=4)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=3))
    assert [o.token_ids for o in outs] == [hf_greedy(large, p, N) for p in PROMPTS]
    # a prompt holding ids the draft has no rows for (a tokenizer's added tokens, an image-text model's image tokens):
    # the draft embeds them as zeros, the text stays the large model's
    prompt = [5, 93, 17, 95, 3]
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=3))
    assert out.token_ids == hf_greedy(large, prompt, N)
    dirs = _save(tmp_path, large, small)
    word_tokenizer(WORDS[:-1] + ["other"]).save_pretrained(dirs[1])
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(*dirs, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"match_vocab: n must be a positive int, got 0"):
        Engine(dirs[0], dtype=torch.float64).runners["large"].executor.match_vocab(0)

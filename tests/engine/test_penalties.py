"""Repetition, presence and frequency penalties and min_tokens through the engine: every lossless policy gives Hugging
Face's greedy text under the same logits processors; speculative sampling samples the penalised distribution."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams, SmallOnly, SpeculativeSampling
from bild_kernels.engine.policies import Jacobi, NGram, ShallowDeep

from tests.conftest import requires_gpu

from .conftest import assert_all_free, flat_pair

PROMPTS = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 37, 38]]
N = 14
LOSSLESS = [LargeOnly(), Greedy(max_draft_len=4), Greedy(max_draft_len=1),
            BiLD(fallback_threshold=0.0, rollback_threshold=0.0, max_draft_len=5),
            BiLD(fallback_threshold=0.5, rollback_threshold=1e-9, max_draft_len=3),
            Greedy(max_draft_len=3, lookup=NGram(max_draft_len=3, max_ngram=2, min_ngram=1)),
            NGram(max_draft_len=4, max_ngram=2, min_ngram=1), Jacobi(block_size=4), ShallowDeep(exit_layer=2)]
IDS = ["large-only", "greedy-4", "greedy-1", "bild-lossless-nofallback", "bild-lossless", "greedy-lookup", "ngram",
       "jacobi", "shallow-deep"]


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence / frequency penalties over the generated tokens only (the prompt's first `prompt_len`)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        out = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: {token id: bias} added to the logits."""

    def __init__(self, bias: dict):
        self.bias = bias

    def __call__(self, input_ids, scores):
        add = torch.zeros_like(scores)
        for t, x in self.bias.items():
            add[:, t] = x
        return scores + add


def hf_penalized_greedy(model, prompt, n, *, repetition=1.0, presence=0.0, frequency=0.0, min_tokens=0,
                        eos=None, bias=None) -> list[int]:
    ids = torch.tensor([prompt])
    procs = LogitsProcessorList([OpenAIPenalties(len(prompt), presence, frequency)] if presence or frequency else [])
    if bias:  # the bias first, then the penalties (vLLM's order): HF's own repetition_penalty would run before it
        procs = LogitsProcessorList([LogitBias(bias)] + ([RepetitionPenaltyLogitsProcessor(repetition)]
                                                         if repetition != 1.0 else []) + list(procs))
        repetition = 1.0
    kw = dict(eos_token_id=eos, min_new_tokens=min_tokens) if eos is not None else dict(min_new_tokens=n)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             repetition_penalty=repetition, logits_processor=procs, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return Engine(large=large_model, small=small_model, dtype=torch.float64, max_batch_size=3, max_model_len=64,
                  block_size=4)


CASES = {"repetition": dict(repetition=1.6), "presence-frequency": dict(presence=0.7, frequency=0.9),
         "all": dict(repetition=0.8, presence=-0.3, frequency=1.1),
         "bias": dict(bias={40: -100.0, 9: -2.0, 88: 1.5, 67: 3.0, 12: 0.5}, repetition=1.3)}


@pytest.fixture(scope="module")
def oracles(large_model):
    return {name: [hf_penalized_greedy(large_model, p, N, **kw) for p in PROMPTS] for name, kw in CASES.items()}


def _params(kw: dict, **more) -> SamplingParams:
    return SamplingParams(max_tokens=N, repetition_penalty=kw.get("repetition", 1.0),
                          presence_penalty=kw.get("presence", 0.0), frequency_penalty=kw.get("frequency", 0.0),
                          logit_bias=kw.get("bias", {}), **more)


def test_the_penalties_change_the_greedy_text(large_model, oracles):
    plain = [hf_penalized_greedy(large_model, p, N) for p in PROMPTS]
    for name, texts in oracles.items():
        assert texts != plain, name  # (else the tests below could not tell the penalties from none)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("policy", LOSSLESS, ids=IDS)
def test_lossless_policies_match_hf_penalized_greedy(engine, oracles, policy, case):
    outs = engine.generate(PROMPTS, _params(CASES[case]), policy=policy)
    assert [o.token_ids for o in outs] == oracles[case]
    assert all(o.error is None and o.finish_reason == "length" for o in outs)
    assert_all_free(engine)


def test_penalized_and_plain_rows_share_a_batch(engine, oracles, large_model):
    kw = CASES["all"]
    params = [_params(kw) if i % 2 else SamplingParams(max_tokens=N) for i in range(len(PROMPTS))]
    outs = engine.generate(PROMPTS, params, policy=Greedy(max_draft_len=3))
    for i, (o, p) in enumerate(zip(outs, PROMPTS)):
        assert o.token_ids == (oracles["all"][i] if i % 2 else hf_penalized_greedy(large_model, p, N))


def test_logprobs_stay_the_raw_ones(engine, large_model):
    out, = engine.generate([PROMPTS[1]], _params(CASES["repetition"], logprobs=0), policy=Greedy(max_draft_len=3))
    ids = torch.tensor([PROMPTS[1] + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(large_model(ids).logits[0], -1)
    P = len(PROMPTS[1])
    want = [logp[P - 1 + j, t].item() for j, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("policy", [LargeOnly(), Greedy(max_draft_len=4), BiLD(fallback_threshold=0.0,
                                                                              rollback_threshold=0.0, max_draft_len=5)],
                         ids=["large-only", "greedy-4", "bild-lossless"])
def test_min_tokens_holds_back_a_stop_id(engine, large_model, policy):
    prompt = PROMPTS[0]
    plain = hf_penalized_greedy(large_model, prompt, N)
    stop = plain[2]  # without min_tokens the request ends at its third token
    first = plain.index(stop)
    out, = engine.generate([prompt], SamplingParams(max_tokens=N, stop=(stop,)), policy=policy)
    assert out.token_ids == plain[:first + 1] and out.finish_reason == "stop"
    want = hf_penalized_greedy(large_model, prompt, N, min_tokens=7, eos=stop)
    out, = engine.generate([prompt], SamplingParams(max_tokens=N, stop=(stop,), min_tokens=7), policy=policy)
    assert out.token_ids == want
    assert stop not in out.token_ids[:6]
    assert out.finish_reason == ("stop" if stop in out.token_ids else "length")
    assert_all_free(engine)


def test_min_tokens_holds_back_stop_strings(large_model, small_model):
    from .conftest import word_tokenizer
    words = [f"w{i}" for i in range(large_model.config.vocab_size - 1)]
    eng = Engine(large=large_model, small=small_model, tokenizer=word_tokenizer(words), dtype=torch.float64,
                 max_batch_size=2, max_model_len=64, block_size=4)
    plain, = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=N), policy=Greedy(max_draft_len=3))
    stop = words[plain.token_ids[1]]  # the text of the second output token
    cut, = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=N, stop=(stop,)), policy=Greedy(max_draft_len=3))
    assert cut.finish_reason == "stop" and len(cut.token_ids) <= 2 and stop not in cut.text
    held, = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=N, stop=(stop,), min_tokens=5),
                         policy=Greedy(max_draft_len=3))
    # A stop string bans nothing (the same tokens), and only an occurrence past the first 5 tokens' text ends it.
    text = lambda k: eng.tokenizer.decode(plain.token_ids[:k], skip_special_tokens=True)  # noqa: E731
    want, reason = plain.token_ids, "length"
    for n in range(6, N + 1):
        if text(n).find(stop, max(len(text(5)) - len(stop) + 1, 0)) >= 0:
            want, reason = plain.token_ids[:n], "stop"  # the token that completes the stop string stays
            break
    assert held.token_ids == want and len(held.token_ids) >= 5
    assert held.finish_reason == reason


def test_logit_bias_outside_the_vocabulary_fails_alone(engine):
    outs = engine.generate(PROMPTS[:2], [SamplingParams(max_tokens=N, logit_bias={97: 1.0}),
                                         SamplingParams(max_tokens=N)], policy=Greedy(max_draft_len=3))
    assert outs[0].error is not None and "logit_bias names token id 97" in outs[0].error
    assert outs[1].error is None and len(outs[1].token_ids) == N
    assert_all_free(engine)


def test_small_only_refuses_penalties_alone(engine, large_model):
    outs = engine.generate(PROMPTS[:2], [_params(CASES["repetition"]), SamplingParams(max_tokens=N)],
                           policy=SmallOnly())
    assert outs[0].error is not None and "small-only" in outs[0].error
    assert outs[1].error is None and len(outs[1].token_ids) == N
    assert_all_free(engine)


@pytest.mark.parametrize("bad", [dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
                                 dict(repetition_penalty=float("inf")), dict(repetition_penalty=float("nan")),
                                 dict(presence_penalty=2.5), dict(frequency_penalty=-2.1),
                                 dict(frequency_penalty=float("nan")), dict(presence_penalty=True),
                                 dict(min_tokens=-1), dict(min_tokens=65), dict(min_tokens=1.5),
                                 dict(logit_bias={3: 101}), dict(logit_bias={-1: 1.0}), dict(logit_bias={"5": 1.0}),
                                 dict(logit_bias={3: float("nan")}), dict(logit_bias=[(3, 1.0), (3, 2.0)]),
                                 dict(logit_bias="ab"), dict(logit_bias={i: 1.0 for i in range(1025)}),
                                 dict(logit_bias={True: 1.0})])
def test_bad_penalties_raise(bad):
    name = next(iter(bad))
    name = "logit_bias" if name == "logit_bias" else name
    with pytest.raises(ValueError, match=name):
        SamplingParams(max_tokens=64, **bad)


def test_speculative_sampling_samples_the_penalized_distribution(monkeypatch):
    # As test_speculative_sampling: the loop on the reference backend (thousands of requests).
    monkeypatch.setenv("BILD_BACKEND", "ref")
    large, small = flat_pair()
    V = large.config.vocab_size
    prompt, presence, frequency = [3, 5, 7], 0.4, 1.2
    eng = Engine(large=large, small=small, dtype=torch.float64, max_batch_size=64, max_model_len=16, block_size=4)
    n = 3000
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s, presence_penalty=presence,
                             frequency_penalty=frequency) for s in range(n)]
    outs = eng.generate([prompt] * n, params, policy=SpeculativeSampling(max_draft_len=2))
    assert sum(o.metrics.accepted_tokens for o in outs) > 0

    cache = {}

    def target(history: tuple, penalized: bool) -> torch.Tensor:
        if (history, penalized) not in cache:
            with torch.no_grad():
                z = large(torch.tensor([prompt + list(history)])).logits[0, -1]
            if penalized:
                counts = torch.bincount(torch.tensor(history, dtype=torch.int64), minlength=V).double()
                z = z - frequency * counts - presence * (counts > 0).double()
            cache[history, penalized] = torch.softmax(z, -1)
        return cache[history, penalized]

    # The first token (from the prefill: no output yet, nothing to penalise) follows the plain distribution.
    first = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=V).double() / n
    assert 0.5 * (first - target((), True)).abs().sum().item() < 2 * (V / n) ** 0.5
    # The second token (verified after the prefill) and the third (at a pass's second position when a draft was kept
    # before it) repeat an earlier output token as often as the penalised distribution says, not the plain one: the
    # count of repeats against its expectation, summed over every request's own history.
    for depth in (1, 2):
        hist = [tuple(o.token_ids[:depth]) for o in outs]
        repeats = sum(o.token_ids[depth] in h for o, h in zip(outs, hist))
        for penalized in (True, False):
            p = torch.tensor([target(h, penalized)[list(set(h))].sum().item() for h in hist], dtype=torch.float64)
            expected, sigma = p.sum().item(), (p * (1 - p)).sum().sqrt().item()
            close = abs(repeats - expected) < 4 * sigma
            assert close == penalized, (depth, penalized, repeats, expected, sigma)


@requires_gpu
@pytest.mark.parametrize("policy", [LargeOnly(), Greedy(max_draft_len=4),
                                    BiLD(fallback_threshold=0.0, rollback_threshold=0.0, max_draft_len=5)],
                         ids=["large-only", "greedy-4", "bild-lossless"])
def test_penalties_on_gpu_under_the_graphed_loop(large_model, small_model, oracles, policy):
    """On a GPU (graphed draft runs and extend passes, float32; the op's CUDA kernel): Hugging Face's penalised
    greedy text, as on the CPU."""
    eng = Engine(large=large_model, small=small_model, device="cuda", dtype=torch.float32, max_batch_size=3,
                 max_model_len=64, block_size=4)
    for case in CASES:
        outs = eng.generate(PROMPTS, _params(CASES[case]), policy=policy)
        assert [o.token_ids for o in outs] == oracles[case], case
    assert_all_free(eng)

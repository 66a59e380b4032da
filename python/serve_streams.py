"""What python/serve.py keeps for a request while serving it: a streamed choice's state (its thinking apart, its
tool calls read) and the watch over non-streamed requests' connections (a client that leaves cancels them)."""
from __future__ import annotations

import select
import socket
import threading
import time

from reasoning import ReasoningStream, reasoning_delta
from tool_calls import AutoToolStream, tool_delta

_RDHUP = getattr(select, "POLLRDHUP", 0)  # (Linux: the client closed its side, even behind bytes it sent before it)


class StreamedChoice:
    """One choice of a streamed reply: its events' deltas (the role in its first; its thinking apart, its tool calls
    read, with a reasoning or tool-call parser), and its completions logprobs' text offsets."""

    def __init__(self, req, request_id: int):
        tools = req.tools
        self.req, self.count, self.offset = req, 0, 0  # (events so far; tokens' texts so far)
        self.call_id = f"call-{request_id}"
        self.auto = AutoToolStream(tools, self.call_id) if tools is not None and tools["mode"] in (
            "auto", "required") else None  # (a "required" reply: its list's calls stream as "auto" ones do)
        self.thinking = ReasoningStream(req.reasoning) if req.reasoning is not None else None

    def event(self, svc, c, kind: str) -> dict:
        """The choice of chunk `c`'s event."""
        o, tools = c.output, self.req.tools
        choice = svc.choice(c.text, c.token_ids, c.finish_reason, o.error if o else None, c.logprobs,
                            c.top_logprobs, self.offset, kind, first=self.count == 0, stream=True)
        if c.logprobs and kind == "text":
            self.offset += sum(len(t) for t in choice["logprobs"]["tokens"])
        if self.thinking is not None:  # (reasoning_content until </think>, then content)
            choice["delta"] = reasoning_delta(self.thinking, choice["delta"], c.finished)
        if self.auto is not None:  # ("auto": content until a call begins, then the calls)
            choice["delta"], choice["finish_reason"] = self.auto.delta(choice["delta"], c.finished,
                                                                       choice["finish_reason"])
        elif tools is not None:  # (a named tool_choice: the text streams as the call's arguments)
            thought = {k: v for k, v in choice["delta"].items() if k == "reasoning_content"}
            choice["delta"] = {**thought, **tool_delta(choice["delta"], tools, self.call_id, self.count == 0)}
        self.count += 1
        return choice


class _Watched:
    """A non-streamed request's connection and its engine requests, while `ClientWatch` watches them."""

    def __init__(self, watch, sock):
        self.watch, self.sock, self.request_ids, self.left = watch, sock, [], False

    def start(self, request_ids: list[int]) -> None:  # (Engine.generate's on_submit)
        self.request_ids = list(request_ids)
        self.watch.add(self)

    def stop(self) -> None:
        self.watch.discard(self)


class ClientWatch:
    """Cancels a non-streamed request's engine requests when its client goes away before the reply (its socket reads
    as closed), as vLLM does: a client that timed out and retried would otherwise leave its first request running to
    the end. One thread a server polls every watched socket each `period` seconds (none while nothing is watched)."""

    def __init__(self, engine, period: float = 0.2):
        self.engine, self.period = engine, period
        self.cv = threading.Condition()
        self.watched: set[_Watched] = set()
        self.thread: threading.Thread | None = None

    def __call__(self, sock) -> _Watched:
        return _Watched(self, sock)

    def add(self, w: _Watched) -> None:
        with self.cv:
            if not self.watched:
                self.cv.notify()  # (wakes the thread from idle; more requests do not cut its period short)
            self.watched.add(w)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="bild-client-watch", daemon=True)
                self.thread.start()

    def discard(self, w: _Watched) -> None:
        with self.cv:
            self.watched.discard(w)

    def _gone(self, now: list[_Watched]) -> list[_Watched]:
        """Those of `now` whose client closed its side (poll: no limit on descriptor numbers, as select has)."""
        poller, by_fd, gone = select.poll(), {}, []
        for w in now:
            fd = w.sock.fileno()
            if fd < 0:
                gone.append(w)
            else:
                by_fd[fd] = w
                poller.register(fd, select.POLLIN | select.POLLPRI | _RDHUP)
        for fd, ev in poller.poll(0):
            w = by_fd[fd]
            try:  # (the raw socket's bytes, TLS records on an HTTPS connection, whose recv takes no flags)
                closed = bool(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL | _RDHUP)) or \
                    socket.socket.recv(w.sock, 1, socket.MSG_PEEK) == b""  # (EOF; a pipelined request is not)
            except (BlockingIOError, InterruptedError):
                closed = False
            except OSError:
                closed = True
            if closed:
                gone.append(w)
        return gone

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.watched:
                    self.cv.wait()
            time.sleep(self.period)
            with self.cv:
                now = list(self.watched)
            for w in self._gone(now):
                w.left = True
                self.discard(w)
                for rid in w.request_ids:
                    self.engine.cancel(rid)

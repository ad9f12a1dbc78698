"""The stream that carries one choice's chunks from the engine's worker thread to its consumer.

Usable both ways, on the same object:

- ``async for chunk in stream`` from an event loop (any loop: the stream binds to none);
- ``for chunk in stream`` blocking, from a plain script or from a worker thread of a running loop.

The worker calls :meth:`ChunkStream.put` (thread-safe) with chunks, an exception, or
:meth:`ChunkStream.end`. A consumer that stops early (``close``/``aclose``, a cancelled task, a
deadline) cancels the work: :attr:`cancelled` is set and the ``on_cancel`` callbacks run, which
take a waiting request out of the queue at once and free a running one's slot at the next step.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from cllama_deploy.engine.base import RequestTimeout

_END = object()


class ChunkStream:
    """Chunks (or one result) of one unit of engine work; see the module docstring."""

    def __init__(self, deadline: Optional[float] = None, request_id: str = ""):
        self.deadline = deadline
        self.request_id = request_id
        self.submitted = time.monotonic()
        self.cancelled = threading.Event()
        self.started = threading.Event()  # set when the engine starts working on it
        self.final: Any = None  # the last chunk with a finish_reason, once iterated past it
        self._items: deque = deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiter: Optional[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = None
        self._sync_waiting = 0  # blocking consumers waiting in __next__
        self._done = False
        self._on_cancel: list[Callable[[], None]] = []

    # -- producer side (worker thread) ------------------------------------------------------------
    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, fut = waiter
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # the consumer's loop is closed: nobody listens any more
                self.cancel()

    def end(self) -> None:
        self.put(_END)

    def consumer_idle(self) -> bool:
        """Whether the consumer has taken everything and is waiting for more (or has gone): what
        it did with the last chunk (an SSE write, say) is done."""
        with self._cond:
            return self._done or self.cancelled.is_set() or (
                not self._items and (self._waiter is not None or self._sync_waiting > 0))

    # -- consumer side ----------------------------------------------------------------------------
    def on_cancel(self, fn: Callable[[], None]) -> None:
        self._on_cancel.append(fn)

    def cancel(self) -> None:
        """Stop the work (idempotent). Iteration then ends after what was already produced."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        for fn in self._on_cancel:
            fn()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.cancel()

    async def aclose(self) -> None:
        self.close()

    def _remaining(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _timeout(self) -> RequestTimeout:
        self._done = True
        self.cancel()
        return RequestTimeout("the request ran past the server's per-request timeout")

    def _take(self, item: Any) -> Any:
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if getattr(item, "finish_reason", None):
            self.final = item
        return item

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        with self._cond:
            while not self._items:
                remaining = self._remaining()
                if remaining is not None and remaining <= 0:
                    break
                self._sync_waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._sync_waiting -= 1
            item = self._items.popleft() if self._items else None
        if item is None:
            raise self._timeout()  # outside the lock: cancelling ends the stream through put()
        return self._take(item)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._cond:
                    if self._items:
                        item = self._items.popleft()
                        break
                    fut = loop.create_future()
                    self._waiter = (loop, fut)
                remaining = self._remaining()
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                if remaining is None:
                    await fut
                else:
                    await _wait_for(fut, remaining)
        except asyncio.TimeoutError:
            raise self._timeout() from None
        except BaseException:  # the consumer's task was cancelled (client went away)
            self._done = True
            self.cancel()
            raise
        try:
            return self._take(item)
        except StopIteration:
            raise StopAsyncIteration from None

    def result(self) -> Any:
        """Block until the single result of a one-item stream (embeddings) and return it."""
        out = None
        for item in self:
            out = item
        return out

    async def aresult(self) -> Any:
        out = None
        async for item in self:
            out = item
        return out


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


if sys.version_info >= (3, 11):
    async def _wait_for(aw, timeout):
        async with asyncio.timeout(timeout):
            return await aw
else:  # pragma: no cover
    async def _wait_for(aw, timeout):
        return await asyncio.wait_for(aw, timeout)

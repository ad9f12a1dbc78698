"""Request scheduling: who gets the model next, and the bridge from the worker thread to asyncio.

:class:`SerialScheduler` runs one job at a time on a dedicated thread, first come first served, with a
bounded waiting queue (``--max-queue``). llama.cpp calls release the GIL, so the event loop keeps
serving HTTP while a job decodes. A scheduler that batches several sequences into one llama.cpp decode
can replace it: the engine hands it :class:`Job` objects and reads events from :class:`EventStream`;
routes never see the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from cllama_deploy.engine.base import EngineClosed, QueueFull, RequestTimeout

log = logging.getLogger("cllama_deploy.engine")

_END = object()


class EventStream:
    """Carries a job's events from the worker thread into the event loop.

    The worker calls :meth:`put` (thread-safe) with chunks, an exception, or :meth:`close`. The
    consumer iterates with ``async for``; closing the iterator early (client gone) or calling
    :meth:`cancel` sets :attr:`cancelled`, which the worker checks between tokens, and removes a job
    that has not started from the queue.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: Optional[float] = None):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.deadline = deadline
        self.submitted = time.monotonic()
        self.started = threading.Event()
        self._done = False
        self._on_cancel: list[Callable[[], None]] = []

    # -- worker side ---------------------------------------------------------------------------
    def put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody is listening any more
            self.cancelled.set()

    def close(self) -> None:
        self.put(_END)

    # -- consumer side -------------------------------------------------------------------------
    def on_cancel(self, fn: Callable[[], None]) -> None:
        self._on_cancel.append(fn)

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            for fn in self._on_cancel:
                fn()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        try:
            if self.deadline is None:
                item = await self._queue.get()
            else:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                item = await _wait_for(self._queue.get(), remaining)
        except asyncio.TimeoutError:
            self._done = True
            self.cancel()
            raise RequestTimeout("the request ran past the server's per-request timeout") from None
        except BaseException:
            # cancelled by the server (client disconnected) while waiting
            self._done = True
            self.cancel()
            raise
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self.cancel()


if sys.version_info >= (3, 11):
    async def _wait_for(aw, timeout):
        async with asyncio.timeout(timeout):
            return await aw
else:  # pragma: no cover
    async def _wait_for(aw, timeout):
        return await asyncio.wait_for(aw, timeout)


@dataclass
class Job:
    """A unit of work for the model: ``run()`` executes on the worker thread.

    ``run`` must check ``stream.cancelled`` between steps and end the stream (``stream.close()`` or
    ``stream.put(exception)``) when done.
    """

    run: Callable[[], None]
    stream: EventStream
    kind: str = "generate"
    submitted: float = field(default_factory=time.monotonic)


class Scheduler(Protocol):
    """What the engine needs from a scheduler."""

    max_queue: int

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    def submit(self, job: Job) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class SerialScheduler:
    """One job at a time on one worker thread; waiting jobs are served in arrival order."""

    def __init__(self, max_queue: int = 64, name: str = "engine"):
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"cllama-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"the server's queue is full ({self.max_queue} requests waiting); retry later"
                )
            self._queue.append(job)
            job.stream.on_cancel(lambda: self._discard(job))
            self._cond.notify()

    def _discard(self, job: Job) -> None:
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # already running or finished
        job.stream.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._running = 1
            try:
                job.stream.started.set()
                job.run()
            except BaseException as exc:  # a bug in the job must not kill the worker
                log.exception("engine job failed")
                job.stream.put(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            finally:
                with self._cond:
                    self._running = 0

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs; let queued and running jobs finish (up to ``timeout`` seconds)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

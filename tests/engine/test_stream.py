"""ChunkStream's consumer state, which the scheduler reads to let consumers run between steps."""

from __future__ import annotations

import asyncio
import threading
import time

from cllama_deploy.engine.stream import ChunkStream


def _until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.001)
    return pred()


def test_a_blocking_consumer_is_idle_only_while_it_waits_for_more():
    s = ChunkStream()
    assert not s.consumer_idle()  # nobody is reading yet
    got, release = [], threading.Event()

    def consume():
        for item in s:
            got.append(item)
            release.wait(5)  # "writing" the chunk

    t = threading.Thread(target=consume)
    t.start()
    assert _until(s.consumer_idle)  # waiting in __next__
    s.put("a")
    assert _until(lambda: got == ["a"])
    assert not s.consumer_idle()  # busy with "a"
    release.set()
    assert _until(s.consumer_idle)  # back for more
    s.end()
    t.join(5)
    assert s.consumer_idle()  # finished: nothing to wait for


def test_an_async_consumer_is_idle_when_it_awaits_and_a_cancelled_one_always():
    s = ChunkStream()

    async def consume():
        out = []
        async for item in s:
            out.append(item)
        return out

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=lambda: loop.run_until_complete(consume()))
    t.start()
    try:
        assert _until(s.consumer_idle)
        s.put("x")
        s.end()
        t.join(5)
    finally:
        loop.close()
    other = ChunkStream()
    other.put("unread")
    assert not other.consumer_idle()
    other.cancel()
    assert other.consumer_idle()  # a consumer that went away is never waited for

"""One loaded model behind several LangChain components, used concurrently: 4 ``ChatCLlama.ainvoke``
calls at once are decoded together by the engine's scheduler and each gets exactly what it gets
alone (greedy); the sync ``batch`` (threads) is batched the same way."""

from __future__ import annotations

import asyncio
import time

from cllama_deploy.langchain import ChatCLlama, shared_engine

EOS = 2  # the tiny tokenizer's </s>: biased away so every answer runs its full max_tokens
PROMPTS = ["你好，请介绍一下你自己。", "Write a short poem about the sea.", "北京有哪些名胜古迹？",
           "List three prime numbers."]
MAX_TOKENS = 32


def _models(path: str) -> list[ChatCLlama]:
    # two components on one file: they share one engine (and the batches)
    kw = dict(model_path=path, temperature=0, max_tokens=MAX_TOKENS, logit_bias={EOS: -100.0})
    return [ChatCLlama(**kw), ChatCLlama(**kw)]


def _steps_over(hist: dict, k: int) -> int:
    """Decode steps that carried more than ``k`` sequences (from the cumulative histogram)."""
    at_most = max((cum for bound, cum in hist["buckets"] if bound <= k), default=0)
    return hist["count"] - at_most


def _hist(engine) -> dict:
    return engine.stats()["step_sequences"]


def test_four_concurrent_ainvoke_are_batched_and_equal_one_at_a_time(engine_gguf):
    models = _models(str(engine_gguf))
    engine = models[0].get_engine()
    assert models[1].get_engine() is engine is shared_engine(str(engine_gguf))
    pairs = [(models[i % 2], p) for i, p in enumerate(PROMPTS)]

    async def one_at_a_time():
        return [await m.ainvoke(p) for m, p in pairs]

    async def all_at_once():
        # hold admission until all 4 are queued, so they start in the same step (without the hold
        # they still overlap, but how much would depend on timing)
        with engine.scheduler.paused():
            tasks = [asyncio.create_task(m.ainvoke(p)) for m, p in pairs]
            deadline = time.monotonic() + 30
            while engine.stats()["queue_depth"] < len(tasks):
                assert time.monotonic() < deadline, "the 4 calls never queued"
                await asyncio.sleep(0.005)
        return await asyncio.gather(*tasks)

    alone = asyncio.run(one_at_a_time())
    before = _hist(engine)
    together = asyncio.run(all_at_once())
    after = _hist(engine)

    steps = after["count"] - before["count"]
    batched = _steps_over(after, 2) - _steps_over(before, 2)
    # 4 sequences shared the decode steps: most steps carried 3 or 4 of them (one step per token
    # for all, instead of 4 × MAX_TOKENS steps)
    assert batched >= MAX_TOKENS - 1, (batched, steps)
    assert steps < 2 * MAX_TOKENS, steps
    for a, t in zip(alone, together):
        assert t.content == a.content
        assert t.usage_metadata["output_tokens"] == a.usage_metadata["output_tokens"] == MAX_TOKENS
        assert t.usage_metadata["input_tokens"] == a.usage_metadata["input_tokens"]
        assert t.response_metadata["finish_reason"] == "length"
    assert len({t.content for t in together}) > 1  # different prompts, different answers


def test_sync_batch_from_threads_is_batched_and_equal(engine_gguf):
    llm = _models(str(engine_gguf))[0]
    engine = llm.get_engine()
    alone = [llm.invoke(p).content for p in PROMPTS]
    before = _hist(engine)
    got = [m.content for m in llm.batch(PROMPTS, config={"max_concurrency": 4})]
    after = _hist(engine)
    assert got == alone
    assert _steps_over(after, 1) - _steps_over(before, 1) > 0  # at least one step decoded several


def test_concurrent_astream_and_ainvoke_mix(engine_gguf):
    """Streams and plain calls at once, on the two components: streamed text = the plain answer."""
    models = _models(str(engine_gguf))

    async def stream_text(m, p):
        return "".join([c.content async for c in m.astream(p)])

    async def main():
        plain = asyncio.gather(*[models[0].ainvoke(p) for p in PROMPTS[:2]])
        streamed = asyncio.gather(*[stream_text(models[1], p) for p in PROMPTS[:2]])
        return await plain, await streamed

    plain, streamed = asyncio.run(main())
    assert [m.content for m in plain] == streamed

"""The engine against transformers, the stream used both ways, embeddings batched, the queue."""

from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest

from cllama_deploy.engine import (
    ContextLengthExceeded,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    RequestTimeout,
    SamplingParams,
)
from tests.engine.helpers import consume, first_difference, random_prompt
from tests.server import builders_server as bs

GREEDY = dict(temperature=0.0, logit_bias={2: -100.0})


def test_greedy_generation_matches_transformers_for_32_tokens(engine_gguf):
    """The engine's own decode loop (batch API, sampler chain, prefix reuse), not a raw eval, on an
    f32 GGUF with an f32 KV cache (llama.cpp's default f16 cache alone moves this random model's
    logits by up to ~0.1). Logits must agree with transformers to 1e-3; a greedy token may differ
    only where transformers' two candidates are closer than the measured difference."""
    import torch
    from transformers import AutoModelForCausalLM

    engine = bs.load_engine(engine_gguf, n_ctx=1024, parallel=2, kv_cache_type="f32")

    model = AutoModelForCausalLM.from_pretrained(engine_gguf.parent / "hf-0",
                                                 dtype=torch.float32).eval()
    rng = random.Random(32)
    flips = 0
    for n_prompt in (5, 60, 200):
        prompt = random_prompt(rng, n_prompt)
        ids = list(prompt)
        hf_lp = []
        with torch.no_grad():
            for _ in range(32):
                logits = model(torch.tensor([ids])).logits[0, -1].double()
                logits[2] = -torch.inf  # EOS blocked, as logit_bias does on our side
                hf_lp.append(torch.log_softmax(logits, -1).numpy())
                ids.append(int(np.argmax(hf_lp[-1])))
        want = ids[len(prompt):]
        for attempt in range(2):  # the second time the prompt comes from the prefix cache
            chunks = list(engine.generate(GenerationRequest(prompt, SamplingParams(
                max_tokens=32, logprobs=engine.n_vocab, **GREEDY))))
            got = [t for c in chunks for t in c.token_ids]
            rows = [lp for c in chunks for lp in c.logprobs]
            if attempt:
                assert chunks[-1].usage.cached_tokens == n_prompt - 1
            j = first_difference(want, got)
            end = 32 if j is None else j + 1
            err = 0.0
            for pos in range(end):  # same prefix so far: compare the whole distributions
                ours = np.full(engine.n_vocab, -np.inf)
                for t in rows[pos].top:
                    ours[t.token_id] = t.logprob
                keep = np.isfinite(hf_lp[pos]) & (ours > -50)
                d = ours[keep] - hf_lp[pos][keep]  # ours normalise over EOS too: a constant offset
                err = max(err, float(np.abs(d - np.median(d)).max()))
            assert err < 1e-3, err
            if j is not None:
                gap = abs(hf_lp[j][want[j]] - hf_lp[j][got[j]])
                assert gap <= 2 * err, (n_prompt, j, want[j], got[j], gap, err)
                flips += 1
    engine.close(10)
    print(f"greedy flips at precision ties: {flips}")


def test_stream_blocking_in_a_script_and_in_a_loop_worker_thread_and_async(batched):
    req = GenerationRequest([1, 40, 41, 42], SamplingParams(max_tokens=12, **GREEDY))
    plain = consume(batched.generate(req)).tokens  # no event loop anywhere

    async def main():
        in_thread = await asyncio.to_thread(lambda: consume(batched.generate(req)).tokens)
        chunks = [c async for c in batched.generate(req)]
        return in_thread, [t for c in chunks for t in c.token_ids], chunks[-1]

    in_thread, async_tokens, final = asyncio.run(main())
    assert plain == in_thread == async_tokens and len(plain) == 12
    assert final.finish_reason == "length" and final.usage.completion_tokens == 12


def test_timeout_while_waiting_raises_and_leaves_the_queue(engine_gguf):
    import time

    eng = bs.load_engine(engine_gguf, n_ctx=256, parallel=1)
    try:
        with eng.scheduler.paused():
            s = eng.generate(GenerationRequest([1, 5], SamplingParams(max_tokens=2),
                                               deadline=time.monotonic() + 0.3))
            with pytest.raises(RequestTimeout):
                list(s)
            assert eng.stats()["queue_depth"] == 0
    finally:
        eng.close(10)


def test_requests_that_cannot_fit_are_refused_before_any_work(batched):
    before = batched.stats()
    with pytest.raises(ContextLengthExceeded) as e:
        batched.generate(GenerationRequest([1] * 1000, SamplingParams(max_tokens=100)))
    assert e.value.param == "max_tokens" and e.value.n_ctx == 1024
    with pytest.raises(ContextLengthExceeded):
        batched.generate(GenerationRequest([1] * 1024, SamplingParams()))
    with pytest.raises(InvalidRequest):  # one bad choice: nothing of the request is queued
        batched.submit([GenerationRequest([1, 5], SamplingParams()),
                        GenerationRequest([1, 5000], SamplingParams())])
    after = batched.stats()
    assert after["steps"] == before["steps"] and after["queue_depth"] == 0


def test_embeddings_of_several_inputs_share_decodes_and_equal_one_by_one(batched):
    rng = random.Random(5)
    inputs = [random_prompt(rng, n) for n in (3, 40, 7, 300, 12)]
    steps: list[int] = []
    ctx = batched.embedding_context
    ctx.decode_hook = steps.append
    try:
        together = batched.embed_sync(inputs)
        assert steps == [sum(map(len, inputs))]  # one decode for all five inputs
        alone = [batched.embed_sync([x]).vectors[0] for x in inputs]
    finally:
        ctx.decode_hook = None
    assert together.prompt_tokens == sum(map(len, inputs))
    for a, b in zip(together.vectors, alone):
        assert np.allclose(a, b, atol=1e-6) and abs(np.linalg.norm(a) - 1) < 1e-5
    assert asyncio.run(batched.embed(inputs[:2])).vectors[1] == pytest.approx(together.vectors[1],
                                                                              abs=1e-6)


# ---------------------------------------------------------------------------------------------
# --max-queue bounds WAITING requests only (issue 14 item 5)
# ---------------------------------------------------------------------------------------------


def test_max_queue_counts_waiting_requests_not_choices_or_running_ones(engine_gguf):
    eng = bs.load_engine(engine_gguf, n_ctx=256, parallel=1, max_queue=0)
    try:
        # idle: served at once although nothing may wait; n=2 is one request (its second choice
        # takes the slot after the first)
        outs = [consume(s) for s in eng.submit(
            [GenerationRequest([1, 9, 9], SamplingParams(max_tokens=4, **GREEDY))] * 2)]
        assert [o.finish for o in outs] == ["length", "length"] and outs[0].tokens == outs[1].tokens
        with eng.scheduler.paused():  # all slots busy
            with pytest.raises(QueueFull) as e:
                eng.generate(GenerationRequest([1, 5], SamplingParams(max_tokens=2)))
        assert "--max-queue 0" in str(e.value)
    finally:
        eng.close(10)
    eng = bs.load_engine(engine_gguf, n_ctx=256, parallel=1, max_queue=2)
    try:
        with eng.scheduler.paused():
            waiting = [eng.submit([GenerationRequest([1, 5], SamplingParams(max_tokens=2))] * 3)
                       for _ in range(2)]  # two requests of three choices each
            assert eng.stats()["queue_depth"] == 2
            with pytest.raises(QueueFull) as e:
                eng.generate(GenerationRequest([1, 5], SamplingParams(max_tokens=2)))
            assert "2 requests are waiting" in str(e.value) and "--max-queue 2" in str(e.value)
        for streams in waiting:
            assert all(consume(s).finish == "length" for s in streams)
    finally:
        eng.close(10)


def test_max_queue_over_http_idle_server_serves_n_2_and_max_queue_0(engine_gguf):
    """Fails on the serial scheduler, which counted choices and the running request."""
    import httpx

    from cllama_deploy.server.settings import Settings

    for max_queue, body in ((1, {"prompt": "a", "max_tokens": 3, "n": 2}),
                            (0, {"prompt": "a", "max_tokens": 3})):
        eng = bs.load_engine(engine_gguf, model_id="tiny", n_ctx=256, max_queue=max_queue)
        srv = bs.make_server(Settings(max_queue=max_queue), eng)
        try:
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"]) == body.get("n", 1)
        finally:
            srv.stop()
            eng.close(10)


def test_decode_hook_sees_every_real_decode(engine_gguf):
    eng = bs.load_engine(engine_gguf, n_ctx=256, parallel=2)
    seen = []
    lock = threading.Lock()

    def hook(n):
        with lock:
            seen.append(n)

    eng.context.decode_hook = hook
    try:
        out = consume(eng.generate(GenerationRequest([1, 5, 6, 7], SamplingParams(max_tokens=6,
                                                                                  **GREEDY))))
        assert len(out.tokens) == 6
        assert seen == [4, 1, 1, 1, 1, 1]  # the prompt, then one step per token but the last
        assert bs.wait_until(lambda: eng.stats()["steps"] == len(seen))  # counted after sampling
    finally:
        eng.close(10)

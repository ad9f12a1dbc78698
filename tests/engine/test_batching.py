"""Continuous batching is invisible in the outputs: each request decoded in a batch with others
(mixed prompt lengths, chunked prefill, prefix reuse, cancellations, a grammar, logprobs, n=2) gets
what it gets when served alone. Where llama.cpp's batched kernels change a logit in the last bits,
a greedy token may flip only at a near-tie (the two tokens' logits within 1e-4); the test measures
the gap at the first differing position and fails on anything else."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest

from cllama_deploy.engine import GenerationRequest, SamplingParams
from tests.engine.helpers import (
    NEAR_TIE,
    consume,
    consume_in_threads,
    first_difference,
    logit_gap,
    random_prompt,
    serve_alone,
)
from tests.server import builders_server as bs

EOS = 2
NO_EOS = {EOS: -100.0}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


def _mix(rng: random.Random, temperature: float):
    """(prompt, params, n, cancel_after) for the 8 requests of the mix."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    def sp(max_tokens, **kw):
        base = dict(temperature=temperature, max_tokens=max_tokens, logit_bias=dict(NO_EOS))
        if temperature > 0:
            base["seed"] = rng.randrange(1 << 30)
        base.update(kw)
        return SamplingParams(**base)

    return [
        (random_prompt(rng, 3), sp(40), 1, None),
        (random_prompt(rng, 300), sp(24), 1, None),
        (random_prompt(rng, 150), sp(60), 1, 5),  # cancelled mid-way
        (random_prompt(rng, 20), sp(64, grammar=json_schema_to_gbnf(json.dumps(SCHEMA)),
                                    logit_bias={}), 1, None),
        (random_prompt(rng, 60), sp(30, logprobs=3), 1, None),
        (random_prompt(rng, 8), sp(32), 2, None),  # n=2: two choices sharing the prompt's prefill
        (random_prompt(rng, 420), sp(16), 1, 3),  # cancelled mid-way
        (random_prompt(rng, 100), sp(50, logit_bias={}), 1, None),  # may stop at EOS
    ]


def _run_mixed(engine, mix):
    """Submit the mix in two waves (the second joins while the first decodes), consume concurrently."""
    jobs, first_wave = [], [0, 5, 3]
    streams: dict[int, list] = {}
    for i in first_wave:
        prompt, params, n, _ = mix[i]
        streams[i] = engine.submit([GenerationRequest(prompt, params) for _ in range(n)])
    # let the first wave start generating before the long prompts join
    first = streams[0][0]
    head = next(iter(first))
    for i in range(len(mix)):
        if i not in streams:
            prompt, params, n, _ = mix[i]
            streams[i] = engine.submit([GenerationRequest(prompt, params) for _ in range(n)])
    order = []
    for i in range(len(mix)):
        for k, s in enumerate(streams[i]):
            order.append((i, k))
            jobs.append((s, mix[i][3]))
    outcomes = consume_in_threads(jobs)
    outcomes[order.index((0, 0))].tokens[:0] = head.token_ids  # the chunk read above
    return {key: out for key, out in zip(order, outcomes)}


def _compare(alone, mix, got, ref, record):
    """Every choice equals its alone run, or differs first at a near-tie; returns the near-ties."""
    near_ties = []
    for (i, k), out in got.items():
        prompt, params, n, cancel_after = mix[i]
        want = ref[(i, k)]
        if cancel_after is not None:
            assert out.finish is None and len(out.tokens) >= 1
            want_tokens = want.tokens[:len(out.tokens)]
        else:
            want_tokens = want.tokens
        j = first_difference(want_tokens, out.tokens)
        if j is None:
            if cancel_after is None:
                assert out.finish == want.finish, (i, k)
            if params.logprobs is not None:
                assert np.allclose(out.logprobs, want.logprobs, atol=1e-3), (i, k)
            continue
        assert j < min(len(want_tokens), len(out.tokens)), f"request {i}.{k}: lengths differ"
        gap = logit_gap(alone, prompt, params, want_tokens[:j], want_tokens[j], out.tokens[j])
        assert gap < NEAR_TIE, (f"request {i}.{k} differs from its alone run at token {j} "
                                f"({want_tokens[j]} vs {out.tokens[j]}), logit gap {gap:.3g}")
        near_ties.append((i, k, j, gap))
    record("near_ties", len(near_ties))
    print(f"near-ties: {len(near_ties)} {near_ties}")
    return near_ties


def test_eight_concurrent_requests_equal_each_served_alone(batched, alone, record_property):
    rng = random.Random(8)
    mix = _mix(rng, temperature=0.0)
    ref = {}
    for i, (prompt, params, n, _) in enumerate(mix):
        for k, out in enumerate(serve_alone(alone, prompt, params, n)):
            ref[(i, k)] = out
    steps_before = batched.stats()["steps"]
    got = _run_mixed(batched, mix)
    # cancelled sequences free their slots at the next step
    assert bs.wait_until(lambda: batched.stats()["slots_used"] == 0)
    stats = batched.stats()
    # the requests really shared decode steps: several sequences per llama_decode
    hist = stats["step_sequences"]
    assert hist["sum"] / max(1, hist["count"]) > 1.5
    assert stats["steps"] > steps_before and stats["slots_used"] == 0 and stats["queue_depth"] == 0
    # n=2 under greedy: both choices are the alone output, and the second shared the prompt's KV
    assert got[(5, 1)].cached >= len(mix[5][0]) - 1
    # the grammar held (byte-fallback tokens may put control bytes inside the string: strict=False)
    assert set(json.loads(batched.detokenize(got[(3, 0)].tokens), strict=False)) == {"name", "age"}
    assert got[(3, 0)].finish == "stop"
    _compare(alone, mix, got, ref, record_property)


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(batched, alone):
    rng = random.Random(9)
    mix = [(p, s, n, None) for p, s, n, _ in _mix(rng, temperature=0.9)]
    mix = [m for m in mix if m[1].grammar is None]
    ref = {}
    for i, (prompt, params, n, _) in enumerate(mix):
        for k, out in enumerate(serve_alone(alone, prompt, params, n)):
            ref[(i, k)] = out
    got = _run_mixed(batched, mix)
    for key, out in got.items():
        assert out.tokens == ref[key].tokens, key
    # choices of one request sample independently (seed, seed: same; the request layer varies seeds)
    assert got[(4, 0)].tokens == got[(4, 1)].tokens


def test_a_cancelled_request_frees_its_slot_for_a_queued_one(engine_gguf):
    eng = bs.load_engine(engine_gguf, n_ctx=512, parallel=2)
    gate = threading.Event()
    eng.context.decode_hook = lambda n: gate.wait(0.005)  # keep the long requests running
    try:
        long = SamplingParams(temperature=0, max_tokens=400, logit_bias=dict(NO_EOS))
        a, b = (eng.generate(GenerationRequest([1, 5 + i, 9], long)) for i in range(2))
        c = eng.generate(GenerationRequest([1, 7, 7], SamplingParams(temperature=0, max_tokens=4)))
        assert next(iter(a)).token_ids and next(iter(b)).token_ids
        stats = eng.stats()
        assert stats["slots_used"] == 2 and stats["queue_depth"] == 1 and not c.started.is_set()
        before = stats["cancelled"]
        a.cancel()
        out = consume(c)  # would wait ~400 steps without the freed slot
        assert out.finish == "length" and len(out.tokens) == 4
        assert eng.stats()["cancelled"] == before + 1
        assert not b.final  # b is still going: c ran beside it, not after it
        b.cancel()
        assert bs.wait_until(lambda: eng.stats()["slots_used"] == 0)
    finally:
        eng.close(10)


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(engine_gguf):
    eng = bs.load_engine(engine_gguf, n_ctx=256, parallel=1, max_queue=1)
    try:
        with eng.scheduler.paused():
            s = eng.generate(GenerationRequest([1, 5, 6], SamplingParams(max_tokens=3)))
            assert eng.stats()["queue_depth"] == 1
            s.cancel()
            assert eng.stats()["queue_depth"] == 0
            assert list(s) == []
    finally:
        eng.close(10)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_sequences_filling_their_windows_never_fail_half_way(engine_gguf, prefix_cache):
    """Every admitted sequence has its window reserved: three at once (and cached prefixes beside
    them) all run to the end of the context."""
    eng = bs.load_engine(engine_gguf, n_ctx=128, parallel=3, prefix_cache=prefix_cache)
    try:
        rng = random.Random(3)
        reqs = [GenerationRequest(random_prompt(rng, 10 + 7 * i), SamplingParams(
            temperature=0, logit_bias=dict(NO_EOS))) for i in range(7)]
        streams = [eng.generate(r) for r in reqs]
        outs = consume_in_threads([(s, None) for s in streams])
        for r, out in zip(reqs, outs):
            assert out.finish == "length" and len(out.tokens) == 128 - len(r.prompt_tokens)
        assert eng.stats()["kv_cells_used"] <= eng.stats()["kv_cells_total"]
    finally:
        eng.close(10)


def test_a_long_prompt_joins_in_chunks_that_keep_running_streams_moving(engine_gguf):
    """With every token costing the same (a decode hook sleeps 3 ms per token, far above the tiny
    model's own cost), a step carrying a joining prompt's chunk stays within STEP_SLOWDOWN times the
    running sequences' own step (or their step plus the minimum chunk)."""
    from cllama_deploy.engine.scheduler import MIN_PREFILL_CHUNK, STEP_SLOWDOWN

    eng = bs.load_engine(engine_gguf, n_ctx=1024, parallel=6)
    steps: list[int] = []
    gate = threading.Event()

    def hook(n):
        steps.append(n)
        gate.wait(0.003 * n)

    eng.context.decode_hook = hook
    try:
        rng = random.Random(4)
        running = [eng.generate(GenerationRequest(random_prompt(rng, 6), SamplingParams(
            temperature=0, max_tokens=300, logit_bias=dict(NO_EOS)))) for _ in range(4)]
        heads = [next(iter(s)) for s in running]  # all four are generating
        assert all(h.token_ids for h in heads)
        mark = len(steps)
        joined = consume(eng.generate(GenerationRequest(random_prompt(rng, 600), SamplingParams(
            temperature=0, max_tokens=2))))
        assert joined.finish == "length"
        after = steps[mark:]
        assert sum(n - 4 for n in after) >= 600  # the prompt was read beside the four
        limit = max(STEP_SLOWDOWN * 4, 4 + MIN_PREFILL_CHUNK) * 1.5  # estimates adapt over steps
        assert max(after) <= limit, after
        for s in running:
            s.cancel()
    finally:
        eng.close(10)



def test_flash_attention_setting_reaches_llama_cpp_and_leaves_outputs_alone(engine_gguf, caplog):
    """``flash_attn`` on and off are what llama.cpp reports for the context, and concurrent greedy
    requests get the same tokens either way (f32 KV: only the
    attention arithmetic differs; a token may flip only at a near-tie)."""
    import logging

    caplog.set_level(logging.DEBUG, logger="cllama_deploy.llama_cpp")
    rng = random.Random(11)
    reqs = [(random_prompt(rng, n), SamplingParams(temperature=0, max_tokens=m,
                                                   logit_bias=dict(NO_EOS)))
            for n, m in ((4, 24), (90, 16), (250, 20), (30, 24))]
    got = {}
    for setting in ("off", "on"):
        caplog.clear()
        eng = bs.load_engine(engine_gguf, n_ctx=512, parallel=4, kv_cache_type="f32",
                             flash_attn=setting)
        try:
            said = [r.getMessage() for r in caplog.records if "flash_attn" in r.getMessage()]
            assert any(("disabled" if setting == "off" else "enabled") in m for m in said), said
            # one KV stream per slot (see llama_api): each sequence attends over its own cells only
            assert any("kv_unified" in m and "false" in m for m in
                       (r.getMessage() for r in caplog.records)), said
            streams = [eng.generate(GenerationRequest(p, s)) for p, s in reqs]
            got[setting] = [o.tokens for o in consume_in_threads([(s, None) for s in streams])]
            if setting == "on":
                for (p, s), want, out in zip(reqs, got["off"], got["on"]):
                    assert len(want) == len(out) == s.max_tokens
                    j = first_difference(want, out)
                    if j is not None:
                        gap = logit_gap(eng, p, s, want[:j], want[j], out[j])
                        assert gap < NEAR_TIE, (j, want[j], out[j], gap)
        finally:
            eng.close(10)


def test_with_llama_cpp_on_every_core_the_worker_lets_consumers_run_between_steps(engine_gguf, alone):
    """With as many llama.cpp threads as CPUs, the worker waits (bounded) after each step for the
    consumers to take their chunks; outputs are unchanged and a consumer that never reads does not
    stall the others."""
    from cllama_deploy.engine.threads import available_cpus

    eng = bs.load_engine(engine_gguf, n_ctx=256, parallel=3, n_threads=available_cpus())
    try:
        assert eng.scheduler.yield_cpu
        rng = random.Random(12)
        reqs = [(random_prompt(rng, n), SamplingParams(temperature=0, max_tokens=16,
                                                       logit_bias=dict(NO_EOS)))
                for n in (5, 40)]
        idle = eng.generate(GenerationRequest(random_prompt(rng, 8), SamplingParams(
            temperature=0, max_tokens=16, logit_bias=dict(NO_EOS))))  # never read until the end
        streams = [eng.generate(GenerationRequest(p, s)) for p, s in reqs]
        outs = consume_in_threads([(s, None) for s in streams])
        for (p, s), out in zip(reqs, outs):
            assert out.tokens == serve_alone(alone, p, s)[0].tokens
        assert len(consume(idle).tokens) == 16
        st = eng.stats()
        assert st["step_seconds"] > st["decode_seconds"]
    finally:
        eng.close(10)

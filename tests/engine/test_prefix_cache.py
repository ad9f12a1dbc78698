"""The prefix cache: earlier chat turns, shared system prompts across slots, LRU bounds, switch off."""

from __future__ import annotations

import random

from cllama_deploy.engine import GenerationRequest, SamplingParams
from tests.engine.helpers import consume, consume_in_threads, random_prompt
from tests.server import builders_server as bs

GREEDY = dict(temperature=0.0, logit_bias={2: -100.0})


def _chat(engine, turns: int, rng: random.Random) -> list:
    """A chat whose every turn re-sends the history (prompt + the answer) plus a new question."""
    prompt, outs = random_prompt(rng, 40), []
    for _ in range(turns):
        out = consume(engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=12,
                                                                               **GREEDY))))
        outs.append((len(prompt), out))
        prompt = prompt + out.tokens + [rng.randrange(3, 1000) for _ in range(15)]
    return outs


def test_later_chat_turns_reuse_the_history_and_match_a_cold_run(engine_gguf):
    warm = bs.load_engine(engine_gguf, n_ctx=1024, parallel=2)
    cold = bs.load_engine(engine_gguf, n_ctx=1024, parallel=2, prefix_cache=False)
    try:
        w = _chat(warm, 5, random.Random(1))
        c = _chat(cold, 5, random.Random(1))
        for turn, ((n, wo), (_, co)) in enumerate(zip(w, c)):
            assert wo.tokens == co.tokens  # same answers with and without reuse
            assert co.cached == 0
            if turn:
                prev_n, prev = w[turn - 1]
                # everything the previous turn left in the KV: its prompt and all but the last token
                # of its answer (the last sampled token is never decoded)
                assert wo.cached == prev_n + len(prev.tokens) - 1
        assert bs.wait_until(lambda: cold.stats()["slots_used"] == 0 == warm.stats()["slots_used"])
        ws, cs = warm.stats(), cold.stats()
        assert ws["prompt_tokens_cached"] == sum(o.cached for _, o in w)
        assert ws["prompt_tokens_computed"] + ws["prompt_tokens_cached"] == sum(n for n, _ in w)
        assert cs["prompt_tokens_computed"] == sum(n for n, _ in c)
        assert cs["prefix_cache_entries"] == 0 and cs["kv_cells_used"] == 0
        # finished turns leave the KV (each step attends over every occupied cell): their cells
        # wait in host memory
        assert ws["kv_cells_used"] == 0 and ws["prefix_cache_entries"] >= 1 and ws["prefix_cache_bytes"] > 0
    finally:
        warm.close(10)
        cold.close(10)


def test_a_shared_system_prompt_is_computed_once_across_slots(engine_gguf):
    eng = bs.load_engine(engine_gguf, n_ctx=1024, parallel=4)
    try:
        rng = random.Random(2)
        system = random_prompt(rng, 300)
        prompts = [system + [rng.randrange(3, 1000) for _ in range(10)] for _ in range(4)]
        streams = eng.submit([GenerationRequest(p, SamplingParams(max_tokens=8, **GREEDY))
                              for p in prompts[:1]]) + [
            eng.generate(GenerationRequest(p, SamplingParams(max_tokens=8, **GREEDY)))
            for p in prompts[1:]]
        outs = consume_in_threads([(s, None) for s in streams])
        # three of the four joined while the first was still computing the system prompt: they
        # waited for its cells instead of computing the same 300 tokens again
        assert all(o.cached >= 300 for o in outs[1:])
        assert eng.stats()["prompt_tokens_computed"] <= 300 + 4 * 10 + 4
        alone = bs.load_engine(engine_gguf, n_ctx=1024, parallel=1, prefix_cache=False)
        try:
            for p, o in zip(prompts, outs):
                assert consume(alone.generate(GenerationRequest(p, SamplingParams(
                    max_tokens=8, **GREEDY)))).tokens == o.tokens
        finally:
            alone.close(10)
    finally:
        eng.close(10)


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(engine_gguf, monkeypatch):
    from cllama_deploy.engine import llamacpp

    monkeypatch.setattr(llamacpp, "PREFIX_CACHE_ENTRIES", 6)
    # host memory for at most as many cells as the KV holds: 128 here
    eng = bs.load_engine(engine_gguf, n_ctx=128, parallel=1)
    try:
        rng = random.Random(3)
        params = SamplingParams(max_tokens=4, **GREEDY)
        kv_bytes = 128 * eng.model.kv_bytes_per_token("f16")

        def run(p):
            return consume(eng.generate(GenerationRequest(p, params)))

        prompts = [random_prompt(rng, 50) for _ in range(3)]
        run(prompts[0])
        run(prompts[1])  # 53 + 53 cells' worth fit in 128: both stay cached
        assert run(prompts[0]).cached == 49 and eng.stats()["prefix_cache_entries"] == 2
        # a third's 53 cells do not fit beside them: the least recently used (prompts[1]) goes
        run(prompts[2])
        assert run(prompts[0]).cached == 49
        assert run(prompts[1]).cached <= 1  # only BOS (every prompt's first token) matches another
        assert bs.wait_until(lambda: eng.stats()["slots_used"] == 0)
        assert eng.stats()["kv_cells_used"] == 0
        for _ in range(12):  # many short prompts: never more than the entries and bytes bounds
            run(random_prompt(rng, 5))
            st = eng.stats()
            assert st["prefix_cache_entries"] <= 6 and 0 < st["prefix_cache_bytes"] <= kv_bytes
    finally:
        eng.close(10)


def test_a_cached_prefix_that_cannot_be_restored_is_computed_instead(engine_gguf, monkeypatch, caplog):
    eng = bs.load_engine(engine_gguf, n_ctx=256, parallel=1)
    try:
        rng = random.Random(5)
        prompt = random_prompt(rng, 60)
        params = SamplingParams(max_tokens=6, **GREEDY)
        first = consume(eng.generate(GenerationRequest(prompt, params)))
        assert bs.wait_until(lambda: eng.stats()["prefix_cache_entries"] == 1)
        again = consume(eng.generate(GenerationRequest(prompt, params)))
        assert again.cached == len(prompt) - 1 and again.tokens == first.tokens
        # llama.cpp refuses the restore (no free cells, say): the prompt is read again, same answer
        monkeypatch.setattr(eng.context, "seq_restore", lambda data, seq_id: False)
        with caplog.at_level("WARNING", logger="cllama_deploy.engine"):
            third = consume(eng.generate(GenerationRequest(prompt, params)))
        assert third.cached == 0 and third.tokens == first.tokens
        assert any("could not restore" in r.getMessage() for r in caplog.records)
    finally:
        eng.close(10)

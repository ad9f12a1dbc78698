"""The request layer in-process (engine/requests.py): the same meaning as over HTTP, blocking and async,
from plain code and from an event loop's worker threads, typed results, engine errors."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from cllama_deploy.engine import ContextLengthExceeded, EngineError, InvalidRequest
from cllama_deploy.engine import requests as rl
from cllama_deploy.engine import schemas
from tests.server.builders_server import wait_until

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "讲个故事"}]
NO_EOS = {2: -100}  # int token ids are fine in-process


def test_chat_equals_the_http_answer(engine, url):
    kw = {"max_tokens": 12, "temperature": 0, "logit_bias": NO_EOS}
    r = rl.chat(engine, MSGS, **kw)
    assert isinstance(r, schemas.ChatCompletion)
    assert r.model == "tiny" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    http = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS,
                      **kw, "logit_bias": {"2": -100}}, timeout=60).json()
    assert http["choices"][0]["message"]["content"] == r.choices[0].message.content
    assert http["usage"]["prompt_tokens"] == r.usage.prompt_tokens


def test_stream_chat_concatenates_to_chat_and_ends_with_usage(engine):
    kw = {"max_tokens": 10, "temperature": 0, "logit_bias": NO_EOS}
    full = rl.chat(engine, MSGS, **kw).choices[0].message.content
    chunks = list(rl.stream_chat(engine, MSGS, **kw, stream_options={"include_usage": True}))
    assert all(isinstance(c, schemas.ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full


def test_async_api_and_worker_threads_of_a_running_loop(engine):
    kw = {"max_tokens": 8, "temperature": 0, "logit_bias": NO_EOS}
    expected = rl.chat(engine, MSGS, **kw).choices[0].message.content

    async def main():
        a = await rl.achat(engine, MSGS, **kw)
        streamed = "".join([c.choices[0].delta.content or "" async for c in rl.astream_chat(engine, MSGS, **kw)
                            if c.choices])
        # blocking calls from worker threads while this loop runs, several at once
        threaded = await asyncio.gather(*[asyncio.to_thread(rl.chat, engine, MSGS, **kw) for _ in range(3)])
        comp = await rl.acomplete(engine, "Once", max_tokens=4, temperature=0)
        emb = await rl.aembed(engine, ["a", "中文"])
        return a, streamed, threaded, comp, emb

    a, streamed, threaded, comp, emb = asyncio.run(main())
    assert a.choices[0].message.content == streamed == expected
    assert all(t.choices[0].message.content == expected for t in threaded)
    assert comp.choices[0].text == rl.complete(engine, "Once", max_tokens=4, temperature=0).choices[0].text
    sync_emb = rl.embed(engine, ["a", "中文"])
    assert len(emb.data) == 2 and emb.data[1].embedding == pytest.approx(sync_emb.data[1].embedding, abs=1e-6)


def test_leaving_a_stream_early_cancels_the_generation(engine):
    before = engine.stats()["cancelled"]
    it = rl.stream_chat(engine, MSGS, max_tokens=300, logit_bias=NO_EOS)
    for i, _ in enumerate(it):
        if i == 3:
            break
    it.close()
    assert wait_until(lambda: engine.stats()["cancelled"] == before + 1)
    assert wait_until(lambda: engine.stats()["running"] == 0)


def test_completions_prompts_n_seeds_and_echo(engine):
    many = rl.complete(engine, ["a", "b"], n=2, max_tokens=3, temperature=1.0, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    again = rl.complete(engine, ["a", "b"], n=2, max_tokens=3, temperature=1.0, seed=7)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    ids = engine.tokenize("abc")
    by_ids = rl.complete(engine, ids, max_tokens=3, temperature=0, echo=True)
    by_text = rl.complete(engine, "abc", max_tokens=3, temperature=0, echo=True)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_text.choices[0].text.startswith("abc")


def test_sampling_defaults_come_from_the_config(engine):
    greedy = rl.complete(engine, "Once", max_tokens=6, temperature=0, logit_bias=NO_EOS).choices[0].text
    config = rl.RequestConfig(sampling={"temperature": 0.0})
    assert rl.complete(engine, "Once", max_tokens=6, logit_bias=NO_EOS, config=config).choices[0].text == greedy
    prep = rl.prepare_chat(engine, {"messages": MSGS}, rl.RequestConfig(sampling={"top_k": 3}))
    p = prep.requests[0].params
    assert p.top_k == 3 and p.stop[-len(engine.info.stop):] == engine.info.stop  # template stops added
    assert rl.prepare_chat(engine, {"messages": MSGS, "top_k": 9}, config).requests[0].params.top_k == 9


def test_per_model_sampling_defaults_in_the_settings(tiny_gguf_path):
    from cllama_deploy.server.settings import Settings

    s = Settings(models=[{"path": str(tiny_gguf_path), "id": "m", "sampling": {"temperature": 0.1}},
                         {"path": str(tiny_gguf_path), "id": "n"}],
                 sampling={"top_p": 0.5, "temperature": 0.7}, parallel=3, prefix_cache=False,
                 kv_cache_type="f32", flash_attn="on")
    assert s.request_config("m").sampling["temperature"] == 0.1
    assert s.request_config("m").sampling["top_p"] == 0.5
    assert s.request_config("n").sampling["temperature"] == 0.7
    configs = s.engine_configs()
    assert [c.parallel for c in configs] == [3, 3] and not any(c.prefix_cache for c in configs)
    assert {c.kv_cache_type for c in configs} == {"f32"} and {c.flash_attn for c in configs} == {"on"}


def test_errors_are_engine_errors_with_param_and_code(engine):
    with pytest.raises(InvalidRequest) as e:
        rl.chat(engine, MSGS, temprature=0)
    assert e.value.param == "temprature" and e.value.code == "unknown_parameter"
    with pytest.raises(InvalidRequest) as e:
        rl.chat(engine, MSGS, temperature="hot")
    assert e.value.param == "temperature" and e.value.code == "invalid_value"
    with pytest.raises(InvalidRequest) as e:
        rl.chat(engine, [])
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequest) as e:
        rl.chat(engine, MSGS, n=99, config=rl.RequestConfig(max_n=4))
    assert e.value.param == "n"
    with pytest.raises(ContextLengthExceeded) as e:
        rl.complete(engine, "word " * 600)
    assert e.value.param == "prompt"
    with pytest.raises(ContextLengthExceeded):  # raised at the call, before the first chunk
        rl.stream_chat(engine, MSGS, max_tokens=10_000)
    with pytest.raises(InvalidRequest) as e:
        rl.complete(engine, [engine.info.n_vocab + 5])
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest) as e:
        rl.chat(engine, MSGS, response_format={"type": "json_schema",
                                              "json_schema": {"schema": {"type": "array", "minItems": 10**6}}})
    assert e.value.param == "response_format"


def test_unknown_fields_can_be_logged_instead(engine, caplog):
    config = rl.RequestConfig(unknown_fields="warn")
    with caplog.at_level("WARNING", logger="cllama_deploy.engine"):
        r = rl.complete(engine, "x", max_tokens=2, temprature=0.1, config=config)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "temprature" in caplog.text
    with pytest.raises(InvalidRequest):  # a known field that would change the output still refuses
        rl.complete(engine, "x", mirostat=2, config=config)


def test_detokenize_decodes_a_sequence(engine):
    for text in ("Hello 世界", " leading", "x"):
        assert rl.detokenize(engine, engine.tokenize(text)) == text
        assert rl.detokenize(engine, engine.tokenize(text, add_bos=False)) == text


def test_run_step_by_step_with_cancel(engine):
    async def main():
        prep = rl.prepare_completion(engine, {"prompt": "go", "max_tokens": 400, "n": 2,
                                              "logit_bias": {"2": -100}})
        finals = []
        run = rl.submit(engine, prep, on_final=finals.append)
        got = []
        async for chunk in run.chunks():
            got.append(chunk)
            if len(got) == 3:
                run.cancel()
        return run, got, finals

    with pytest.raises(EngineError, match="without a result"):  # a cancelled choice has no result
        asyncio.run(main())
    assert wait_until(lambda: engine.stats()["running"] == 0)
    finished = threading.Event()

    def blocking():
        prep = rl.prepare_completion(engine, {"prompt": "go", "max_tokens": 3, "n": 2})
        run = rl.submit(engine, prep)
        res = run.result_sync()
        assert len(res.choices) == 2 and run.completion_tokens == res.usage.completion_tokens
        finished.set()

    t = threading.Thread(target=blocking)
    t.start()
    t.join(60)
    assert finished.is_set()

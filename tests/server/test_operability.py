"""Operability: API keys, queue limits, timeouts, loading, disconnects, concurrency, CORS."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from cllama_deploy.server.settings import Settings
from tests.server import builders_server as bs

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def limited_engine(tiny_gguf_path):
    eng = bs.load_engine(tiny_gguf_path, model_id="tiny", n_ctx=512, max_queue=1)
    yield eng
    eng.close(5)


@pytest.fixture(scope="module")
def keyed(limited_engine, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# operators\nkey-from-file\n")
    settings = Settings(api_keys=["k1", "k2"], api_key_file=str(key_file), request_timeout=1.5,
                        cors_origins=["http://example.test"])
    srv = bs.make_server(settings, limited_engine)
    yield srv
    srv.stop()


def test_api_keys(keyed):
    u = keyed.url + "/v1/chat/completions"
    r = httpx.post(u, json=CHAT, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(u, json=CHAT, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # auth is checked before the body is even parsed
    r = httpx.post(u, content=b"{bad", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 401
    for key in ("k1", "k2", "key-from-file"):
        assert httpx.post(u, json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    assert httpx.post(u, json=CHAT, headers={"x-api-key": "k1"}, timeout=30).status_code == 200
    for public in ("/health", "/", "/metrics"):
        assert httpx.get(keyed.url + public).status_code == 200
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    assert httpx.post(keyed.url + "/tokenize", json={"content": "x"}).status_code == 401


def test_openai_client_with_wrong_key(keyed):
    import openai

    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="k2", max_retries=0)
    assert [m.id for m in good.models.list()] == ["tiny"]


def test_cors(keyed):
    r = httpx.options(keyed.url + "/v1/chat/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://example.test"
    r = httpx.get(keyed.url + "/v1/models", headers={"Origin": "http://example.test"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://example.test"
    r = httpx.options(keyed.url + "/v1/chat/completions", headers={
        "Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_queue_full_is_429_and_queued_requests_wait_their_turn(keyed, limited_engine):
    h = {"Authorization": "Bearer k1"}
    results = {}
    with bs.engine_held(limited_engine):
        t = threading.Thread(target=lambda: results.setdefault("first", httpx.post(
            keyed.url + "/v1/completions", json={"prompt": "a", "max_tokens": 3}, headers=h, timeout=60)))
        t.start()
        assert bs.wait_until(lambda: limited_engine.stats()["queue_depth"] == 1)
        r = httpx.post(keyed.url + "/v1/completions", json={"prompt": "b", "max_tokens": 3}, headers=h,
                       timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"]
    t.join(60)
    assert results["first"].status_code == 200, results["first"].text
    assert results["first"].json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_request_timeout_is_504_or_an_error_event(keyed, limited_engine):
    h = {"Authorization": "Bearer k1"}
    with bs.engine_held(limited_engine):
        r = httpx.post(keyed.url + "/v1/chat/completions", json=CHAT, headers=h, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        status, events = bs.stream_post(keyed.url + "/v1/chat/completions", {**CHAT, "stream": True},
                                        headers=h)
        assert status == 200
        assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    assert bs.wait_until(lambda: limited_engine.stats()["queue_depth"] == 0)


def test_health_503_while_loading(tiny_gguf_path):
    gate = threading.Event()

    def loader():
        gate.wait(60)
        return bs.load_engine(tiny_gguf_path, model_id="late", n_ctx=256)

    srv = bs.make_server(Settings(), None, loaders=[loader])
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.get(srv.url + "/v1/models").status_code == 503
        from cllama_deploy.engine.registry import RegistryState

        assert srv.app.state.registry.state is RegistryState.LOADING
        gate.set()
        assert bs.wait_until(lambda: httpx.get(srv.url + "/health").status_code == 200)
        assert srv.app.state.registry.state is RegistryState.READY
        r = httpx.post(srv.url + "/v1/chat/completions", json={**CHAT, "model": "late"}, timeout=30)
        assert r.status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_models_that_failed_to_load_are_500_without_retry(tmp_path):
    """An app built with loaders keeps a 'failed' state (the `serve` command exits instead): it is
    not 503-with-Retry-After, since retrying cannot help until the file is fixed."""
    from cllama_deploy.engine.registry import RegistryState

    def loader():
        return bs.load_engine(tmp_path / "missing.gguf")

    app_srv = bs.make_server(Settings(), None, loaders=[loader])
    try:
        registry = app_srv.app.state.registry
        assert bs.wait_until(lambda: registry.state is not RegistryState.LOADING)
        assert registry.state is RegistryState.FAILED and registry.state.value == "failed"
        r = httpx.get(app_srv.url + "/health")
        assert r.status_code == 500 and r.json()["status"] == "failed" and "missing.gguf" in r.json()["error"]
        assert "retry-after" not in r.headers
        r = httpx.post(app_srv.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        assert "retry-after" not in r.headers
    finally:
        app_srv.stop()


def test_fifty_concurrent_requests_none_lost(url):
    async def one(c, i):
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 4, "stream": i % 2 == 0}
        if not body["stream"]:
            r = await c.post(url + "/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["finish_reason"]
        finish = None
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = bs.sse_events([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            finish = e["choices"][0]["finish_reason"] or finish
        return finish

    async def main():
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            return await asyncio.gather(*[one(c, i) for i in range(50)])

    finishes = asyncio.run(main())
    assert len(finishes) == 50 and all(f in ("stop", "length") for f in finishes)


def test_disconnect_mid_stream_frees_the_engine(url, engine, monkeypatch):
    streams = []
    real_submit = engine.submit

    def capture(reqs):
        out = real_submit(reqs)
        streams.extend(out)
        return out

    gate = threading.Event()
    evals = []

    def slow_decode(n_tokens):  # runs before every real llama_decode of the engine
        evals.append(n_tokens)
        if len(evals) > 3:
            gate.wait(60)

    monkeypatch.setattr(engine, "submit", capture)
    monkeypatch.setattr(engine.context, "decode_hook", slow_decode)
    cancelled_before = engine.stats()["cancelled"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "long story"}], "max_tokens": 300,
            "stream": True, "logit_bias": {"2": -100}}
    try:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
                assert '"role":"assistant"' in first
        # the client is gone: the server notices and cancels while the generation is mid-way
        assert bs.wait_until(lambda: streams and streams[0].cancelled.is_set())
    finally:
        gate.set()
    assert bs.wait_until(lambda: engine.stats()["running"] == 0)
    assert engine.stats()["cancelled"] == cancelled_before + 1
    assert len(evals) < 50
    monkeypatch.undo()
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200


def test_disconnect_while_queued_leaves_the_queue(keyed, limited_engine):
    h = {"Authorization": "Bearer k1"}
    with bs.engine_held(limited_engine):
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", keyed.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers=h) as r:
                assert r.status_code == 200
                assert bs.wait_until(lambda: limited_engine.stats()["queue_depth"] == 1)
        # closing the connection removed the waiting request, while the engine is still held
        assert bs.wait_until(lambda: limited_engine.stats()["queue_depth"] == 0)


def test_disconnect_of_a_waiting_non_streaming_request(keyed, limited_engine):
    h = {"Authorization": "Bearer k1"}
    outcome = {}

    def give_up_early():
        try:
            httpx.post(keyed.url + "/v1/completions", json={"prompt": "a", "max_tokens": 3}, headers=h,
                       timeout=httpx.Timeout(30, read=0.8))  # before the 1.5 s server timeout
        except httpx.ReadTimeout as exc:
            outcome["error"] = exc

    with bs.engine_held(limited_engine):
        t = threading.Thread(target=give_up_early)
        t.start()
        assert bs.wait_until(lambda: limited_engine.stats()["queue_depth"] == 1)
        t.join(30)
        assert isinstance(outcome.get("error"), httpx.ReadTimeout)
        # the server saw the client go and dropped the waiting request, engine still held
        assert bs.wait_until(lambda: limited_engine.stats()["queue_depth"] == 0)

"""Fuzz: hypothesis-generated request bodies (valid, boundary and wrong-typed values) never get a 5xx,
and every 200 stream ends with a finish_reason or an error event, then [DONE]."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                 st.text(max_size=8), st.lists(st.integers(-5, 600), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
small_int = st.one_of(st.integers(-2, 12), st.sampled_from([2**31, 2**63, 10**6]), junk)
unit = st.one_of(st.floats(-1, 3, allow_nan=False), junk)
text = st.text(max_size=40)
role = st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool"]), junk)
content = st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                          "text": text}), max_size=2), junk)
message = st.one_of(st.fixed_dictionaries({"role": role, "content": content}), junk)
schema = st.one_of(
    st.just({"type": "object", "properties": {"a": {"type": "integer"}}}),
    st.just({"type": "string", "maxLength": 3}), st.just({"type": "array", "minItems": 10**9}),
    st.just({"$ref": "#/nowhere"}), st.just({"type": "nonsense"}), junk)
response_format = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
                          optional={"json_schema": st.fixed_dictionaries({"name": text, "schema": schema})}),
    junk)

common = {
    "model": st.one_of(st.just("tiny"), text, junk), "temperature": unit, "top_p": unit,
    "top_k": small_int, "min_p": unit, "max_tokens": small_int, "n": small_int, "seed": small_int,
    "stop": st.one_of(text, st.lists(text, max_size=3), junk), "presence_penalty": unit,
    "frequency_penalty": unit, "repeat_penalty": unit, "stream": st.one_of(st.booleans(), junk),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "logit_bias": st.one_of(st.dictionaries(st.sampled_from(["2", "5", "-1", "x", "99999"]),
                                            st.floats(-200, 200), max_size=2), junk),
    "user": st.one_of(text, junk), "response_format": response_format,
}
chat_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, min_size=1, max_size=3), junk)},
    optional={**common, "max_completion_tokens": small_int, "logprobs": st.one_of(st.booleans(), junk),
              "top_logprobs": small_int, "tools": st.one_of(st.just([]), junk)})
completion_body = st.fixed_dictionaries(
    {"prompt": st.one_of(text, st.lists(text, max_size=2), st.lists(st.integers(-3, 600), max_size=4),
                         st.lists(st.lists(st.integers(0, 600), max_size=3), max_size=2), junk)},
    optional={**common, "logprobs": small_int, "echo": st.one_of(st.booleans(), junk),
              "suffix": st.one_of(st.none(), text), "best_of": small_int})
embedding_body = st.fixed_dictionaries(
    {"input": st.one_of(text, st.lists(text, max_size=3), st.lists(st.integers(-3, 600), max_size=4), junk)},
    optional={"model": st.one_of(st.just("tiny"), junk), "encoding_format": st.one_of(
        st.sampled_from(["float", "base64"]), junk), "dimensions": small_int})
tokenizer_body = st.one_of(
    st.fixed_dictionaries({"content": st.one_of(text, junk)}, optional={"add_special": junk,
                                                                         "with_pieces": st.booleans()}),
    st.fixed_dictionaries({"tokens": st.one_of(st.lists(st.integers(-5, 2**40), max_size=5), junk)}))

requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("/v1/completions"), completion_body),
    st.tuples(st.just("/v1/embeddings"), embedding_body),
    st.tuples(st.sampled_from(["/tokenize", "/detokenize"]), tokenizer_body),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), junk),
)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def check(http, path, body):
    # cap generation work: the point is validation, not long outputs
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and 16 < body["max_tokens"] < 2**31:
        body["max_tokens"] = 16
    if isinstance(body, dict) and isinstance(body.get("n"), int) and body["n"] > 3:
        body["n"] = body["n"] if body["n"] > 8 else 3
    raw = json.dumps(body).encode()
    with http.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
        assert r.status_code < 500, (path, body, r.read())
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            lines = [line for line in r.iter_lines() if line]
            assert lines[-1] == "data: [DONE]", (path, body, lines[-3:])
            last = json.loads(lines[-2][6:])
            assert "error" in last or last["choices"] == [] or last["choices"][0]["finish_reason"], \
                (path, body, lines[-3:])
        else:
            r.read()
            data = r.json()
            if r.status_code >= 400:
                assert set(data["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(req=requests)
def test_fuzzed_bodies_never_5xx(http, req):
    check(http, *req)


def test_server_still_healthy_after_fuzz(url):
    assert httpx.get(url + "/health").status_code == 200
    r = httpx.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200

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
text = st.text(max_size=40)

# Valid values (boundaries included) for each parameter; most bodies are built from these so the
# generation paths run with many parameter combinations, and a share get one field replaced by junk.
schema = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "string", "maxLength": 3}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    {"type": "array", "minItems": 10**9}, {"$ref": "#/nowhere"}, {"type": "nonsense"}, {"enum": ["x", 1]}])
response_format = st.one_of(
    st.just({"type": "text"}), st.just({"type": "json_object"}),
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": st.fixed_dictionaries({"name": text, "schema": schema})}))
VALID = {
    "model": st.sampled_from(["tiny", "tiny", "unknown-model"]),
    "temperature": st.one_of(st.just(0), st.floats(0, 2)), "top_p": st.floats(0, 1),
    "top_k": st.integers(0, 2000), "min_p": st.floats(0, 1), "typical_p": st.floats(0.01, 1),
    "max_tokens": st.integers(1, 12), "n": st.integers(1, 3), "seed": st.integers(-2**63, 2**64 - 1),
    "stop": st.one_of(text, st.lists(text, max_size=3)), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repeat_penalty": st.floats(0.01, 3),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logit_bias": st.dictionaries(st.sampled_from(["2", "5", "17", "999"]), st.floats(-100, 100), max_size=2),
    "user": text, "response_format": response_format,
}
message = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "developer"]),
    "content": st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                        max_size=2))})
CHAT = {**VALID, "max_completion_tokens": st.integers(1, 12), "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 20)}
COMPLETION = {**VALID, "logprobs": st.integers(0, 5), "echo": st.booleans()}
EMBEDDING = {"model": st.just("tiny"), "encoding_format": st.sampled_from(["float", "base64"])}


# fields a body may carry beyond the declared ones: typos, known OpenAI / llama.cpp extensions
EXTRA_NAMES = ["temprature", "store", "metadata", "cache_prompt", "mirostat", "tfs_z", "n_predict",
               "grammar", "json_schema", "repeat_last_n", "ignore_eos", "samplers"]
extra_value = st.one_of(junk, st.sampled_from(['root ::= "a"', "root ::= root", "::=", "", 0, -1, 5, True]))


def bodies(required: dict, optional: dict):
    valid = st.fixed_dictionaries(required, optional=optional)
    names = sorted({**required, **optional})

    @st.composite
    def mutated(draw):  # one field (maybe required) replaced by junk or a wrong-typed value
        body = draw(valid)
        body[draw(st.sampled_from(names))] = draw(junk)
        return body

    @st.composite
    def extended(draw):  # one extra field, known or not, with a plausible or junk value
        body = draw(valid)
        body[draw(st.sampled_from(EXTRA_NAMES))] = draw(extra_value)
        return body

    return st.one_of(valid, valid, mutated(), extended())


chat_body = bodies({"messages": st.lists(message, min_size=1, max_size=3)}, CHAT)
completion_body = bodies({"prompt": st.one_of(text, st.lists(text, min_size=1, max_size=2),
                                              st.lists(st.integers(0, 999), min_size=1, max_size=4))},
                         COMPLETION)
embedding_body = bodies({"input": st.one_of(text, st.lists(text, min_size=1, max_size=3),
                                            st.lists(st.integers(0, 999), min_size=1, max_size=4))},
                        EMBEDDING)
tokenizer_body = st.one_of(
    bodies({"content": text}, {"add_special": st.booleans(), "with_pieces": st.booleans()}),
    bodies({"tokens": st.lists(st.integers(0, 999), max_size=5)}, {}))

requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("/v1/completions"), completion_body),
    st.tuples(st.just("/v1/embeddings"), embedding_body),
    st.tuples(st.sampled_from(["/tokenize", "/detokenize"]), tokenizer_body),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), junk),
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
            if r.status_code == 400:  # every 400 has a code
                assert data["error"]["code"], (path, body, data)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(req=requests)
def test_fuzzed_bodies_never_5xx(http, req):
    check(http, *req)


def test_server_still_healthy_after_fuzz(url):
    assert httpx.get(url + "/health").status_code == 200
    r = httpx.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200

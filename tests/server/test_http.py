"""The HTTP API with httpx: response shapes, SSE framing, parameters, every error status."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.server.builders_server import stream_post

NO_EOS = {"2": -100}  # keep the random model from ending early where a length matters


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def chat(url, content="Hello", **params):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], **params}
    return post(url, "/v1/chat/completions", body)


def assert_error(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if status == 400:  # every 400 says which kind of mistake it is (issue 14 item 11)
        assert err["code"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# --------------------------------------------------------------------------------------------- shapes


def test_models_health_docs(url):
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny"]
    card = data["data"][0]
    assert card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"]
    assert card["meta"]["n_ctx"] == 512 and card["meta"]["chat_template"] == "gguf"
    assert httpx.get(url + "/v1/models/tiny").json()["id"] == "tiny"
    assert_error(httpx.get(url + "/v1/models/nope"), 404, "model_not_found", "model")
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["models"] == ["tiny"]
    slots = health["slots"]["tiny"]
    assert slots["total"] >= 1 and 0 <= slots["used"] <= slots["total"] and slots["queue_depth"] >= 0
    docs = httpx.get(url + "/docs")
    assert docs.status_code == 200
    # the docs page works offline: every script and stylesheet comes from this server
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text)
    assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
    for a in assets:
        assert httpx.get(url + a).status_code == 200, a
    spec = httpx.get(url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize",
                 "/detokenize", "/health", "/metrics"):
        assert path in spec["paths"], path


def test_chat_completion_shape(url):
    r = chat(url, max_tokens=8, temperature=0)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"]
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    u = body["usage"]
    assert u["prompt_tokens"] > 10 and 0 <= u["completion_tokens"] <= 8
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_stream_equals_non_stream_under_greedy_and_ends_properly(url):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "讲个故事"}], "temperature": 0,
            "max_tokens": 60, "logit_bias": NO_EOS}
    full = post(url, "/v1/chat/completions", body).json()
    status, events = stream_post(url + "/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert full["usage"]["completion_tokens"] == 60


def test_stream_include_usage(url):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": NO_EOS}
    status, events = stream_post(url + "/v1/chat/completions", body)
    assert status == 200 and events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_max_completion_tokens_wins(url):
    r = chat(url, max_tokens=50, max_completion_tokens=3, logit_bias=NO_EOS)
    assert r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_the_text(url):
    base = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 40,
            "logit_bias": NO_EOS}
    text = post(url, "/v1/completions", base).json()["choices"][0]["text"]
    assert len(text) > 12
    stop = text[8:11]
    first = text.find(stop)
    for stop_param in (stop, [stop, "never-seen-stop"]):
        r = post(url, "/v1/completions", {**base, "stop": stop_param}).json()
        assert r["choices"][0]["text"] == text[:first]
        assert r["choices"][0]["finish_reason"] == "stop"
        status, events = stream_post(url + "/v1/completions", {**base, "stop": stop_param, "stream": True})
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text[:first]
        assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_completions_shapes_echo_and_token_prompts(url):
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 4, "echo": True,
                                      "temperature": 0}).json()
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert r["choices"][0]["text"].startswith("abc")
    tokens = post(url, "/tokenize", {"content": "abc"}).json()["tokens"]
    by_ids = post(url, "/v1/completions", {"model": "tiny", "prompt": tokens, "max_tokens": 4,
                                           "temperature": 0}).json()
    assert "abc" + by_ids["choices"][0]["text"] == r["choices"][0]["text"]
    many = post(url, "/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "n": 2,
                                         "max_tokens": 2, "temperature": 0.9, "seed": 1}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]


def test_n_choices_and_seed(url):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3, "max_tokens": 6,
            "temperature": 1.0, "seed": 42}
    a = post(url, "/v1/chat/completions", body).json()
    b = post(url, "/v1/chat/completions", body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    status, events = stream_post(url + "/v1/chat/completions", {**body, "stream": True})
    finishes = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert finishes == [0, 1, 2]
    assert_error(post(url, "/v1/chat/completions", {**body, "n": 9}), 400, param="n")


def test_chat_logprobs(url):
    r = chat(url, "hi", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] > 0
    for item in content:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 3
        tops = [t["logprob"] for t in item["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert item["logprob"] == pytest.approx(tops[0], abs=1e-5)  # greedy picks the argmax
    joined = bytes(b for item in content for b in item["bytes"]).decode("utf-8", "replace")
    assert joined == r["choices"][0]["message"]["content"]


def test_completion_logprobs(url):
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 5, "logprobs": 2,
                                      "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    n = r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n > 0
    assert all(len(t) <= 2 for t in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    top1 = [max(t.values()) for t in lp["top_logprobs"]]
    assert lp["token_logprobs"] == pytest.approx(top1, abs=1e-5)  # greedy picks the argmax


def test_json_schema_output_with_split_utf8_characters(url):
    """A grammar forces rare Chinese characters that the tokenizer only has as byte tokens: the stream
    must carry whole characters only, and equal the non-streamed text."""
    schema = {"type": "object", "properties": {"名字": {"type": "string", "enum": ["龘靐齉"]}},
              "required": ["名字"]}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "json please"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            "temperature": 0, "max_tokens": 200, "logprobs": True}
    full = post(url, "/v1/chat/completions", body).json()
    text = full["choices"][0]["message"]["content"]
    assert json.loads(text) == {"名字": "龘靐齉"}
    assert full["choices"][0]["finish_reason"] == "stop"
    pieces = [bytes(t["bytes"]) for t in full["choices"][0]["logprobs"]["content"]]
    partial = [p for p in pieces if p and _not_utf8(p)]
    assert partial, "the test needs tokens that end inside a character"
    status, events = stream_post(url + "/v1/chat/completions", {**body, "stream": True})
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_json_object_mode(url):
    r = chat(url, "give me json", response_format={"type": "json_object"}, max_tokens=30,
             temperature=0).json()
    assert r["choices"][0]["message"]["content"].startswith("{")


def test_tokenize_detokenize(url):
    r = post(url, "/tokenize", {"content": "Hello 世界", "with_pieces": True}).json()
    ids = [t["id"] for t in r["tokens"]]
    assert ids[0] == 1  # BOS
    plain = post(url, "/tokenize", {"content": "Hello 世界", "add_special": False}).json()["tokens"]
    assert plain == ids[1:]
    assert post(url, "/detokenize", {"tokens": plain}).json()["content"] == "Hello 世界"
    special = post(url, "/tokenize", {"content": "<s>", "add_special": False}).json()["tokens"]
    literal = post(url, "/tokenize", {"content": "<s>", "add_special": False,
                                      "parse_special": False}).json()["tokens"]
    assert special == [1] and 1 not in literal and len(literal) > 1
    assert_error(post(url, "/detokenize", {"tokens": [10**6]}), 400, "invalid_value", "tokens")
    assert_error(post(url, "/detokenize", {"tokens": [-1]}), 400)


@pytest.mark.parametrize("text", ["Hello 世界", " Hello", "  two spaces", "\nnew line", "龘x", "a"])
def test_detokenize_round_trips_without_a_leading_space(url, server_sp_model, text):
    """Issue 14 item 12: /detokenize decodes as SentencePiece does (the dummy-prefix space that
    encoding adds is not part of the text), with or without the BOS that /tokenize adds."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(server_sp_model))
    for add_special in (True, False):
        ids = post(url, "/tokenize", {"content": text, "add_special": add_special}).json()["tokens"]
        got = post(url, "/detokenize", {"tokens": ids}).json()["content"]
        assert got == sp.decode(ids) == text, (add_special, ids)


def test_embeddings(url):
    import base64

    import numpy as np

    r = post(url, "/v1/embeddings", {"model": "tiny", "input": ["你好", "hello world"]}).json()
    assert r["object"] == "list" and len(r["data"]) == 2 and r["usage"]["prompt_tokens"] > 0
    vecs = [np.array(d["embedding"]) for d in r["data"]]
    assert all(v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-4 for v in vecs)
    b = post(url, "/v1/embeddings", {"input": "你好", "encoding_format": "base64"}).json()
    v = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(v, vecs[0], atol=1e-6)
    ids = post(url, "/tokenize", {"content": "你好"}).json()["tokens"]
    t = post(url, "/v1/embeddings", {"input": ids}).json()
    assert np.allclose(t["data"][0]["embedding"], vecs[0], atol=1e-6)
    assert_error(post(url, "/v1/embeddings", {"input": "x", "dimensions": 3}), 400, param="dimensions")


def test_metrics(url):
    chat(url, max_tokens=3)
    text = httpx.get(url + "/metrics").text
    for name in ('cllama_requests_total{endpoint="/v1/chat/completions",status="200"}',
                 'cllama_completion_tokens_total{model="tiny"}', 'cllama_prompt_tokens_total{model="tiny"}',
                 'cllama_queue_depth{model="tiny"}', 'cllama_time_to_first_token_seconds_count{model="tiny"}',
                 'cllama_generation_tokens_per_second_count{model="tiny"}', 'cllama_requests_running{model="tiny"}'):
        assert name in text, name


def test_web_page_is_served(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/static/app.js" in r.text and "http" not in r.text.replace("http-equiv", "")
    for asset in ("app.js", "markdown.js", "style.css"):
        a = httpx.get(url + "/static/" + asset)
        assert a.status_code == 200 and "cdn" not in a.text.lower()


# --------------------------------------------------------------------------------------------- errors


def test_malformed_json_is_400_not_422(url):
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_error(httpx.post(url + "/v1/chat/completions", content=b"[1,2]", timeout=30,
                            headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(url + "/v1/chat/completions", content=b"", timeout=30), 400)


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny"}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, None),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "array",
                                                                      "minItems": 10**6}}}}, "response_format"),
])
def test_bad_parameters_are_400(url, body, param):
    err = assert_error(post(url, "/v1/chat/completions", body), 400)
    if param is not None:
        assert err["param"] == param, err
    assert "detail" not in err


def test_unknown_model_is_404(url):
    assert_error(post(url, "/v1/chat/completions", {
        "model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404, "model_not_found", "model")
    assert_error(post(url, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model_not_found")
    assert_error(post(url, "/v1/embeddings", {"model": "gpt-4", "input": "x"}), 404, "model_not_found")


def test_context_length_exceeded(url):
    long = "word " * 600
    assert_error(chat(url, long), 400, "context_length_exceeded")
    assert_error(post(url, "/v1/completions", {"prompt": long}), 400, "context_length_exceeded")
    assert_error(chat(url, "short", max_tokens=1000), 400, "context_length_exceeded")
    assert_error(post(url, "/v1/embeddings", {"input": long}), 400, "context_length_exceeded")
    status, body = stream_post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": long}],
                                                              "stream": True})
    assert status == 400 and body[0]["error"]["code"] == "context_length_exceeded"


def test_bad_completion_prompts(url):
    assert_error(post(url, "/v1/completions", {"prompt": [99999]}), 400, param="prompt")
    assert_error(post(url, "/v1/completions", {"prompt": []}), 400)
    assert_error(post(url, "/v1/completions", {"prompt": "x", "suffix": "y"}), 400, param="suffix")
    assert_error(post(url, "/v1/completions", {"prompt": "x", "best_of": 3}), 400, param="best_of")


def test_unknown_route_and_method(url):
    assert_error(httpx.get(url + "/v1/nothing"), 404)
    assert_error(httpx.get(url + "/v1/chat/completions"), 405)


def test_body_size_limit(url):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}
    assert_error(post(url, "/v1/chat/completions", big), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(40):
            yield b"x" * 10_000

    r = httpx.post(url + "/v1/chat/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert_error(r, 413, "request_too_large")


# --------------------------------------------------------------------------------------------- fields


def test_unknown_fields_are_400_naming_the_field(url):
    """Issue 14 item 11: a typo is not silently ignored."""
    err = assert_error(chat(url, temprature=0.2), 400, "unknown_parameter", "temprature")
    assert "temperature" in err["message"]  # did you mean
    assert_error(post(url, "/v1/completions", {"prompt": "x", "max_token": 3}), 400,
                 "unknown_parameter", "max_token")
    assert_error(post(url, "/v1/embeddings", {"input": "x", "encodingformat": "float"}), 400,
                 "unknown_parameter", "encodingformat")
    nested = {"model": "tiny", "messages": [{"role": "user", "content": "x", "contnet": "y"}]}
    assert_error(post(url, "/v1/chat/completions", nested), 400, "unknown_parameter",
                 "messages.0.contnet")
    assert_error(post(url, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "shema": {}}}}),
        400, "unknown_parameter", "response_format.json_schema.shema")
    assert_error(post(url, "/tokenize", {"content": "x", "with_piece": True}), 400, "unknown_parameter")


def test_known_openai_and_llama_cpp_fields_are_accepted(url):
    r = chat(url, max_tokens=2, store=False, metadata={"a": "b"}, service_tier="auto",
             parallel_tool_calls=True, prompt_cache_key="k", cache_prompt=True, id_slot=0,
             mirostat=0, mirostat_tau=5.0, tfs_z=1.0, n_keep=0)
    assert r.status_code == 200, r.text
    # llama.cpp extensions that we implement
    base = {"model": "tiny", "prompt": "Once", "temperature": 0, "logit_bias": NO_EOS}
    plain = post(url, "/v1/completions", {**base, "max_tokens": 5}).json()
    by_n_predict = post(url, "/v1/completions", {k: v for k, v in base.items()} | {"n_predict": 5}).json()
    assert by_n_predict["choices"][0]["text"] == plain["choices"][0]["text"]
    assert by_n_predict["usage"]["completion_tokens"] == 5
    g = post(url, "/v1/completions", {**base, "max_tokens": 20, "grammar": 'root ::= "yes" | "no"'}).json()
    assert g["choices"][0]["text"] in ("yes", "no") and g["choices"][0]["finish_reason"] == "stop"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    j = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                           "json_schema": schema, "max_tokens": 40, "temperature": 0}).json()
    assert isinstance(json.loads(j["choices"][0]["message"]["content"])["a"], int)


@pytest.mark.parametrize("field,value", [("mirostat", 2), ("tfs_z", 0.5), ("dry_multiplier", 0.8),
                                         ("ignore_eos", True), ("n_probs", 3), ("modalities", ["audio"]),
                                         ("lora", [{"id": 0, "scale": 1.0}])])
def test_known_but_unimplemented_fields_say_so(url, field, value):
    err = assert_error(chat(url, **{field: value}), 400, "unsupported_parameter", field)
    assert "not supported" in err["message"]


def test_tools_and_two_constraints_are_refused_with_codes(url):
    # tools work (tests/langchain); OpenAI's deprecated functions do not
    assert_error(chat(url, functions=[{"name": "f", "parameters": {"type": "object"}}]), 400,
                 "unsupported_parameter", "functions")
    assert_error(chat(url, grammar='root ::= "a"', response_format={"type": "json_object"}), 400,
                 "invalid_value")


def test_completions_echo_with_logprobs_scores_the_prompt(url):
    """lm-eval's loglikelihood request (issue 12; values: tests/evaluation/test_lm_eval.py)."""
    tokens = post(url, "/tokenize", {"content": "abc def"}).json()["tokens"]
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": [tokens], "max_tokens": 0, "echo": True,
                                      "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(tokens)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x <= 0 for x in lp["token_logprobs"][1:]) and all(len(t) == 1 for t in lp["top_logprobs"][1:])


# --------------------------------------------------------------------------------------------- /docs


def _undocumented_keys(value, schema: dict, spec: dict, path: str = "") -> list[str]:
    """Keys of ``value`` that the OpenAPI ``schema`` does not declare (following $ref, anyOf, items)."""
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf", []) + schema.get("oneOf", [])
        results = [_undocumented_keys(value, o, spec, path) for o in options
                   if _type_fits(value, o, spec)]
        return min(results, key=len) if results else [f"{path} (no matching type)"]
    missing = []
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is None:
            return [] if schema.get("additionalProperties") is not False else [path]
        for k, v in value.items():
            if k not in props:
                missing.append(f"{path}.{k}")
            else:
                missing += _undocumented_keys(v, props[k], spec, f"{path}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            missing += _undocumented_keys(v, schema["items"], spec, f"{path}[{i}]")
    return missing


def _type_fits(value, schema: dict, spec: dict) -> bool:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    t = schema.get("type")
    kinds = {"object": dict, "array": list, "string": str, "null": type(None), "boolean": bool,
             "integer": int, "number": (int, float)}
    return t is None or isinstance(value, kinds[t])


def test_openapi_documents_every_key_the_server_sends(url):
    """Issue 9 item 7: responses and stream chunks are the protocol models, so /docs is true."""
    spec = httpx.get(url + "/openapi.json").json()

    def response_schema(path: str, media: str = "application/json") -> dict:
        return spec["paths"][path]["post"]["responses"]["200"]["content"][media]["schema"]

    chat_body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                 "logprobs": True, "top_logprobs": 2, "n": 2}
    comp_body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "logprobs": 2, "echo": False}
    checks = [
        (post(url, "/v1/chat/completions", chat_body).json(), response_schema("/v1/chat/completions")),
        (post(url, "/v1/completions", comp_body).json(), response_schema("/v1/completions")),
        (post(url, "/v1/embeddings", {"input": ["a", "b"]}).json(), response_schema("/v1/embeddings")),
        (post(url, "/tokenize", {"content": "a", "with_pieces": True}).json(), response_schema("/tokenize")),
    ]
    for path, body in (("/v1/chat/completions", chat_body), ("/v1/completions", comp_body)):
        status, events = stream_post(url + path, {**body, "stream": True,
                                                   "stream_options": {"include_usage": True}})
        assert status == 200 and events[-1] == "[DONE]"
        checks += [(e, response_schema(path, "text/event-stream")) for e in events[:-1]]
    chat_response = checks[0][0]
    assert chat_response["choices"][0]["message"]["refusal"] is None  # sent, and now documented
    for value, schema in checks:
        assert _undocumented_keys(value, schema, spec) == [], value
    # and the typed models accept what was sent
    from cllama_deploy.engine import schemas

    schemas.ChatCompletion.model_validate(checks[0][0])
    schemas.Completion.model_validate(checks[1][0])
    schemas.EmbeddingResponse.model_validate(checks[2][0])


def test_openapi_lists_the_400_not_fastapis_422(url):
    spec = httpx.get(url + "/openapi.json").json()
    for path, operations in spec["paths"].items():
        for op in operations.values():
            assert "422" not in op["responses"], path
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "400" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]

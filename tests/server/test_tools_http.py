"""Tool calling over HTTP against a live server (uvicorn on 127.0.0.1, the engine tests' tiny GGUF,
1 llama.cpp thread): the official openai client's ``tools=`` with a named ``tool_choice``, LangChain's
``ChatOpenAI.bind_tools`` round trip (call → ToolMessage → answer, streamed deltas), and an LCEL chain.

The model is random, so what it writes means nothing; what is checked is what the server guarantees
whatever the model: a forced call always comes back as ``tool_calls`` whose arguments validate against
the tool's schema, the history of calls and results renders into the prompt, streams carry OpenAI-style
deltas. Requests bias the tokens that close JSON strings, arrays and objects (``"``, ``]``, ``}``): a
random model left alone never ends a string, so a grammar-constrained call would run to ``max_tokens``
(the langchain-tests suites do the same, tests/langchain/test_standard.py); the grammar still decides
which of them may come.
"""

from __future__ import annotations

import json

import pytest

from tests.server import builders_server as bs

CLOSER_BIAS = 12
MAX_TOKENS = 200

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询某个城市现在的天气",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "城市名"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
EVENT = {"type": "function", "function": {
    "name": "create_event", "description": "Put an event in the calendar.",
    "parameters": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 20},
        "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "all_day": {"type": "boolean"},
        "room": {"type": "object", "properties": {"building": {"type": "string"},
                                                  "floor": {"type": "integer"}},
                 "required": ["building", "floor"]},
        "priority": {"enum": [1, 2, 3]}},
        "required": ["title", "attendees", "all_day", "room"]}}}
PING = {"type": "function", "function": {"name": "ping", "description": "Check the service is up.",
                                         "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, ADD, EVENT, PING]

PROMPTS = ["北京今天天气怎么样？", "What is 2 + 40?", "帮我约周五下午和小王、小李开会",
           "Is the service up?", "hello"]


@pytest.fixture(scope="module")
def engine(engine_gguf):
    # 2048, past the tiny model's trained 1024: the tool prompt with four JSON schemas takes ~1300 of
    # this 1000-piece tokenizer's tokens (a random model does not mind the positions)
    eng = bs.load_engine(engine_gguf, model_id="tiny-tools", n_ctx=2048)
    yield eng
    eng.close(5)


@pytest.fixture(scope="module")
def url(engine):
    from cllama_deploy.server.settings import Settings

    srv = bs.make_server(Settings(max_queue=16), engine)
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def closer_bias(engine) -> dict[str, float]:
    """OpenAI ``logit_bias`` (token id strings) raising every token that contains a JSON closer."""
    return {str(i): CLOSER_BIAS for i in range(engine.n_vocab)
            if any(ch in engine.token_piece(i) for ch in (b'"', b"]", b"}"))}


@pytest.fixture(scope="module")
def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def schema_errors(instance, schema: dict) -> list[str]:
    """Why ``instance`` does not validate against ``schema`` (empty: it does): jsonschema when it is
    installed, else a check of the keywords these tests use (type, properties, required,
    additionalProperties, enum, items, maxItems, maxLength)."""
    try:
        import jsonschema
    except ImportError:
        return _hand_check(instance, schema, "$")
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(instance)]


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int,
          "number": (int, float)}


def _hand_check(x, schema: dict, where: str) -> list[str]:
    errs = []
    t = schema.get("type")
    if t is not None:
        ok = isinstance(x, _TYPES[t]) and not (t in ("integer", "number") and isinstance(x, bool))
        if not ok:
            return [f"{where}: {x!r} is not of type {t}"]
    if "enum" in schema and x not in schema["enum"]:
        errs.append(f"{where}: {x!r} is not one of {schema['enum']}")
    if isinstance(x, str) and len(x) > schema.get("maxLength", len(x)):
        errs.append(f"{where}: longer than {schema['maxLength']}")
    if isinstance(x, list):
        if len(x) > schema.get("maxItems", len(x)):
            errs.append(f"{where}: more than {schema['maxItems']} items")
        for i, item in enumerate(x):
            errs += _hand_check(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(x, dict):
        props = schema.get("properties", {})
        errs += [f"{where}: {k!r} is required" for k in schema.get("required", []) if k not in x]
        for k, v in x.items():
            if k in props:
                errs += _hand_check(v, props[k], f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{where}: unexpected key {k!r}")
    return errs


def test_schema_check_rejects_what_it_should():
    """The validator itself can fail (so the test below cannot pass vacuously)."""
    params = EVENT["function"]["parameters"]
    good = {"title": "t", "attendees": [], "all_day": True, "room": {"building": "A", "floor": 1}}
    assert schema_errors(good, params) == []
    for bad in ({**good, "attendees": ["a", "b", "c", "d"]}, {**good, "all_day": "yes"},
                {k: v for k, v in good.items() if k != "room"}, {**good, "priority": 4},
                {**good, "room": {"building": "A", "floor": 1.5}}, {**good, "title": "x" * 21}):
        assert schema_errors(bad, params), bad
    assert schema_errors({"a": 1, "b": 2, "c": 3}, ADD["function"]["parameters"])
    assert schema_errors({"a": True, "b": 2}, ADD["function"]["parameters"])


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t["function"]["name"])
def test_openai_named_tool_choice_always_returns_a_schema_valid_call(client, closer_bias, tool):
    name = tool["function"]["name"]
    schema = tool["function"]["parameters"]
    seen = set()
    for i, prompt in enumerate(PROMPTS):
        # greedy, then sampled: different prompts and seeds make different arguments
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": 100 + i}
        r = client.chat.completions.create(
            model="tiny-tools", messages=[{"role": "user", "content": prompt}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": name}},
            max_tokens=MAX_TOKENS, logit_bias=closer_bias, **sampling)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", (prompt, choice.message.content)
        assert choice.message.content is None
        (call,) = choice.message.tool_calls  # parallel_tool_calls unset: one call here (one object)
        assert call.type == "function" and call.function.name == name
        assert call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        assert schema_errors(args, schema) == [], (prompt, args)
        seen.add(call.function.arguments)
    if schema.get("properties"):
        assert len(seen) > 1, "every request made the same arguments: the sampling did not vary"


def test_openai_required_and_parallel_calls(client, closer_bias):
    """``required`` picks among all tools; ``parallel_tool_calls`` allows a list: every call of
    either names a tool and validates against that tool's schema."""
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for i, parallel in enumerate((False, True, True)):
        r = client.chat.completions.create(
            model="tiny-tools", messages=[{"role": "user", "content": PROMPTS[i]}], tools=TOOLS,
            tool_choice="required", parallel_tool_calls=parallel, max_tokens=MAX_TOKENS,
            logit_bias=closer_bias, temperature=1.0, seed=7 + i)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls
        assert parallel or len(calls) == 1
        for c in calls:
            assert schema_errors(json.loads(c.function.arguments), by_name[c.function.name]) == []
        assert len({c.id for c in calls}) == len(calls)


def test_openai_streamed_tool_call_is_openai_style_deltas(client, closer_bias):
    kw = dict(model="tiny-tools", messages=[{"role": "user", "content": PROMPTS[2]}], tools=TOOLS,
              tool_choice={"type": "function", "function": {"name": "create_event"}},
              max_tokens=MAX_TOKENS, logit_bias=closer_bias, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    deltas, finish, content = [], None, ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert deltas and all(d.index == 0 for d in deltas)
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "create_event"
    assert "".join(d.function.arguments or "" for d in deltas) == full.function.arguments


@pytest.mark.parametrize("params,says", [
    ({"type": "object", "properties": {"xs": {"type": "array", "maxItems": 100000}}}, "maxItems"),
    ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, "unsupported JSON schema"),
    ("not a schema", "JSON schema object"),
])
def test_tool_schemas_the_grammar_cannot_hold_are_400_naming_the_tool(url, params, says):
    import httpx

    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "x"}], "tools": [PING, tool], "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert says in err["message"] and err["param"].startswith("tools"), err


# -- LangChain through the server ------------------------------------------------------------------


def _chat_openai(url, closer_bias, **kw):
    from cllama_deploy.langchain import chat_openai

    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", MAX_TOKENS)
    return chat_openai(url, logit_bias={int(k): v for k, v in closer_bias.items()}, max_retries=0,
                       timeout=120, **kw)


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_langchain_tool_round_trip_through_the_server(url, engine, closer_bias):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from cllama_deploy.engine import requests as rl
    from cllama_deploy.langchain._convert import openai_messages

    mult = tool(multiply)
    llm = _chat_openai(url, closer_bias)
    assert llm.model_name == "tiny-tools"  # chat_openai asked the server's /v1/models
    forced = llm.bind_tools([mult], tool_choice="multiply")
    history = [HumanMessage("What is 6 times 7? Use the tool.")]
    ai = forced.invoke(history)
    assert isinstance(ai, AIMessage) and ai.response_metadata["finish_reason"] == "tool_calls"
    (call,) = ai.tool_calls
    assert call["name"] == "multiply" and set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())
    result = mult.invoke(call)  # a ToolMessage answering this call id
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    assert result.content == str(call["args"]["a"] * call["args"]["b"])
    history += [ai, result]

    final = llm.bind_tools([mult], tool_choice="none").invoke(history)
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert isinstance(final.content, str)
    assert final.response_metadata["finish_reason"] in ("stop", "length")
    # the server rendered the call and its result into the prompt (the same request, in-process)
    body = {"messages": openai_messages(history), "max_tokens": MAX_TOKENS,
            "tools": [convert_to_openai_tool(mult)], "tool_choice": "none"}
    prompt_ids = rl.prepare_chat(engine, body).requests[0].prompt_tokens
    prompt = engine.detokenize(prompt_ids)
    assert f"[tool result] multiply: {result.content}" in prompt
    assert json.dumps({"name": "multiply", "arguments": call["args"]}) in prompt
    assert final.usage_metadata["input_tokens"] == len(prompt_ids)

    # tool_choice auto with the call history: the answer is text or a valid call, never broken JSON
    again = llm.bind_tools([mult]).invoke(history)
    assert not again.invalid_tool_calls
    for c in again.tool_calls:
        assert c["name"] == "multiply" and set(c["args"]) == {"a", "b"}


def test_langchain_streamed_tool_call_chunks(url, closer_bias):
    from langchain_core.messages import AIMessageChunk

    llm = _chat_openai(url, closer_bias).bind_tools([multiply], tool_choice="multiply")
    question = "6 times 7?"
    whole = llm.invoke(question)
    chunks = list(llm.stream(question))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    with_calls = [c for c in chunks if c.tool_call_chunks]
    assert with_calls and with_calls[0].tool_call_chunks[0]["name"] == "multiply"
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == \
        [(c["name"], c["args"]) for c in whole.tool_calls]
    assert merged.response_metadata["finish_reason"] == "tool_calls"
    assert merged.usage_metadata["output_tokens"] > 0  # chat_openai streams usage


def test_lcel_chain_prompt_chat_openai_parser(url, client, closer_bias):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", "你是一个简洁的助手。"),
                                               ("human", "用一句话介绍{city}。")])
    chain = prompt | _chat_openai(url, closer_bias, max_tokens=24) | StrOutputParser()
    out = chain.invoke({"city": "杭州"})
    assert isinstance(out, str)
    # the chain sent exactly the rendered prompt: the openai client with the same messages agrees
    direct = client.chat.completions.create(
        model="tiny-tools", messages=[{"role": "system", "content": "你是一个简洁的助手。"},
                                      {"role": "user", "content": "用一句话介绍杭州。"}],
        max_tokens=24, temperature=0, logit_bias=closer_bias)
    assert out == direct.choices[0].message.content
    assert "".join(chain.stream({"city": "杭州"})) == out
    both = chain.batch([{"city": "杭州"}, {"city": "成都"}])
    assert both[0] == out and isinstance(both[1], str)

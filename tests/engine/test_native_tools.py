"""Native tool templates (engine/tools.py ``native_format``): a chat template that renders tools itself
and shows the Hermes/Qwen ``<tool_call>`` syntax gets the tools and the HF-form history, no tool
prompt, and a grammar for its own call syntax.

The engine runs the tests' tiny random GGUF (tests/conftest.py) converted with :data:`HERMES_TEMPLATE`
as its ``tokenizer.chat_template``. The model is random: what is checked is what holds whatever it
writes (a forced call parses and validates against the tool's schema, ``auto`` text never starts with
the marker), and what the template renders. As in tests/server/test_tools_http.py, requests bias the
tokens that close JSON strings and objects so that a random model ends its arguments.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cllama_deploy import prompts
from cllama_deploy.engine import requests as rl
from cllama_deploy.engine import tools
from cllama_deploy.engine.base import InvalidRequest
from tests.server import builders_server as bs
from tests.server.test_tools_http import ADD, WEATHER, schema_errors

# A small Hermes-style tool template (ChatML turns, tools listed in a <tools> block, calls as
# <tool_call> JSON blocks, results as <tool_response> blocks), written for these tests.
HERMES_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\nFunction signatures within <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nTo call a function, answer with <tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
    "{%- for c in m.tool_calls %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": '"
    " + (c.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A small Llama-3.1-style template: tools in the system turn, a call as the bare object
# {"name", "parameters"} ended by <|eom_id|>, results in an ipython turn
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\nRespond with {\"name\": "
    "function name, \"parameters\": dictionary of argument name and its value}. Functions:\\n' }}"
    "{%- for t in tools %}{{- (t | tojson) + '\\n' }}{%- endfor %}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}"
    "{%- if m.tool_calls | length != 1 %}{{- raise_exception('one tool call per message') }}{%- endif %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + m.tool_calls[0].function.name"
    " + '\", \"parameters\": ' + (m.tool_calls[0].function.arguments | tojson) + '}<|eom_id|>' }}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

TOOLS = [WEATHER, ADD]
MAX_TOKENS = 200
PROMPTS = ["北京今天天气怎么样？", "What is 2 + 40?", "hello"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, engine_sp_model):
    root = tmp_path_factory.mktemp("native_gguf")
    path = root / "hermes.jinja"
    path.write_text(HERMES_TEMPLATE, encoding="utf-8")
    gguf = bs.tiny_gguf(root, engine_sp_model, chat_template=str(path), max_position_embeddings=1024)
    eng = bs.load_engine(gguf, model_id="tiny-native", n_ctx=2048)
    yield eng
    eng.close(5)


@pytest.fixture(scope="module")
def closer_bias(engine) -> dict[str, float]:
    return {str(i): 12 for i in range(engine.n_vocab)
            if any(ch in engine.token_piece(i) for ch in (b'"', b"]", b"}"))}


def prompt_text(engine, body: dict) -> str:
    return engine.detokenize(rl.prepare_chat(engine, body).requests[0].prompt_tokens)


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


# -- detection and parsing (no model) --------------------------------------------------------------


def test_native_format_detects_hermes_and_llama3_templates_only():
    assert tools.native_format(HERMES_TEMPLATE) is tools.HERMES
    assert tools.native_format(LLAMA3_TEMPLATE) is tools.LLAMA3
    # Llama-3.1's own template gives tools a default itself, after reading it: still native
    default = "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    assert tools.native_format(default + LLAMA3_TEMPLATE) is tools.LLAMA3
    for fmt in prompts.FORMATS.values():  # our Alpaca templates know no tools
        assert tools.native_format(fmt.chat_template) is None
    assert tools.native_format(None) is None and tools.native_format("") is None
    # the call syntax without reading tools, tools without a known syntax, tools set by the template
    assert tools.native_format("{{ messages[0].content }}{# tools #}<tool_call></tool_call>") is None
    assert tools.native_format("{% for t in tools %}{{ t | tojson }}{% endfor %}") is None
    assert tools.native_format("{% set tools = [] %}{{ tools }}<tool_call></tool_call>") is None
    assert tools.native_format("{% if tools %}<tool_call></tool_call>{% endif") is None  # no parse


def test_render_chat_passes_tools_only_when_given_and_writes_plain_json():
    t = "{{ 'tools' if tools is defined else 'none' }} {{ messages[0].content | tojson }}"
    msgs = [{"role": "user", "content": "<a> & '北京'"}]
    assert prompts.render_chat(t, msgs) == "none \"<a> & '北京'\""  # not HTML-escaped, not \\u-escaped
    assert prompts.render_chat(t, msgs, tools=[]).startswith("tools ")
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="no tools here"):
        prompts.render_chat("{{ raise_exception('no tools here') }}", msgs)


def _plan(choice="auto", parallel=True, native=tools.HERMES) -> tools.ToolPlan:
    ts = [tools.Tool("get_weather", "", WEATHER["function"]["parameters"]),
          tools.Tool("add", "", ADD["function"]["parameters"])]
    return tools.ToolPlan(ts, choice, parallel=parallel, names=[t.name for t in ts], native=native)


def test_parse_strips_the_markers_and_refuses_anything_else():
    p = _plan()
    one = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    (call,) = tools.parse(one, p)
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    two = one + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    calls = tools.parse(two, p)
    assert [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "北京"}
    tricky = '<tool_call>{"name": "get_weather", "arguments": {"city": "a</tool_call>b"}}</tool_call>'
    assert json.loads(tools.parse(tricky, p)[0]["function"]["arguments"]) == {"city": "a</tool_call>b"}
    for text in ("hello", one[:-3], one + " and more", '<tool_call>\n{"name": "nope", '
                 '"arguments": {}}\n</tool_call>', one.replace('"arguments"', '"parameters"'),
                 '{"name": "add", "arguments": {"a": 1, "b": 2}}'):
        assert tools.parse(text, p) is None, text
    assert tools.parse(one, _plan("none")) is None
    llama = _plan(native=tools.LLAMA3)
    (call,) = tools.parse('{"name": "add", "parameters": {"a": 1, "b": 2}}', llama)
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    assert tools.parse('{"name": "add", "arguments": {"a": 1, "b": 2}}', llama) is None
    assert tools.parse('{"name": "add", "parameters": {"a": 1, "b": 2}} more', llama) is None


def test_stream_splitter_waits_while_the_text_could_be_the_marker():
    s = tools.StreamSplitter(_plan())
    assert s.feed("  <to") == "" and s.feed("ol_call>\n") == ""
    assert s.feed('{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>') == ""
    calls, rest = s.finish()
    assert rest == "" and calls[0]["function"]["name"] == "add"

    s = tools.StreamSplitter(_plan())
    assert s.feed("<t") == "" and s.feed("able>") == "<table>"  # not the marker: text, all of it
    assert s.feed(" x") == " x" and s.finish() == (None, "")

    s = tools.StreamSplitter(_plan())  # cut short inside the marker: what was held is the text
    assert s.feed("<tool") == "" and s.finish() == (None, "<tool")


def test_history_is_written_in_hf_form():
    body = SimpleNamespace(messages=[
        SimpleNamespace(role="user", tool_calls=None),
        SimpleNamespace(role="assistant", tool_calls=[{"id": "call_1", "type": "function", "function": {
            "name": "add", "arguments": '{"a": 1, "b": 2}'}}]),
        SimpleNamespace(role="tool", tool_calls=None, tool_call_id="call_1", name=None)])
    rendered = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": ""},
                {"role": "tool", "content": "3"}]
    out = tools.native_messages(rendered, body)
    assert out[0] == rendered[0]
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}
    assert out[2] == {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "add"}


# -- with the engine ------------------------------------------------------------------------------


def test_the_gguf_template_renders_the_tools_and_no_tool_prompt(engine):
    assert engine.info.chat_template == HERMES_TEMPLATE and engine.info.chat_template_source == "gguf"
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    text = prompt_text(engine, {"messages": msgs, "tools": TOOLS})
    assert "<tools>" in text and "<tool_call>" in text
    for t in TOOLS:
        assert json.dumps(t, ensure_ascii=False) in text
    assert "You can call these tools" not in text and "[tool result]" not in text
    only = prompt_text(engine, {"messages": msgs, "tools": TOOLS, "tool_choice": named("add")})
    assert json.dumps(ADD, ensure_ascii=False) in only and '"get_weather"' not in only
    # tool_choice none: the template gets no tools, the request no grammar
    prep = rl.prepare_chat(engine, {"messages": msgs, "tools": TOOLS, "tool_choice": "none"})
    text = engine.detokenize(prep.requests[0].prompt_tokens)
    assert "<tools>" not in text and text.endswith("<|im_start|>assistant\n")
    assert prep.requests[0].params.grammar is None
    # no tools at all: as before
    assert prompt_text(engine, {"messages": msgs}) == text


def grammar_accepts(engine, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the model write exactly ``text`` (then EOS), one byte
    per token (the byte-fallback vocabulary has a one-byte piece for every byte; the tokenizer would
    add SentencePiece's dummy-prefix space): at each token it must leave that token's logit finite.
    (Applying the sampler only masks; accepting a masked token would abort, so none is accepted.)"""
    import ctypes

    import llama_cpp as lc

    model = engine.model
    one_byte: dict[bytes, int] = {}
    for i in range(model.n_vocab):
        if len(engine.token_piece(i)) == 1:
            one_byte.setdefault(engine.token_piece(i), i)
    tokens = [one_byte[bytes([b])] for b in text.encode("utf-8")]
    g = lc.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    assert g, "invalid grammar"
    data = (lc.llama_token_data * model.n_vocab)()
    try:
        for t in tokens + [model.eos_id]:
            for i in range(model.n_vocab):
                data[i].id, data[i].logit, data[i].p = i, 0.0, 0.0
            arr = lc.llama_token_data_array(data=data, size=model.n_vocab, selected=-1, sorted=False)
            lc.llama_sampler_apply(g, ctypes.byref(arr))
            if data[t].logit == float("-inf"):
                return False
            if t != model.eos_id:
                lc.llama_sampler_accept(g, t)
        return True
    finally:
        lc.llama_sampler_free(g)


def _grammar(engine, **body) -> str:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, **body}
    return rl.prepare_chat(engine, body).requests[0].params.grammar


ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>'
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_the_auto_grammar_allows_text_or_calls_and_no_text_that_starts_like_a_call(engine):
    g = _grammar(engine)
    for ok in ("hello", "<b>hi</b>", "<tool", "<toolbox>", "  hi <tool_call>", ADD_CALL,
               " " + ADD_CALL, ADD_CALL + "\n" + WEATHER_CALL):
        assert grammar_accepts(engine, g, ok), ok
    for bad in ("<tool_call>hello", "  <tool_call>\nhi", ADD_CALL + " and text",
                ADD_CALL.replace('"b": 2.5', '"b": "x"'), ADD_CALL.replace('"a": 1, ', ""),
                ADD_CALL.replace("add", "sub"), ADD_CALL.replace("arguments", "parameters"),
                ADD_CALL.replace("\n</tool_call>", ""), ""):
        assert not grammar_accepts(engine, g, bad), bad


def test_forced_grammars_allow_only_calls_of_the_offered_tools(engine):
    required = _grammar(engine, tool_choice="required")
    assert grammar_accepts(engine, required, WEATHER_CALL + "\n" + ADD_CALL)
    assert not grammar_accepts(engine, required, "hello")
    single = _grammar(engine, tool_choice="required", parallel_tool_calls=False)
    assert grammar_accepts(engine, single, ADD_CALL) and grammar_accepts(engine, single, " " + ADD_CALL)
    assert not grammar_accepts(engine, single, "\n\n" + ADD_CALL)
    assert not grammar_accepts(engine, single, ADD_CALL + "\n" + ADD_CALL)
    only_add = _grammar(engine, tool_choice=named("add"))
    assert grammar_accepts(engine, only_add, ADD_CALL)
    assert not grammar_accepts(engine, only_add, WEATHER_CALL)


def test_the_native_grammars_are_valid_llama_cpp_grammars(engine):
    seen = set()
    for choice in (None, "required", named("get_weather")):
        for parallel in (True, False):
            body = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                    "parallel_tool_calls": parallel}
            if choice is not None:
                body["tool_choice"] = choice
            g = rl.prepare_chat(engine, body).requests[0].params.grammar
            assert "<tool_call>" in g and "You can call" not in g
            assert engine.model.grammar_is_valid(g), g
            seen.add(g)
    assert len(seen) == 6


@pytest.mark.parametrize("choice", ["required", "get_weather", "add"])
def test_a_forced_call_parses_and_validates_whatever_the_model(engine, closer_bias, choice):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    tool_choice = choice if choice == "required" else named(choice)
    for i, prompt in enumerate(PROMPTS):
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": 40 + i}
        r = rl.chat(engine, [{"role": "user", "content": prompt}], tools=TOOLS, tool_choice=tool_choice,
                    parallel_tool_calls=False, max_tokens=MAX_TOKENS, logit_bias=closer_bias, **sampling)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c.message.content
        (call,) = c.message.tool_calls
        assert choice == "required" or call.function.name == choice
        assert schema_errors(json.loads(call.function.arguments), by_name[call.function.name]) == []


def test_parallel_calls_are_several_blocks(engine, closer_bias):
    """(parallel_tool_calls unset) however many blocks the model writes, each is a valid call. EOS
    is raised too (the grammar allows it only after a whole block), or the random model goes on
    writing blocks until max_tokens."""
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    bias = {**closer_bias, str(engine.eos_id): 8}
    counts = []
    for seed in range(4):
        r = rl.chat(engine, [{"role": "user", "content": PROMPTS[seed % 3]}], tools=TOOLS,
                    tool_choice="required", max_tokens=400, logit_bias=bias,
                    temperature=1.0, seed=seed)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls, r.choices[0].message.content
        for call in calls:
            assert schema_errors(json.loads(call.function.arguments), by_name[call.function.name]) == []
        assert len({c.id for c in calls}) == len(calls)
        counts.append(len(calls))
    assert max(counts) > 1, counts  # (these seeds do write several blocks)


def test_auto_text_never_starts_with_the_marker(engine, closer_bias):
    """End to end with tokens starting with ``<`` pushed up: the answer is either calls that validate
    or text that does not begin with ``<tool_call>``."""
    lt = {str(i): 8 for i in range(engine.n_vocab) if engine.token_piece(i).lstrip().startswith(b"<")}
    for seed in range(4):
        r = rl.chat(engine, [{"role": "user", "content": PROMPTS[seed % 3]}], tools=TOOLS,
                    max_tokens=40, logit_bias={**closer_bias, **lt}, temperature=1.0, seed=seed)
        c = r.choices[0]
        if c.finish_reason == "tool_calls":
            for call in c.message.tool_calls:
                schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
                assert schema_errors(json.loads(call.function.arguments),
                                     schema[call.function.name]) == []
        else:
            assert not c.message.content.lstrip().startswith("<tool_call>"), c.message.content


def test_history_round_trip_renders_calls_and_results_through_the_template(engine):
    history = [
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "晴, 25°C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "3"}]
    for choice in ("auto", "none"):
        text = prompt_text(engine, {"messages": history, "tools": TOOLS, "tool_choice": choice})
        assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
                '{"city": "北京"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": '
                '{"a": 1, "b": 2}}\n</tool_call><|im_end|>') in text
        assert "<tool_response>\n晴, 25°C\n</tool_response>" in text
        assert "<tool_response>\n3\n</tool_response>" in text
        assert "[tool result]" not in text
    with pytest.raises(InvalidRequest) as err:
        rl.prepare_chat(engine, {"messages": [history[0], {**history[1], "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]})
    assert err.value.param == "messages"


def test_streamed_native_call_is_openai_style_deltas(engine, closer_bias):
    kw = dict(tools=TOOLS, tool_choice=named("get_weather"), parallel_tool_calls=False,
              max_tokens=MAX_TOKENS, logit_bias=closer_bias, temperature=0)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    full = rl.chat(engine, msgs, **kw).choices[0].message.tool_calls[0]
    deltas, finish, content = [], None, ""
    for chunk in rl.stream_chat(engine, msgs, **kw):
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert deltas and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == full.function.arguments


# -- Llama-3.1 style: a bare {"name", "parameters"} object, one call per answer ------------------


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, engine_gguf):
    path = tmp_path_factory.mktemp("llama3") / "llama3.jinja"
    path.write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    eng = bs.load_engine(engine_gguf, model_id="tiny-llama3", n_ctx=2048, chat_template=str(path))
    yield eng
    eng.close(5)


def test_llama3_template_gets_tools_history_and_its_grammar(llama3, closer_bias):
    assert llama3.info.chat_template_source == "override"
    history = [{"role": "user", "content": "1+2?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    text = prompt_text(llama3, {"messages": history, "tools": TOOLS})
    assert json.dumps(ADD, ensure_ascii=False) in text and "You can call these tools" not in text
    assert '{"name": "add", "parameters": {"a": 1, "b": 2}}<|eom_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n3<|eot_id|>" in text

    call = '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    g = _grammar(llama3)  # parallel_tool_calls unset: still one call (the format has no list)
    for ok in ("hello", "[1]", call):
        assert grammar_accepts(llama3, g, ok), ok
    for bad in ("{hello", call.replace("parameters", "arguments"), call + "\n" + call, call + " ok"):
        assert not grammar_accepts(llama3, g, bad), bad

    r = rl.chat(llama3, [{"role": "user", "content": "1+2?"}], tools=TOOLS, tool_choice=named("add"),
                max_tokens=MAX_TOKENS, logit_bias=closer_bias, temperature=0)
    (c,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and c.function.name == "add"
    assert schema_errors(json.loads(c.function.arguments), ADD["function"]["parameters"]) == []


def test_a_template_raise_exception_is_a_400_naming_messages(llama3):
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    two = [{"role": "user", "content": "x"},
           {"role": "assistant", "tool_calls": [{"id": "c1", **call}, {"id": "c2", **call}]}]
    with pytest.raises(InvalidRequest, match="one tool call per message") as err:
        rl.prepare_chat(llama3, {"messages": two, "tools": TOOLS})
    assert err.value.param == "messages"


# -- through the HTTP server: the openai client and LangChain's ChatOpenAI --------------------------


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_server_round_trip_with_the_native_template(engine, closer_bias):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from openai import OpenAI

    from cllama_deploy.langchain import chat_openai
    from cllama_deploy.server.settings import Settings

    srv = bs.make_server(Settings(max_queue=4), engine)
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="tiny-native", messages=[{"role": "user", "content": PROMPTS[1]}], tools=TOOLS,
            tool_choice=named("add"), parallel_tool_calls=False, max_tokens=MAX_TOKENS,
            logit_bias=closer_bias, temperature=0)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
        assert schema_errors(json.loads(call.function.arguments), ADD["function"]["parameters"]) == []

        mult = tool(multiply)
        llm = chat_openai(srv.url, logit_bias={int(k): v for k, v in closer_bias.items()},
                          max_retries=0, timeout=120, temperature=0, max_tokens=MAX_TOKENS)
        history = [HumanMessage("6 times 7?")]
        ai = llm.bind_tools([mult], tool_choice="multiply", parallel_tool_calls=False).invoke(history)
        (lc_call,) = ai.tool_calls
        assert lc_call["name"] == "multiply" and set(lc_call["args"]) == {"a", "b"}
        result = mult.invoke(lc_call)
        assert isinstance(result, ToolMessage)
        final = llm.bind_tools([mult], tool_choice="none").invoke(history + [ai, result])
        assert not final.tool_calls and isinstance(final.content, str)
        # the server rendered the call and the result with the template: the prompt holds both
        from cllama_deploy.langchain._convert import openai_messages

        prompt = rl.prepare_chat(engine, {"messages": openai_messages(history + [ai, result]),
                                          "tools": TOOLS, "tool_choice": "none"}).requests[0]
        text = engine.detokenize(prompt.prompt_tokens)
        args = json.dumps(lc_call["args"], ensure_ascii=False)
        assert f'<tool_call>\n{{"name": "multiply", "arguments": {args}}}\n</tool_call>' in text
        assert f"<tool_response>\n{result.content}\n</tool_response>" in text
        assert final.usage_metadata["input_tokens"] == len(prompt.prompt_tokens)
    finally:
        srv.stop()


def test_streamed_parallel_blocks_are_one_delta_each(engine, closer_bias):
    kw = dict(tools=TOOLS, tool_choice="required", max_tokens=400, temperature=1.0, seed=0,
              logit_bias={**closer_bias, str(engine.eos_id): 8})
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    full = rl.chat(engine, msgs, **kw).choices[0].message.tool_calls
    assert len(full) > 1  # (this seed writes several blocks, test_parallel_calls_are_several_blocks)
    deltas = [d for chunk in rl.stream_chat(engine, msgs, **kw) for c in chunk.choices
              for d in c.delta.tool_calls or []]
    assert [d.index for d in deltas] == list(range(len(full)))
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(c.function.name, c.function.arguments) for c in full]
    assert len({d.id for d in deltas}) == len(deltas)

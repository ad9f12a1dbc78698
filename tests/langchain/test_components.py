"""Details of the components not covered by the standard suites."""

from __future__ import annotations

from cllama_deploy.langchain import ChatCLlama, CLlamaEmbeddings, CLlamaLLM, shared_engine


def test_token_counts_are_the_models_own(engine_gguf):
    """get_num_tokens counts this model's tokens (LangChain's default would load GPT-2's tokenizer),
    and the components on one file share one engine whether options are given at their defaults
    or left out."""
    path = str(engine_gguf)
    chat, llm = ChatCLlama(model_path=path), CLlamaLLM(model_path=path, n_ctx=0, parallel=4)
    engine = shared_engine(path)
    assert chat.get_engine() is llm.get_engine() is CLlamaEmbeddings(model_path=path).get_engine() is engine
    text = "青溪镇的雾里青 green tea"
    ids = chat.get_token_ids(text)
    assert ids == llm.get_token_ids(text) == engine.tokenize(text, add_bos=False, special=False)
    assert engine.detokenize(ids).removeprefix(" ") == text  # (the tokenizer's dummy prefix space)
    assert chat.get_num_tokens(text) == len(ids) > len(text.split())
    # one prompt through the LLM: its usage counts the same tokens (+ BOS)
    out = llm.generate([text], max_tokens=1)
    assert out.llm_output["token_usage"]["prompt_tokens"] == len(ids) + 1


def _quote_bias(engine) -> dict[int, float]:
    # a random model never closes a JSON string by itself (see test_standard.py)
    return {i: 15.0 for i in range(engine.n_vocab) if b'"' in engine.token_piece(i)}


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_in_process_tool_round_trip_and_streamed_tool_call_chunks(engine_gguf):
    from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    path = str(engine_gguf)
    mult = tool(multiply)
    llm = ChatCLlama(model_path=path, temperature=0, max_tokens=120,
                     logit_bias=_quote_bias(shared_engine(path)))
    forced = llm.bind_tools([mult], tool_choice="multiply")
    history = [HumanMessage("6 times 7?")]
    ai = forced.invoke(history)
    (call,) = ai.tool_calls
    assert call["name"] == "multiply" and isinstance(call["args"]["a"], int) and call["id"]
    assert ai.response_metadata["finish_reason"] == "tool_calls" and ai.content == ""

    chunks = list(forced.stream(history))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    tcc = [tc for c in chunks for tc in c.tool_call_chunks]
    assert tcc and tcc[0]["name"] == "multiply" and all(tc["index"] == 0 for tc in tcc)
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]
    assert merged.usage_metadata["input_tokens"] == ai.usage_metadata["input_tokens"]
    assert merged.response_metadata["finish_reason"] == "tool_calls"

    result = mult.invoke(call)
    assert isinstance(result, ToolMessage) and result.content == str(call["args"]["a"] * call["args"]["b"])
    final = llm.bind_tools([mult], tool_choice="none").invoke(history + [ai, result])
    assert not final.tool_calls and final.response_metadata["finish_reason"] in ("stop", "length")
    # the call and its result were in the prompt: more input tokens than the question alone
    assert final.usage_metadata["input_tokens"] > llm.invoke(history).usage_metadata["input_tokens"] + 10


def test_message_token_counts_are_the_rendered_prompt(engine_gguf):
    """get_num_tokens_from_messages = the prompt a call sends (template, tool prompt), even past the
    context; so trim_messages(token_counter=llm) keeps what fits."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages

    llm = ChatCLlama(model_path=str(engine_gguf), max_tokens=1, temperature=0)
    msgs = [SystemMessage("你是助手。"), HumanMessage("你好"), AIMessage("你好！"), HumanMessage("介绍杭州")]
    n = llm.get_num_tokens_from_messages(msgs)
    assert n == llm.invoke(msgs).usage_metadata["input_tokens"]
    with_tools = llm.get_num_tokens_from_messages(msgs, tools=[multiply])
    assert with_tools == llm.bind_tools([multiply]).invoke(msgs).usage_metadata["input_tokens"] > n
    long = msgs + [HumanMessage("长" * 2000)]  # past the 1024-token context: still counted
    assert llm.get_num_tokens_from_messages(long) > 1024
    kept = trim_messages(long, max_tokens=n, token_counter=llm, strategy="first")
    assert kept == msgs


def test_llm_completion_paths_agree_with_the_request_layer(engine_gguf):
    """CLlamaLLM: invoke, stream, ainvoke, astream, streaming=True and generate() with several prompts
    all give the request layer's completion for the same options; stop strings cut the text."""
    import asyncio

    from langchain_core.callbacks import BaseCallbackHandler

    from cllama_deploy.engine import requests as rl

    path = str(engine_gguf)
    llm = CLlamaLLM(model_path=path, temperature=0, max_tokens=20, logit_bias={2: -100.0})
    engine = llm.get_engine()
    prompts = ["Once upon a time", "北京是"]
    want = [rl.complete(engine, p, temperature=0, max_tokens=20, logit_bias={2: -100.0}).choices[0].text
            for p in prompts]
    assert want[0] != want[1]
    assert [llm.invoke(p) for p in prompts] == want
    assert ["".join(llm.stream(p)) for p in prompts] == want

    async def both():
        return [await llm.ainvoke(p) for p in prompts], ["".join([c async for c in llm.astream(p)])
                                                          for p in prompts]
    assert asyncio.run(both()) == (want, want)

    result = llm.generate(prompts)  # one request for both prompts
    assert [g[0].text for g in result.generations] == want
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == 40 and usage["prompt_tokens"] == sum(
        len(engine.tokenize(p)) for p in prompts)
    assert all(g[0].generation_info["finish_reason"] == "length" for g in result.generations)

    class Tokens(BaseCallbackHandler):
        seen: list = []

        def on_llm_new_token(self, token, **kw):
            self.seen.append(token)

    cb = Tokens()
    streaming = CLlamaLLM(model_path=path, temperature=0, max_tokens=20, logit_bias={2: -100.0},
                          streaming=True)
    assert streaming.invoke(prompts[0], config={"callbacks": [cb]}) == want[0]
    assert "".join(cb.seen) == want[0] and len(cb.seen) > 1

    # a stop string taken from the middle of the greedy text ends it there (and is not included)
    stop = want[0][len(want[0]) // 2:][:3]
    assert stop.strip() and llm.invoke(prompts[0], stop=[stop]) == want[0][:want[0].index(stop)]
    assert "".join(llm.stream(prompts[0], stop=[stop])) == want[0][:want[0].index(stop)]

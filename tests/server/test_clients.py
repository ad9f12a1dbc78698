"""The official openai client (sync and async, streaming and not) and LangChain's ChatOpenAI."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest


@pytest.fixture(scope="module")
def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_models_and_chat(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                       max_completion_tokens=8, temperature=0, seed=3)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_stream_matches_non_stream(client):
    kw = dict(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "写一首诗"}],
              max_tokens=30, temperature=0, logit_bias={"2": -100})
    full = client.chat.completions.create(**kw).choices[0].message.content
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == full and finish == "length" and usage.completion_tokens == 30


def test_openai_completions_and_embeddings(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    # the client asks for base64 by default and decodes it
    e = client.embeddings.create(model="tiny", input=["a", "中文"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 64
    assert abs(np.linalg.norm(e.data[1].embedding) - 1) < 1e-4
    f = client.embeddings.create(model="tiny", input="a", encoding_format="float")
    assert np.allclose(f.data[0].embedding, e.data[0].embedding, atol=1e-6)


def test_openai_errors_map_to_client_exceptions(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a " * 700}])
    assert ei.value.code == "context_length_exceeded"


def test_openai_async_client(url):
    from openai import AsyncOpenAI

    async def main():
        c = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                  temperature=0)
        full = await c.chat.completions.create(**kw)
        parts = []
        async for chunk in await c.chat.completions.create(**kw, stream=True):
            parts.extend(ch.delta.content or "" for ch in chunk.choices)
        many = await asyncio.gather(*[c.completions.create(model="tiny", prompt=f"n{i}", max_tokens=3)
                                      for i in range(4)])
        await c.close()
        return full, "".join(parts), many

    full, streamed, many = asyncio.run(main())
    assert streamed == full.choices[0].message.content
    assert all(m.choices[0].finish_reason in ("stop", "length") for m in many)


def test_langchain_chat_openai(url):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="tiny", temperature=0, max_tokens=10,
                     max_retries=0, timeout=60)
    msgs = [SystemMessage("You are terse."), HumanMessage("你好")]
    out = llm.invoke(msgs)
    assert isinstance(out.content, str)
    streamed = "".join(chunk.content for chunk in llm.stream(msgs))
    assert streamed == out.content
    batch = llm.batch([[HumanMessage("a")], [HumanMessage("b")]])
    assert len(batch) == 2

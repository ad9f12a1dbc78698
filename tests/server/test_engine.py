"""The engine on its own: chat formatting, tokens, generation control, embeddings parity with HF."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cllama_deploy import prompts
from cllama_deploy.engine import (
    ContextLengthExceeded,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)


def generate(engine, prompt_tokens, **params):
    async def main():
        chunks = []
        async for c in engine.generate(GenerationRequest(prompt_tokens, SamplingParams(**params))):
            chunks.append(c)
        return chunks

    return asyncio.run(main())


def test_chat_template_from_gguf_renders_the_training_prompt_with_one_bos(engine, server_sp_model):
    import sentencepiece as spm

    assert engine.info.chat_template == prompts.TEMPLATES["alpaca"]
    assert engine.info.chat_template_source == "gguf"
    assert engine.info.stop == prompts.STOPS["alpaca"]
    tokens = engine.render_chat([{"role": "user", "content": "介绍一下北京"}])
    sp = spm.SentencePieceProcessor(model_file=str(server_sp_model))
    expected = [sp.bos_id()] + sp.encode(prompts.build_prompt("介绍一下北京"))
    assert tokens == expected
    assert tokens.count(engine.bos_id) == 1


def test_multi_turn_and_system_prompt(engine):
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    text = engine.detokenize(engine.render_chat(msgs))
    assert text.lstrip().startswith("SYS") and "q1" in text and "a1" in text
    assert text.endswith("### Response: ") or text.endswith("### Response:")


def test_chat_template_override(tiny_gguf_path, tmp_path):
    from tests.server.builders_server import load_engine

    eng = load_engine(tiny_gguf_path, chat_template="alpaca-2", n_ctx=256)
    try:
        assert eng.info.chat_template_source == "override" and eng.info.stop == ["[INST]"]
        text = eng.detokenize(eng.render_chat([{"role": "user", "content": "hi"}]))
        assert "[INST] <<SYS>>" in text and text.rstrip().endswith("[/INST]")
    finally:
        eng.close(5)
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    eng = load_engine(tiny_gguf_path, chat_template=str(custom), n_ctx=256)
    try:
        tokens = eng.render_chat([{"role": "user", "content": "hi"}])
        assert tokens[0] == eng.bos_id and tokens.count(eng.bos_id) == 1  # BOS added once
        assert eng.detokenize(tokens).strip() == "<<hi>>"
    finally:
        eng.close(5)


def test_greedy_is_deterministic_and_max_tokens_is_exact(engine):
    prompt = engine.tokenize("Once upon a time")
    a = generate(engine, prompt, temperature=0, max_tokens=20, logit_bias={2: -100.0})
    b = generate(engine, prompt, temperature=0, max_tokens=20, logit_bias={2: -100.0})
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    final = a[-1]
    assert final.finish_reason == "length" and final.usage.completion_tokens == 20
    assert sum(len(c.token_ids) for c in a) == 20
    text = "".join(c.text for c in a)
    assert text == engine.detokenize([t for c in a for t in c.token_ids])


def test_eos_ends_with_stop(engine):
    chunks = generate(engine, engine.tokenize("x"), temperature=0, max_tokens=50, logit_bias={2: 100.0})
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 0


def test_generation_fills_the_context_and_stops_with_length(engine):
    prompt = engine.tokenize("fill " * 20)
    chunks = generate(engine, prompt, temperature=0, logit_bias={2: -100.0})
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == engine.n_ctx - len(prompt)


def test_request_validation(engine):
    async def submit(req):
        engine.generate(req)

    with pytest.raises(ContextLengthExceeded):
        asyncio.run(submit(GenerationRequest(list(range(3, 600)), SamplingParams())))
    with pytest.raises(InvalidRequest):
        asyncio.run(submit(GenerationRequest([1, 10**6], SamplingParams())))
    with pytest.raises(InvalidRequest):
        asyncio.run(submit(GenerationRequest([], SamplingParams())))
    with pytest.raises(InvalidRequest):
        asyncio.run(submit(GenerationRequest([1, 5], SamplingParams(grammar="root ::= ("))))


def test_embeddings_are_mean_pooled_last_hidden_states(engine, tiny_gguf_path):
    """One vector per input: the mean of transformers' last hidden states, L2-normalized."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_gguf_path.parent / "hf-0"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).model.eval()
    texts = ["你好，世界", "The quick brown fox"]
    ids = [engine.tokenize(t, special=False) for t in texts]
    out = asyncio.run(engine.embed(ids))
    assert out.prompt_tokens == sum(len(i) for i in ids)
    for tok, vec in zip(ids, out.vectors):
        with torch.no_grad():
            h = model(torch.tensor([tok])).last_hidden_state[0].mean(0).numpy()
        ref = h / np.linalg.norm(h)
        assert np.allclose(vec, ref, atol=1e-3), np.abs(np.array(vec) - ref).max()
        assert float(np.dot(vec, ref)) > 0.99999

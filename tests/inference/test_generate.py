"""`cllama-deploy generate`: one prediction per input, in input order, equal to what the server answers to the
same request under greedy decoding (chat requests with --with-prompt, completions without), although generate
ran them batched; the HF model with its adapter batched (left-padded) equals it one prompt at a time; the input
and output formats; errors."""

from __future__ import annotations

import json

import httpx
import pytest

from cllama_deploy.cli import main
from cllama_deploy.inference.backends import request_body
from cllama_deploy.inference.generate import Item, prompt_of, read_items
from cllama_deploy.inference.options import Sampling
from tests.server import builders_server as bs

INSTRUCTIONS = ["Hello there", "介绍一下北京", "Write a poem about the sea", "What is 2 plus 2?",
                "Tell me a story", "天气怎么样？", "List three colours"]
GREEDY = ["--temperature", "0", "--max-tokens", "10", "--threads", "1", "--kv-cache-type", "f32", "-q"]


@pytest.fixture(scope="module")
def server(tiny):
    """The server on the same GGUF: one slot, no prefix cache, so every request is answered alone."""
    from cllama_deploy.server.settings import Settings

    engine = bs.load_engine(tiny.gguf, n_ctx=1024, parallel=1, prefix_cache=False, n_threads=1,
                            kv_cache_type="f32")
    srv = bs.make_server(Settings(), engine)
    yield srv
    srv.stop()
    engine.close(10)


def _ask(server, kind: str, body: dict) -> str:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    r = httpx.post(server.url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"]["content"] if kind == "chat" else choice["text"]


@pytest.mark.parametrize("with_prompt", [True, False], ids=["with-prompt", "raw-text"])
def test_predictions_equal_the_servers_answers(tiny, server, tmp_path, capsys, with_prompt):
    data = tmp_path / "instructions.txt"
    data.write_text("\n".join(INSTRUCTIONS[:3] + [""] + INSTRUCTIONS[3:]) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "predictions.json"
    argv = ["generate", str(tiny.gguf), "--data-file", str(data), "--predictions", str(out), "--parallel", "3",
            "--n-ctx", "1024", *GREEDY] + (["--with-prompt"] if with_prompt else [])
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert f"{len(INSTRUCTIONS)} predictions from tiny-F32 (gguf) -> {out}" in summary
    predictions = json.loads(out.read_text(encoding="utf-8"))
    assert [p["Input"] for p in predictions] == INSTRUCTIONS  # one per input (the empty line is none), in order
    sampling = Sampling(temperature=0.0, max_tokens=10)
    for text, p in zip(INSTRUCTIONS, predictions):
        kind, body = request_body(prompt_of(Item(0, text), with_prompt), sampling)
        assert kind == ("chat" if with_prompt else "completion")
        assert p["Output"] == _ask(server, kind, body), text
    assert len({p["Output"] for p in predictions}) > 1


def test_jsonl_in_and_out_with_inputs_and_a_system_message(tiny, server, tmp_path):
    records = [{"instruction": "Translate into English", "input": "你好，世界"}, {"instruction": "Say hi"},
               {"instruction": "Summarize", "input": "The sea is large and blue."}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    assert main(["generate", str(tiny.gguf), "--data-file", str(data), "--predictions", str(out), "--with-prompt",
                 "--system", "Answer briefly.", "--n-ctx", "1024", *GREEDY]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(x["instruction"], x["input"]) for x in lines] == [(r["instruction"], r.get("input", "")) for r in records]
    for r, x in zip(records, lines):
        item = Item(0, r["instruction"], r.get("input", ""))
        messages = prompt_of(item, True, "Answer briefly.")
        assert messages[0] == {"role": "system", "content": "Answer briefly."}
        assert messages[1]["content"] == (f"{r['instruction']}\n{r['input']}" if "input" in r else r["instruction"])
        kind, body = request_body(messages, Sampling(temperature=0.0, max_tokens=10))
        assert x["output"] == _ask(server, kind, body)


def test_hf_model_with_adapter_batched_equals_one_prompt_at_a_time(tiny, tmp_path):
    """Left-padded batches of 3 (sorted by length) give what each prompt gives alone through transformers."""
    import torch

    from cllama_deploy.inference.backends import HFBackend
    from cllama_deploy.inference.options import InferenceOptions

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": t} for t in INSTRUCTIONS], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "hf.json"
    assert main(["generate", "--base", str(tiny.base), "--lora", str(tiny.lora), "--data-file", str(data),
                 "--predictions", str(out), "--with-prompt", "--batch-size", "3", "--n-ctx", "1024", *GREEDY]) == 0
    predictions = json.loads(out.read_text(encoding="utf-8"))
    opts = InferenceOptions(model=tiny.base, lora=[tiny.lora], threads=1, n_ctx=1024)
    opts._check_inference_options()
    hf = HFBackend(opts)
    for text, p in zip(INSTRUCTIONS, predictions):
        ids = torch.tensor([hf.ids(prompt_of(Item(0, text), True))])
        with torch.inference_mode():
            row = hf.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=10, repetition_penalty=1.1, eos_token_id=hf.eos_id,
                                    pad_token_id=hf.pad_id)[0, ids.shape[1]:].tolist()
        assert p["Output"] == hf._reply(row)[1], text


def test_read_items_formats_and_errors(tmp_path):
    from cllama_deploy.errors import InputError

    txt = tmp_path / "a.txt"
    txt.write_text("  first  \n\nsecond\n", encoding="utf-8")
    assert [(i.line, i.text) for i in read_items(txt)] == [(1, "first"), (3, "second")]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(InputError, match="line 2: not JSON"):
        read_items(bad)
    missing = tmp_path / "c.json"
    missing.write_text(json.dumps([{"instruction": "ok"}, {"output": "x"}]), encoding="utf-8")
    with pytest.raises(InputError, match="record 2: no 'instruction'"):
        read_items(missing)
    empty = tmp_path / "d.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="no instructions"):
        read_items(empty)


def test_a_prompt_longer_than_the_context_is_named_and_nothing_is_written(tiny, tmp_path, capsys):
    data = tmp_path / "long.txt"
    data.write_text("short\n" + "hello " * 600 + "\n", encoding="utf-8")
    out = tmp_path / "p.json"
    assert main(["generate", str(tiny.gguf), "--data-file", str(data), "--predictions", str(out), "--n-ctx", "256",
                 *GREEDY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2: the prompt has" in err[0] and "256-token context" in err[0], err
    assert not out.exists()


def test_a_long_prompt_gets_a_shorter_reply_limit(tiny, tmp_path, capsys):
    data = tmp_path / "long.txt"
    data.write_text("hello " * 40 + "\n", encoding="utf-8")  # about 160 tokens
    out = tmp_path / "p.json"
    assert main(["generate", str(tiny.gguf), "--data-file", str(data), "--predictions", str(out), "--n-ctx", "256",
                 "--max-tokens", "400", "--temperature", "0", "--threads", "1", "-q"]) == 0
    assert "1 prompt(s) left less than --max-tokens in the context" in capsys.readouterr().out
    assert len(json.loads(out.read_text(encoding="utf-8"))) == 1


@pytest.mark.parametrize("extra, message", [
    (["--system", "x"], "--system goes into the chat template: give --with-prompt too"),
    (["--parallel", "0"], "--parallel must be between 1 and 64"),
])
def test_option_errors(tiny, tmp_path, capsys, extra, message):
    data = tmp_path / "d.txt"
    data.write_text("hi\n", encoding="utf-8")
    assert main(["generate", str(tiny.gguf), "--data-file", str(data), *extra]) == 2
    assert message in capsys.readouterr().err

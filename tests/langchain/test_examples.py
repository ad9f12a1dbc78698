"""examples/langchain end to end on the tiny random GGUF: document QA (stuff, refine) and summarization
(map-reduce with and without collapsing, refine) over the shipped Chinese sample text. The answers are
noise; what is checked is the pipeline: the split, retrieval, the number of model calls each chain
makes, and that the scripts run as scripts (one subprocess run) and fail with one line on bad input.

Most runs call the scripts' ``main()`` in this process: the model then loads once for all of them
(shared engine) instead of once per run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "langchain"
SAMPLE = EXAMPLES / "qingxi_town.txt"
# small chunks: Chinese falls back to byte tokens on the tiny tokenizer (up to 3 per character)
CHUNK = ["--chunk-size", "120", "--chunk-overlap", "20"]
FAST = ["--max-tokens", "12", "--temperature", "0"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shared():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _shared
        yield _shared
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def n_chunks(shared) -> int:
    return len(shared.split_text(SAMPLE.read_text(encoding="utf-8"), 120, 20))


def _run(name: str, args: list[str], capsys) -> str:
    _load(name).main(args)
    out = capsys.readouterr().out
    print(out)  # shown on failure
    return out


def _calls(out: str) -> list[int]:
    return [int(n) for n in re.findall(r"^LLM calls: (\d+)$", out, flags=re.M)]


def test_chinese_split_keeps_every_sentence_and_the_size(shared):
    text = SAMPLE.read_text(encoding="utf-8")
    docs = shared.split_text(text, 120, 20)
    assert len(docs) > 5
    assert all(0 < len(d.page_content) <= 120 for d in docs)
    # sentence marks stay at the end of the piece they close, and no sentence is lost
    for sentence in re.findall(r"[^。\n]+。", text):
        assert any(sentence.strip() in d.page_content for d in docs), sentence
    assert not any(d.page_content.startswith(("。", "，")) for d in docs)


@pytest.mark.parametrize("chain,k", [("stuff", 2), ("refine", 3)])
def test_doc_qa(engine_gguf, capsys, n_chunks, chain, k):
    questions = ["雾里青是在什么时候采摘的？", "落星桥有多长？"]
    out = _run("doc_qa", ["--model", str(engine_gguf), "--file", str(SAMPLE), *CHUNK, *FAST,
                          "--chain-type", chain, "--k", str(k),
                          *[a for q in questions for a in ("--question", q)]], capsys)
    assert f"split {SAMPLE.name} into {n_chunks} chunks" in out
    assert f"embedded {n_chunks} chunks" in out
    retrieved = re.findall(r"^retrieved chunks: (.*)$", out, flags=re.M)
    assert len(retrieved) == len(questions)
    for line in retrieved:
        ids = [int(x) for x in re.findall(r"#(\d+)", line)]
        assert len(ids) == k == len(set(ids)) and all(0 <= i < n_chunks for i in ids)
    assert len(re.findall(r"^回答：", out, flags=re.M)) == len(questions)
    # stuff: one call per question; refine: one per retrieved chunk
    assert _calls(out) == [1 if chain == "stuff" else k] * len(questions)
    assert out.count("[refine ") == (0 if chain == "stuff" else (k - 1) * len(questions))


@pytest.mark.parametrize("chain", ["map_reduce", "refine"])
def test_summarize(engine_gguf, capsys, n_chunks, chain):
    out = _run("summarize", ["--model", str(engine_gguf), "--file", str(SAMPLE), *CHUNK, *FAST,
                             "--chain-type", chain], capsys)
    assert f"split {SAMPLE.name} into {n_chunks} chunks" in out
    assert len(re.findall(r"^摘要：", out, flags=re.M)) == 1
    if chain == "map_reduce":  # one call per chunk, then one to combine them
        assert len(re.findall(r"^\[map \d+/\d+\]", out, flags=re.M)) == n_chunks
        assert "[collapse" not in out and "[reduce]" in out
        assert _calls(out) == [n_chunks + 1]
    else:  # one call per chunk
        assert out.count("[refine ") == n_chunks - 1
        assert _calls(out) == [n_chunks]


def test_summarize_map_reduce_collapses_summaries_too_long_to_combine(engine_gguf, capsys, n_chunks):
    out = _run("summarize", ["--model", str(engine_gguf), "--file", str(SAMPLE), *CHUNK, *FAST,
                             "--chain-type", "map_reduce", "--token-max", "60"], capsys)
    rounds = [(int(g), int(s)) for g, s in
              re.findall(r"^\[collapse round \d+\] (\d+) groups -> (\d+) summaries$", out, flags=re.M)]
    assert rounds and all(g == s for g, s in rounds)
    assert [g for g, _ in rounds] == sorted((g for g, _ in rounds), reverse=True)
    # each chunk, each group of each collapse round, and the final combine
    assert _calls(out) == [n_chunks + sum(g for g, _ in rounds) + 1]


def test_examples_run_as_scripts_and_fail_with_one_line(engine_gguf, tmp_path):
    env = {**os.environ, "CLLAMA_N_THREADS": "1"}
    run = subprocess.run([sys.executable, str(EXAMPLES / "doc_qa.py"), "--model", str(engine_gguf),
                          "--file", str(SAMPLE), *CHUNK, *FAST, "--chain-type", "refine",
                          "--question", "周师傅今年多少岁？"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^回答：", run.stdout, flags=re.M) and "LLM calls: 2" in run.stdout
    # a chunk too long for the context: one line, exit 2
    bad = subprocess.run([sys.executable, str(EXAMPLES / "summarize.py"), "--model", str(engine_gguf),
                          "--file", str(SAMPLE), "--chunk-size", "2000", "--chunk-overlap", "0",
                          "--chain-type", "stuff", *FAST],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr[-3000:]
    lines = [x for x in bad.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "context" in lines[0], lines
    missing = subprocess.run([sys.executable, str(EXAMPLES / "summarize.py"), "--model",
                              str(tmp_path / "none.gguf"), "--file", str(SAMPLE)],
                             capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr

"""`cllama-deploy quickstart --fast` end to end, through the CLI's function: the bars asserted from its
report.json, every GGUF exists and loads, the report has its fields, the serve line is copyable.

No timing is asserted here (the wall time goes to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from cllama_deploy.cli import main
from cllama_deploy.quickstart.recipe import FAST_BARS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "demo-out"
    assert main(["quickstart", "--fast", "--out", str(out), "--threads", "2"]) == 0
    return out, json.loads((out / "report.json").read_text(encoding="utf-8"))


def _row(report: dict, key: str) -> dict:
    return next(r for r in report["models"] if r["key"] == key)


def test_fast_run_learns_the_task(fast_run):
    _, report = fast_run
    hf = _row(report, "hf")
    assert hf["questions"] == report["task"]["questions"] > 0
    assert hf["exact_match"] >= FAST_BARS["hf_exact_match"], hf["wrong_examples"]
    for q in ("F16", "Q8_0"):
        row = _row(report, q)
        assert 100 * (hf["exact_match"] - row["exact_match"]) <= FAST_BARS["max_loss_points"][q], row
        assert row["loss_points"] == pytest.approx(100 * (hf["exact_match"] - row["exact_match"]), abs=0.01)
    q4 = _row(report, "Q4_K_M")
    assert q4["exact_match"] >= FAST_BARS["q4_exact_match"], q4["wrong_examples"]
    assert report["bars"]["Q4_K_M_loss_points"]["reported"] == q4["loss_points"]


def test_report_fields(fast_run):
    out, report = fast_run
    for key in ("task", "perplexity", "models", "bars", "all_bars_met", "recipe", "base_model", "server", "machine",
                "seconds", "cpu_seconds", "steps"):
        assert key in report, key
    assert [r["key"] for r in report["models"]] == ["hf", "F16", "Q8_0", "Q4_K_M"]
    for r in report["models"]:
        for key in ("exact_match", "correct", "questions", "perplexity", "perplexity_stderr", "size_bytes",
                    "generation_tokens_per_second", "loss_points", "wrong_examples"):
            assert key in r, (r["model"], key)
        assert r["perplexity"] > 1 and r["size_bytes"] > 0 and r["generation_tokens_per_second"] > 0
    assert report["recipe"]["name"] == "fast"
    assert [s["name"] for s in report["steps"]] == ["data", "tokenizers", "base", "pt", "sft", "deploy", "hf",
                                                    "serve", "report"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| GGUF Q4_K_M |" in md and "exact match" in md


def test_every_gguf_exists_and_loads(fast_run):
    import llama_cpp

    out, report = fast_run
    files = sorted((out / "gguf").glob("*.gguf"))
    assert {f.name for f in files} == {f"quickstart-{q}.gguf" for q in ("F16", "Q8_0", "Q4_K_M")}
    for f in files:
        assert f.stat().st_size == _row(report, f.stem.split("-", 1)[1])["size_bytes"]
        llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, n_threads=1, verbose=False)
        try:
            assert llm.n_vocab() == report["steps"][1]["details"]["padded_pieces"]
        finally:
            llm.close()


def test_outputs_a_user_goes_on_with(fast_run):
    out, report = fast_run
    marker = json.loads((out / "quickstart.json").read_text(encoding="utf-8"))
    assert marker["status"] == "done"
    for sub in ("tokenizer/merged-pad/tokenizer.model", "base/config.json", "pt/pt_lora_model",
                "sft/sft_lora_model", "data/held_out_questions.jsonl"):
        assert (out / sub).exists(), sub
    serve = shlex.split(marker["serve"])
    assert serve[:2] == ["cllama-deploy", "serve"] and ".." not in Path(serve[2]).parts
    assert Path(serve[2]).resolve() == (out / "gguf" / "quickstart-Q4_K_M.gguf").resolve()
    assert serve[serve.index("--parallel") + 1] == "8"
    assert "../" not in report["server"]["command"] and "--parallel 8" in report["server"]["command"]

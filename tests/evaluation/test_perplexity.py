"""`eval ppl`: llama.cpp's perplexity method, the same on the GGUF and the HF side (with adapters)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cllama_deploy.cli import main
from cllama_deploy.evaluation.perplexity import PplConfig, perplexity, perplexity_of_text, tokens_digest, windows
from cllama_deploy.evaluation.stats import MeanStat
from tests.evaluation import builders_eval as be

CTX = 64


def _sp_tokens(model_dir, text):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(text)


def test_gguf_perplexity_equals_an_independent_transformers_computation(ev_models, ev_text):
    text = ev_text.read_text(encoding="utf-8")
    tokens = _sp_tokens(ev_models.base, text)
    want, count = be.reference_perplexity(ev_models.base, tokens, CTX, bos_id=1)
    got = perplexity(PplConfig(model=ev_models.base_gguf, text=ev_text, ctx=CTX, show_progress=False))
    assert got.tokens_sha256 == tokens_digest(tokens), "llama.cpp tokenized the text unlike SentencePiece"
    assert got.tokens_scored == count == (len(tokens) // CTX) * (CTX - 1 - CTX // 2)
    assert abs(got.ppl / want - 1) < 1e-3, (got.ppl, want)


@pytest.mark.parametrize("adapted", [False, True], ids=["base", "with_lora"])
def test_hf_and_its_f32_gguf_give_the_same_perplexity(adapted, ev_models, ev_text):
    if adapted:
        hf = PplConfig(model=ev_models.base, lora=[ev_models.lora], text=ev_text, ctx=CTX, show_progress=False)
        gguf = PplConfig(model=ev_models.adapted_gguf, text=ev_text, ctx=CTX, show_progress=False)
    else:
        hf = PplConfig(model=ev_models.base, text=ev_text, ctx=CTX, show_progress=False)
        gguf = PplConfig(model=ev_models.base_gguf, text=ev_text, ctx=CTX, show_progress=False)
    a, b = perplexity(hf), perplexity(gguf)
    assert (a.backend, b.backend) == ("hf", "gguf")
    assert a.tokens_sha256 == b.tokens_sha256 and a.tokens_scored == b.tokens_scored
    assert abs(a.ppl / b.ppl - 1) < 5e-3, (a.ppl, b.ppl)
    assert abs(a.ppl_stderr / b.ppl_stderr - 1) < 5e-2


def test_the_adapter_changes_the_perplexity(ev_models, ev_text):
    # guards the test above against an adapter that is silently not applied
    base = perplexity(PplConfig(model=ev_models.base, text=ev_text, ctx=CTX, show_progress=False))
    adapted = perplexity(PplConfig(model=ev_models.base, lora=[ev_models.lora], text=ev_text, ctx=CTX,
                                   show_progress=False))
    assert abs(adapted.ppl / base.ppl - 1) > 0.01, (base.ppl, adapted.ppl)


def test_windows_are_llama_cpp_s():
    tokens = list(range(100, 100 + 10 * 16 + 5))
    w = windows(tokens, 16, None, bos_id=1, add_bos=True)
    assert len(w) == 10  # the 5 tokens left over are dropped
    assert all(len(x) == 16 and x[0] == 1 for x in w)
    assert w[3][1:] == tokens[3 * 16 + 1:4 * 16]  # non-overlapping, first token replaced
    assert len(windows(tokens, 16, 4, 1, True)) == 4
    assert windows(tokens, 16, None, 1, add_bos=False)[2][0] == tokens[32]
    from cllama_deploy.errors import InputError

    with pytest.raises(InputError, match="at least 64"):
        windows(tokens[:63], 32, None, 1, True)


def test_uncertainty_is_llama_cpp_s_formula():
    rng = np.random.default_rng(0)
    x = rng.exponential(2.0, 1000)
    s = MeanStat()
    s.add(x[:300])
    s.add(x[300:])
    assert math.isclose(s.mean, x.mean(), rel_tol=1e-12)
    # sqrt((E[x²] - E[x]²) / (n - 1)) == the sample standard deviation / sqrt(n)
    assert math.isclose(s.stderr, x.std(ddof=1) / math.sqrt(len(x)), rel_tol=1e-9)


def test_in_process_helper_matches_the_file_version(ev_models, ev_text):
    a = perplexity_of_text(ev_models.base_gguf, ev_text.read_text(encoding="utf-8"), ctx=CTX, chunks=3)
    b = perplexity(PplConfig(model=ev_models.base_gguf, text=ev_text, ctx=CTX, chunks=3, show_progress=False))
    assert a.chunks == b.chunks == 3 and a.ppl == b.ppl and a.tokens_scored == 3 * (CTX - 1 - CTX // 2)


def test_cli_writes_json(tmp_path, ev_models, ev_text, capsys):
    out = tmp_path / "ppl.json"
    rc = main(["eval", "ppl", str(ev_models.base_gguf), "--text", str(ev_text), "--ctx", str(CTX), "--chunks", "4",
               "--json", str(out), "-q"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"ppl", "ppl_stderr", "tokens_scored", "ctx"} <= set(report)
    assert report["ctx"] == CTX and report["chunks"] == 4 and report["tokens_scored"] == 4 * (CTX - 1 - CTX // 2)
    assert f"PPL = {report['ppl']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--text", "missing.txt"], "--text missing.txt: no such file"),
    (["--ctx", "4"], "--ctx must be >= 8"),
    (["--ctx", "4096"], "needs at least 8192"),
    (["--lora", "."], "--lora applies to HF models"),
    (["--chunks", "0"], "--chunks must be >= 1"),
])
def test_user_errors_are_one_line_exit_2(args, message, ev_models, ev_text, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "ppl", str(ev_models.base_gguf), "-q"]
    if "--text" not in args:
        argv += ["--text", str(ev_text)]
    assert main(argv + args) == 2
    be.assert_one_line_error(capsys, message)


def test_not_a_model_is_a_user_error(tmp_path, ev_text, capsys):
    (tmp_path / "x.bin").write_bytes(b"nope")
    assert main(["eval", "ppl", str(tmp_path / "x.bin"), "--text", str(ev_text)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert main(["eval", "ppl", str(tmp_path), "--text", str(ev_text)]) == 2
    assert "without config.json" in capsys.readouterr().err

"""`cllama-deploy merge` end to end, and its exit-2 errors (one line, no traceback)."""

from __future__ import annotations

import json
import shutil

import numpy as np

from cllama_deploy.cli import main
from tests.merge.builders_lora import lora_pair, write_adapter


def test_merge_cli_two_adapters(plus_case, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code = main(["merge", "--base", str(plus_case.base), "--lora", str(plus_case.pt), "--lora", str(plus_case.sft),
                 "--out", str(out), "--shard-size", "100KB"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "merged 2 adapter(s)" in err and "vocab 556" in err
    assert "tokenizer: 556 tokens (555 SentencePiece pieces + 1 added)" in err
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 556
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape == (556, 64)
    with torch.no_grad():
        assert np.isfinite(model(torch.tensor([[1, 2, 555]])).logits.numpy()).all()


def _run_error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_errors(mha_case, plus_case, tmp_path, capsys):
    base, lora, out = str(mha_case.base), str(mha_case.lora), str(tmp_path / "o")
    assert "--dtype" in _run_error(["merge", "--base", base, "--lora", lora, "--out", out, "--dtype", "fp8"], capsys)
    assert "--base" in _run_error(["merge", "--base", str(tmp_path / "none"), "--lora", lora, "--out", out], capsys)
    assert "--out" in _run_error(["merge", "--base", base, "--lora", lora, "--out", base], capsys)
    dora = write_adapter(tmp_path / "dora", lora_pair("model.layers.0.self_attn.q_proj", 4, 64, 64), use_dora=True)
    assert "DoRA" in _run_error(["merge", "--base", base, "--lora", str(dora), "--out", out], capsys)
    # the SFT adapter's 556-token tokenizer against the base's 512 rows, when the PT adapter is left out
    head = write_adapter(tmp_path / "head", lora_pair("lm_head", 4, 64, 556))
    err = _run_error(["merge", "--base", str(plus_case.base), "--lora", str(head), "--out", out], capsys)
    assert "pass the adapter that resized the vocabulary" in err
    assert not (tmp_path / "o").exists()


def test_out_with_other_files_is_kept_unless_forced(mha_case, tmp_path, capsys):
    """Issue 14 item 2: --out is replaced as a whole, so a folder holding anything merge did not write
    is refused (a user's notes, another model), an earlier merge output is replaced, --force replaces any."""
    base, lora = str(mha_case.base), str(mha_case.lora)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    err = _run_error(["merge", "--base", base, "--lora", lora, "--out", str(out)], capsys)
    assert f"--out {out} holds files that merge did not write (notes.txt)" in err and "--force" in err
    assert (out / "notes.txt").read_text() == "my notes"
    # another model's directory: only names merge writes too, but not a merge output
    other = shutil.copytree(mha_case.base, tmp_path / "other_model")
    err = _run_error(["merge", "--base", base, "--lora", lora, "--out", str(other)], capsys)
    assert "(no cllama_merge.json)" in err
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in mha_case.base.iterdir())
    # an earlier merge output is replaced; --force replaces anything
    assert main(["merge", "--base", base, "--lora", lora, "--out", str(tmp_path / "m"), "-q"]) == 0
    assert main(["merge", "--base", base, "--lora", lora, "--out", str(tmp_path / "m"), "-q"]) == 0
    assert main(["merge", "--base", base, "--lora", lora, "--out", str(out), "--force", "-q"]) == 0
    assert not (out / "notes.txt").exists() and (out / "cllama_merge.json").is_file()
    capsys.readouterr()


def test_tokenizer_merge_uses_the_same_check(lora_sp_model, tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    err = _run_error(["tokenizer", "merge", "--base", str(lora_sp_model), "--add", str(lora_sp_model),
                      "--out", str(out)], capsys)
    assert f"--out {out} holds files that tokenizer merge did not write (notes.txt)" in err
    assert (out / "notes.txt").exists()

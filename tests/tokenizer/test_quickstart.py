"""`cllama-deploy quickstart`: the embedded default end to end on generated text."""

from __future__ import annotations

import json

import pytest

from cllama_deploy.cli import main
from cllama_deploy.errors import ConfigError
from cllama_deploy.quickstart.run import QuickstartConfig
from cllama_deploy.tokenizer.spm import processor


def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["quickstart", "--out", str(out), "--zh-lines", "1500", "--en-lines", "1200"]) == 0
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["hf_parity"]["checked"] and summary["hf_parity"]["mismatches"] == 0
    assert summary["ratio_zh"] > 1.2
    base = processor(out / "base" / "tokenizer.model")
    merged = processor(out / "merged" / "tokenizer.model")
    assert merged.get_piece_size() == base.get_piece_size() + summary["added_pieces"]
    assert processor(out / "merged-pad" / "tokenizer.model").get_piece_size() == merged.get_piece_size() + 1
    assert (out / "merged" / "tokenizer_config.json").is_file() and (out / "stats.json").is_file()
    printed = capsys.readouterr().out
    assert "added" in printed and "AutoTokenizer = SentencePiece" in printed
    # a re-run replaces its own output
    assert main(["quickstart", "--out", str(out), "--zh-lines", "1500", "--en-lines", "1200"]) == 0


def test_quickstart_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by quickstart"):
        QuickstartConfig(out=tmp_path)

"""`tokenizer stats`: tokens per character / Han character and the ratio A/B."""

from __future__ import annotations

import gzip
import json

import pytest

from cllama_deploy.cli import main
from cllama_deploy.errors import ConfigError, InputError
from cllama_deploy.quickstart.corpus import chinese_lines, english_lines, write_lines
from cllama_deploy.tokenizer.spm import processor
from cllama_deploy.tokenizer.stats import StatsConfig, count_han, tokenizer_stats


def test_count_han():
    assert count_han("中文abc，。😀𠀀") == 3  # basic block + extension B; punctuation is not Han
    assert count_han("ＡＢＣ 123") == 0


def test_stats_on_generated_text(tmp_path, base_sp_model, merged_dir):
    zh_lines = chinese_lines(300, seed=42)
    zh = write_lines(tmp_path / "zh.txt", zh_lines)
    en = tmp_path / "en.txt.gz"
    with gzip.open(en, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(english_lines(200, seed=43)) + "\n")
    r = tokenizer_stats(StatsConfig(base=base_sp_model, tokenizer=merged_dir, files=[zh, en]))
    a, b = processor(base_sp_model), processor(merged_dir / "tokenizer.model")
    zs = r.files[0]
    assert zs.lines == 300 and zs.chars == sum(len(x) for x in zh_lines)
    assert zs.base_tokens == sum(len(a.encode(x)) for x in zh_lines)
    assert zs.tokens == sum(len(b.encode(x)) for x in zh_lines)
    assert zs.ratio > 1.2  # the merged vocabulary needs clearly fewer tokens for Chinese
    assert r.files[1].lines == 200 and r.files[1].han_chars == 0
    assert r.total.base_tokens == zs.base_tokens + r.files[1].base_tokens


def test_cli_stats_json_and_table(tmp_path, base_sp_model, merged_dir, capsys):
    zh = write_lines(tmp_path / "zh.txt", chinese_lines(50, seed=1))
    assert main(["tokenizer", "stats", "--base", str(base_sp_model), "--tokenizer", str(merged_dir),
                 str(zh), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    f = data["files"][0]
    assert f["ratio"] == pytest.approx(f["base_tokens"] / f["tokens"])
    assert f["tokens_per_han"] == pytest.approx(f["tokens"] / f["han_chars"])
    assert main(["tokenizer", "stats", "--base", str(base_sp_model), "--tokenizer", str(merged_dir), str(zh)]) == 0
    assert "A/B" in capsys.readouterr().out


def test_stats_errors(tmp_path, base_sp_model, merged_dir):
    with pytest.raises(ConfigError, match="FILES"):
        StatsConfig(base=base_sp_model, tokenizer=merged_dir, files=[])
    with pytest.raises(ConfigError, match="--tokenizer"):
        StatsConfig(base=base_sp_model, tokenizer=tmp_path / "nope", files=[base_sp_model])
    bad = tmp_path / "bad.txt"
    bad.write_bytes("ok\n".encode() + b"\xc3\x28\n")
    with pytest.raises(InputError, match="line 2"):
        tokenizer_stats(StatsConfig(base=base_sp_model, tokenizer=merged_dir, files=[bad]))

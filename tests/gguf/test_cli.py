"""The CLI: convert / quantize / inspect, and the documented errors (exit 2, one line)."""

from __future__ import annotations

import json

from cllama_deploy.cli import main


def test_convert_quantize_inspect(tmp_path, q256_model, capsys):
    f16 = tmp_path / "m-f16.gguf"
    assert main(["convert", str(q256_model), "--out", str(f16), "--outtype", "f16", "-q",
                 "--chat-template", "alpaca-2", "--name", "tiny"]) == 0
    assert main(["quantize", str(f16), str(tmp_path / "m-q4.gguf"), "--type", "Q4_K_M", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "bits per weight" in err and "fell back" in err and "blk.0.ffn_down.weight" in err
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m-q4.gguf"), "--json", "--no-tensors"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["general.name"] == "tiny"
    assert info["metadata"]["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert info["chat_template"].startswith("{%- set ns = namespace(system='You are a helpful assistant.")
    assert info["vocab"]["by_type"]["byte"] == 256
    assert main(["inspect", str(f16)]) == 0
    out = capsys.readouterr().out
    assert "token_embd.weight" in out and "tokenizer.chat_template" in out
    assert main(["quantize", "--list-types"]) == 0
    assert "Q4_K_M" in capsys.readouterr().out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_documented_errors(tmp_path, q256_model, q256_f16, capsys):
    import shutil

    assert "--outtype" in _error(capsys, ["convert", str(q256_model), "--out", str(tmp_path / "x.gguf"),
                                          "--outtype", "q4_k_m"])
    assert "no such directory" in _error(capsys, ["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "x.gguf")])
    assert "--chat-template" in _error(capsys, ["convert", str(q256_model), "--out", str(tmp_path / "x.gguf"),
                                                "--chat-template", "chatml"])
    # a model whose tokenizer is missing
    broken = tmp_path / "no_tok"
    shutil.copytree(q256_model, broken)
    (broken / "tokenizer.model").unlink()
    assert "tokenizer.model" in _error(capsys, ["convert", str(broken), "--out", str(tmp_path / "x.gguf")])
    # vocab_size disagreeing with the embeddings
    bad = tmp_path / "bad_vocab"
    shutil.copytree(q256_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] += 1
    (bad / "config.json").write_text(json.dumps(cfg))
    assert "vocab_size" in _error(capsys, ["convert", str(bad), "--out", str(tmp_path / "x.gguf")])
    assert "importance matrix" in _error(capsys, ["quantize", str(q256_f16), str(tmp_path / "x.gguf"),
                                                  "--type", "IQ2_XS"])
    assert "not a GGUF file" in _error(capsys, ["inspect", str(q256_model / "config.json")])
    assert not list(tmp_path.glob("x.gguf*"))

"""write_hf_tokenizer: every HF directory we write gets complete tokenizer files, whatever its source carried
(the seed's LlamaTokenizer directory, an adapter with only tokenizer.model, added tokens, custom templates)."""

from __future__ import annotations

import json

import pytest

from cllama_deploy.errors import TokenizerError
from cllama_deploy.prompts import ALPACA_2_CHAT_TEMPLATE, ALPACA_V1_CHAT_TEMPLATE
from cllama_deploy.tokenizer.hf import (
    TARGETS,
    compare_with_sentencepiece,
    remote_code_references,
    write_hf_tokenizer,
)
from cllama_deploy.tokenizer.spm import processor

SEED_CONFIG = {  # the shape of the seed's published Chinese-Alpaca tokenizer_config.json
    "tokenizer_class": "LlamaTokenizer", "bos_token": {"__type": "AddedToken", "content": "<s>"},
    "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
    "model_max_length": 1000000000000000019884624838656, "clean_up_tokenization_spaces": False,
    "legacy": False, "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]},
}


def _config(d):
    return json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))


def test_seed_llama_tokenizer_dir_becomes_exact(tmp_path, merged_pad_dir, mixed):
    from transformers import AutoTokenizer

    src = tmp_path / "seed"
    src.mkdir()
    (src / "tokenizer.model").write_bytes((merged_pad_dir / "tokenizer.model").read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps(SEED_CONFIG))
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "unk_token": "<unk>", "pad_token": "[PAD]"}))
    (src / "tokenizer.json").write_text("{}")
    info = write_hf_tokenizer(tmp_path / "out", src)
    out = tmp_path / "out"
    cfg = _config(out)
    assert cfg["tokenizer_class"] == "SentencePieceBackend" and cfg["legacy"] is True
    assert cfg["pad_token"] == "[PAD]" and cfg["chat_template"] == ALPACA_V1_CHAT_TEMPLATE
    assert "auto_map" not in cfg and remote_code_references(out) == [] and not (out / "tokenizer.json").exists()
    sp = processor(out / "tokenizer.model")
    assert (info.pad_token, info.pad_token_id, info.chat_template_from) == ("[PAD]", sp.get_piece_size() - 1, "alpaca")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert compare_with_sentencepiece(tok, out / "tokenizer.model", mixed)["mismatches"] == 0
    assert tok.pad_token_id == info.pad_token_id
    assert remote_code_references(src) == ["tokenizer_config.json: auto_map"]


def test_adapter_with_only_tokenizer_model_rewritten_in_place(tmp_path, merged_dir):
    from transformers import AutoTokenizer

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((merged_dir / "tokenizer.model").read_bytes())
    (d / "adapter_config.json").write_text("{}")
    info = write_hf_tokenizer(d, d, target="transformers4")
    assert {p.name for p in d.iterdir()} == {"tokenizer.model", "adapter_config.json", "tokenizer_config.json",
                                              "special_tokens_map.json"}
    cfg = _config(d)
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["add_bos_token"] and not cfg["add_eos_token"]
    assert cfg["pad_token"] is None and cfg["chat_template"] == ALPACA_V1_CHAT_TEMPLATE
    assert info.note == TARGETS["transformers4"].note and info.tokenizer_class == "LlamaTokenizer"
    # transformers 5's documented exact way for this target
    from transformers import SentencePieceBackend

    sp = processor(d / "tokenizer.model")
    tok = SentencePieceBackend.from_pretrained(str(d))
    assert tok("中文 abc 123")["input_ids"] == [sp.bos_id()] + sp.encode("中文 abc 123")
    assert type(AutoTokenizer.from_pretrained(str(d))).__name__ == "LlamaTokenizer"


def test_added_tokens_beyond_the_model_and_source_template(tmp_path, merged_dir):
    """Stanford-Alpaca style: [PAD] as an added token (id = piece count, a row the model grew for it), and a
    chat template from chat_template.jinja (what transformers 5's save_pretrained writes)."""
    from transformers import AutoTokenizer

    n = processor(merged_dir / "tokenizer.model").get_piece_size()
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes((merged_dir / "tokenizer.model").read_bytes())
    (src / "added_tokens.json").write_text(json.dumps({"[PAD]": n}))
    (src / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "[PAD]"}}))
    (src / "chat_template.jinja").write_text(ALPACA_2_CHAT_TEMPLATE)
    info = write_hf_tokenizer(tmp_path / "out", src)
    assert info.added_tokens == {"[PAD]": n} and info.pad_token_id == n and info.vocab_size == n + 1
    assert info.chat_template_from == "source"
    out = tmp_path / "out"
    assert _config(out)["added_tokens_decoder"][str(n)]["content"] == "[PAD]"
    assert _config(out)["chat_template"] == ALPACA_2_CHAT_TEMPLATE
    assert not (out / "added_tokens.json").exists() and not (out / "chat_template.jinja").exists()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("[PAD]", n, n + 1)
    from cllama_deploy.checkpoint.validate import count_tokenizer

    assert count_tokenizer(out).total == n + 1  # the merge's vocabulary check sees the same size
    # an explicit template wins over the source's
    again = write_hf_tokenizer(tmp_path / "again", src, chat_template="alpaca")
    assert again.chat_template_from == "argument" and _config(tmp_path / "again")["chat_template"] == ALPACA_V1_CHAT_TEMPLATE


def test_bad_sources_are_clear_errors(tmp_path, merged_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        write_hf_tokenizer(tmp_path / "o", empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes((merged_dir / "tokenizer.model").read_bytes())
    (bad / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(TokenizerError, match="pad token '<pad>'"):
        write_hf_tokenizer(tmp_path / "o", bad)
    (bad / "special_tokens_map.json").unlink()
    (bad / "added_tokens.json").write_text(json.dumps({"[X]": 99999}))
    with pytest.raises(TokenizerError, match="ids right after"):
        write_hf_tokenizer(tmp_path / "o", bad)
    with pytest.raises(TokenizerError, match="--hf-target"):
        write_hf_tokenizer(tmp_path / "o", merged_dir, target="vllm")


@pytest.mark.parametrize("target, says", [("transformers5", "transformers 4.x's AutoTokenizer (vLLM < 0.19.1, TGI) "
                                           "cannot load it"),
                                          ("transformers4", "AutoTokenizer.from_pretrained(DIR, use_fast=False)")])
def test_tokenizer_merge_says_how_to_load_exactly(tmp_path, base_sp_model, zh_sp_model, capsys, target, says):
    from cllama_deploy.cli import main

    out = tmp_path / "tok"
    assert main(["tokenizer", "merge", "--base", str(base_sp_model), "--add", str(zh_sp_model), "--out", str(out),
                 "--hf-target", target]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert says in printed and f"--hf-target {target}" in printed
    report = json.loads((out / "merge_report.json").read_text())
    assert report["hf_target"] == target and report["hf_tokenizer_class"] == TARGETS[target].tokenizer_class
    assert main(["tokenizer", "merge", "--base", str(base_sp_model), "--add", str(zh_sp_model),
                 "--out", str(tmp_path / "x"), "--hf-target", "vllm"]) == 2
    assert "--hf-target 'vllm'" in capsys.readouterr().err


def test_merge_of_a_seed_style_adapter_writes_an_exact_directory(tmp_path, base_sp_model, merged_pad_dir, mixed):
    """`merge` of an adapter whose tokenizer files name LlamaTokenizer (as the seed's published adapters do)
    gives our complete config, not a copy of the adapter's (transformers 5's inexact default)."""
    from transformers import AutoTokenizer

    from cllama_deploy.merge import MergeConfig, merge
    from tests import builders
    from tests.gguf import builders_gguf as bg
    from tests.pipeline import builders_pipeline as bp

    tok = merged_pad_dir / "tokenizer.model"
    base = builders.make_tiny_llama(tmp_path / "base", bg.sp_size(base_sp_model), num_layers=1,
                                    tokenizer_model=base_sp_model)
    adapter = tmp_path / "sft_lora"
    bp.make_lora(base, adapter, new_vocab=bg.sp_size(tok), tokenizer_model=tok)
    (adapter / "tokenizer_config.json").write_text(json.dumps(SEED_CONFIG))
    (adapter / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "bos_token": "<s>"}))
    out = merge(MergeConfig(base=base, loras=[adapter], out=tmp_path / "merged", show_progress=False)).out
    cfg = _config(out)
    assert cfg["tokenizer_class"] == "SentencePieceBackend" and cfg["pad_token"] == "[PAD]" and "auto_map" not in cfg
    assert remote_code_references(out) == []
    hf = AutoTokenizer.from_pretrained(str(out))
    assert compare_with_sentencepiece(hf, out / "tokenizer.model", mixed)["mismatches"] == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

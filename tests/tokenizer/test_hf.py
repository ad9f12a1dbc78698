"""The HF tokenizer directory: AutoTokenizer encodes exactly like SentencePiece (no trust_remote_code)."""

from __future__ import annotations

import json

import pytest

from cllama_deploy.errors import TokenizerError
from cllama_deploy.prompts import ALPACA_V1_CHAT_TEMPLATE, build_prompt
from cllama_deploy.tokenizer.hf import (
    compare_with_sentencepiece,
    load_tokenizer,
    resolve_sp_model,
    write_hf_tokenizer_dir,
)
from cllama_deploy.tokenizer.spm import processor
from tests.tokenizer.conftest import mixed_lines


@pytest.fixture(scope="module")
def lines(mixed):
    from cllama_deploy.quickstart.corpus import chinese_lines, english_lines

    return mixed + mixed_lines(600, seed=5) + chinese_lines(300, seed=99) + english_lines(100, seed=98)


def test_autotokenizer_encodes_like_sentencepiece(merged_pad_dir, lines):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_pad_dir))
    assert type(tok).__name__ == "SentencePieceBackend"
    report = compare_with_sentencepiece(tok, merged_pad_dir / "tokenizer.model", lines)
    assert report["lines"] == len(lines) >= 1400
    assert report["mismatches"] == 0, report["examples"]
    # special tokens and BOS/EOS behaviour
    sp = processor(merged_pad_dir / "tokenizer.model")
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "[PAD]")
    assert tok.pad_token_id == sp.get_piece_size() - 1 and len(tok) == sp.get_piece_size()
    ids = tok("中文 text")["input_ids"]
    assert ids[0] == sp.bos_id() and ids[-1] != sp.eos_id()
    cfg = json.loads((merged_pad_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert not (merged_pad_dir / "tokenizer.json").exists()


def test_autotokenizer_in_a_model_directory(tmp_path, merged_dir):
    """Next to a LLaMA config.json (a trained or merged model dir) AutoTokenizer still picks our class."""
    from transformers import AutoTokenizer, LlamaConfig

    d = tmp_path / "model"
    write_hf_tokenizer_dir(merged_dir / "tokenizer.model", d)
    n = processor(d / "tokenizer.model").get_piece_size()
    LlamaConfig(vocab_size=n, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32).save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(str(d))
    assert type(tok).__name__ == "SentencePieceBackend"
    sp = processor(d / "tokenizer.model")
    assert tok("中文 text 123")["input_ids"] == [sp.bos_id()] + sp.encode("中文 text 123")


def test_chat_template_is_alpaca(merged_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tok.chat_template == ALPACA_V1_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "写一首诗"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s>" + build_prompt("写一首诗")
    assert tok.pad_token is None  # LLaMA (no --pad-token) has no pad token


def test_load_tokenizer_decodes_exactly_and_saves_safely(tmp_path, merged_pad_dir, lines):
    from transformers import AutoTokenizer

    tok = load_tokenizer(merged_pad_dir)
    sp = processor(merged_pad_dir / "tokenizer.model")
    for line in lines[:300]:
        ids = tok(line)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(line)
        assert tok.decode(ids, skip_special_tokens=True) == line
    assert tok.decode([sp.bos_id()] + sp.encode("你好")) == "<s>你好"
    # save_pretrained writes our format: AutoTokenizer still gets SentencePieceBackend with BOS
    tok.save_pretrained(tmp_path / "resaved")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "resaved"))
    assert type(again).__name__ == "SentencePieceBackend"
    assert again("你好 world")["input_ids"] == tok("你好 world")["input_ids"]
    assert again.pad_token == "[PAD]"


def test_load_tokenizer_from_bare_model_and_foreign_dir(tmp_path, merged_dir, lines):
    tok = load_tokenizer(merged_dir / "tokenizer.model")
    sp = processor(merged_dir / "tokenizer.model")
    assert tok("中文")["input_ids"] == [sp.bos_id()] + sp.encode("中文")
    # an HF dir that claims LlamaTokenizer (the tokenizers-backed class) is still loaded SentencePiece-exact
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "tokenizer.model").write_bytes((merged_dir / "tokenizer.model").read_bytes())
    (foreign / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": True, "legacy": False}))
    tok2 = load_tokenizer(foreign)
    assert tok2("中文 abc")["input_ids"] == [sp.bos_id()] + sp.encode("中文 abc") + [sp.eos_id()]
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)


def test_pad_token_must_be_a_piece(tmp_path, merged_dir):
    with pytest.raises(TokenizerError, match="not a piece"):
        write_hf_tokenizer_dir(merged_dir / "tokenizer.model", tmp_path / "x", pad_token="<pad>")


def test_resolve_sp_model(tmp_path, merged_dir):
    from cllama_deploy.tokenizer.gguf_vocab import gguf_vocab_from_sp, write_vocab_only_gguf

    data = (merged_dir / "tokenizer.model").read_bytes()
    assert resolve_sp_model(merged_dir) == data
    assert resolve_sp_model(merged_dir / "tokenizer.model") == data
    gguf_path = write_vocab_only_gguf(gguf_vocab_from_sp(merged_dir / "tokenizer.model"), tmp_path / "v.gguf")
    rebuilt = processor(resolve_sp_model(gguf_path))
    assert rebuilt.get_piece_size() == processor(data).get_piece_size()
    with pytest.raises(TokenizerError, match="no such"):
        resolve_sp_model(tmp_path / "missing.model")

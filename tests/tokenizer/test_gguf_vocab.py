"""SentencePiece ⇄ GGUF vocabulary: llama.cpp's converter rules, rebuild, and llama.cpp parity."""

from __future__ import annotations

import json

import pytest

from cllama_deploy.cli import main
from cllama_deploy.errors import TokenizerError
from cllama_deploy.tokenizer import gguf_vocab as gv
from cllama_deploy.tokenizer.spm import load_model, pb2, processor


@pytest.fixture(scope="module")
def merged_gguf(tmp_path_factory, merged_pad_dir):
    path = tmp_path_factory.mktemp("gguf") / "merged-vocab.gguf"
    return gv.write_vocab_only_gguf(gv.gguf_vocab_from_sp(merged_pad_dir / "tokenizer.model"), path)


def test_vocab_from_sp_types_scores_ids(merged_pad_dir):
    proto = load_model(merged_pad_dir / "tokenizer.model")
    v = gv.gguf_vocab_from_sp(proto)
    assert v.tokens == [p.piece for p in proto.pieces]
    assert v.scores == [p.score for p in proto.pieces]
    assert v.token_types[:3] == [gv.UNKNOWN, gv.CONTROL, gv.CONTROL]
    assert v.token_types[3:259] == [gv.BYTE] * 256  # LLaMA-like byte fallback pieces
    assert set(v.token_types[259:]) == {gv.NORMAL}
    assert (v.unk_id, v.bos_id, v.eos_id, v.pad_id) == (0, 1, 2, None)
    assert (v.add_bos, v.add_eos) == (True, False)
    assert v.add_space_prefix is None and v.remove_extra_whitespaces is None  # llama.cpp's defaults hold


def test_user_defined_becomes_normal_and_padding_rows(base_sp_model):
    proto = load_model(base_sp_model)
    proto.pieces[300].type = pb2().ModelProto.SentencePiece.USER_DEFINED
    n = len(proto.pieces)
    v = gv.gguf_vocab_from_sp(proto, vocab_size=n + 3)
    assert v.token_types[300] == gv.NORMAL  # the converter's IsUnknown/IsControl/IsUnused/IsByte test
    assert v.tokens[n:] == [f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"]
    assert v.scores[n:] == [-10000.0] * 3 and v.token_types[n:] == [gv.UNUSED] * 3
    with pytest.raises(TokenizerError, match="smaller than its tokenizer"):
        gv.gguf_vocab_from_sp(proto, vocab_size=n - 1)


def test_hf_dir_rules(tmp_path, merged_pad_dir):
    d = tmp_path / "model"
    d.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).write_bytes((merged_pad_dir / name).read_bytes())
    n = processor(d / "tokenizer.model").get_piece_size()
    # without tokenizer.json the converter takes no ids from tokenizer_config, only from config.json
    v = gv.gguf_vocab_from_hf_dir(d)
    assert v.special_ids == {}
    assert (v.add_bos, v.add_eos) == (True, False)
    assert v.chat_template and "### Instruction" in v.chat_template
    pad = n - 1
    assert v.tokens[pad] == "[PAD]" and v.token_types[pad] == gv.CONTROL and v.scores[pad] == -1000.0
    assert v.token_types[0] == gv.CONTROL  # <unk> listed as special in added_tokens_decoder
    (d / "config.json").write_text(json.dumps({"vocab_size": n + 2, "bos_token_id": 1, "eos_token_id": 2,
                                               "pad_token_id": pad}))
    v = gv.gguf_vocab_from_hf_dir(d)
    assert len(v.tokens) == n + 2 and v.special_ids == {"bos": 1, "eos": 2, "pad": pad}
    (d / "added_tokens.json").write_text(json.dumps({"<extra>": n}))
    v = gv.gguf_vocab_from_hf_dir(d)
    assert v.tokens[n] == "<extra>" and v.token_types[n] == gv.USER_DEFINED and v.scores[n] == -1000.0


def test_rebuild_from_gguf_round_trips_ids(tmp_path, merged_pad_dir, merged_gguf, mixed):
    sp = processor(merged_pad_dir / "tokenizer.model")
    out = tmp_path / "rebuilt.model"
    assert main(["tokenizer", "from-gguf", str(merged_gguf), "--out", str(out)]) == 0
    rebuilt = processor(out)
    assert rebuilt.get_piece_size() == sp.get_piece_size()
    assert [rebuilt.id_to_piece(i) for i in range(sp.get_piece_size())] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert (rebuilt.unk_id(), rebuilt.bos_id(), rebuilt.eos_id()) == (0, 1, 2)
    for line in mixed:
        assert rebuilt.encode(line) == sp.encode(line)
        assert rebuilt.decode(rebuilt.encode(line)) == line


def test_llama_cpp_encodes_like_sentencepiece(merged_gguf, merged_pad_dir, mixed):
    """llama.cpp on the GGUF we write = SentencePiece on the merged model (the serving side)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(merged_gguf), vocab_only=True, verbose=False, n_threads=1)
    sp = processor(merged_pad_dir / "tokenizer.model")
    for line in mixed:
        want = sp.encode(line)
        assert llm.tokenize(line.encode("utf-8"), add_bos=False, special=False) == want, line
    assert llm.tokenize("中文".encode(), add_bos=True)[0] == sp.bos_id()


def test_gguf_errors(tmp_path, base_sp_model):
    import gguf

    v = gv.gguf_vocab_from_sp(base_sp_model)
    v.model = "gpt2"
    path = gv.write_vocab_only_gguf(v, tmp_path / "bpe.gguf")
    with pytest.raises(TokenizerError, match="not a SentencePiece"):
        gv.sp_model_from_gguf(path)
    v = gv.gguf_vocab_from_sp(base_sp_model)
    v.tokens[10] = v.tokens[11]
    with pytest.raises(TokenizerError, match="twice"):
        gv.sp_model_from_gguf(v)
    w = gguf.GGUFWriter(str(tmp_path / "novocab.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="no tokenizer vocabulary"):
        gv.sp_model_from_gguf(tmp_path / "novocab.gguf")
    assert main(["tokenizer", "from-gguf", str(tmp_path / "missing.gguf")]) == 2


def test_rebuild_honours_space_prefix_keys(base_sp_model):
    v = gv.gguf_vocab_from_sp(base_sp_model)
    v.add_space_prefix = False
    m = gv.sp_model_from_gguf(v)
    assert m.normalizer_spec.add_dummy_prefix is False
    assert processor(m).encode("Hello", out_type=str)[0] != processor(base_sp_model).encode("Hello", out_type=str)[0]

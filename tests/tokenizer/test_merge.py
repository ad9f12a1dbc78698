"""`tokenizer merge`: the seed's recipe byte for byte, invariants, base as file / HF dir / GGUF."""

from __future__ import annotations

import json

import pytest

from cllama_deploy.cli import main
from cllama_deploy.errors import ConfigError, TokenizerError
from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, check_mergeable, merge_models, merge_tokenizers
from cllama_deploy.tokenizer.spm import load_model, pb2, processor


def seed_reference_merge(base_bytes: bytes, add_bytes: bytes, pad: bool) -> bytes:
    """The seed's merge script, written out plainly (the independent oracle for our bytes)."""
    mp = pb2().ModelProto
    llama = mp()
    llama.ParseFromString(base_bytes)
    chinese = mp()
    chinese.ParseFromString(add_bytes)
    pieces = set(p.piece for p in llama.pieces)
    for p in chinese.pieces:
        if p.piece not in pieces:
            new_p = mp.SentencePiece()
            new_p.piece = p.piece
            new_p.score = 0
            llama.pieces.append(new_p)
            pieces.add(p.piece)
    if pad:
        new_p = mp.SentencePiece()
        new_p.piece = "[PAD]"
        new_p.score = 0
        llama.pieces.append(new_p)
    return llama.SerializeToString()


@pytest.mark.parametrize("pad", [False, True])
def test_merge_matches_seed_recipe_byte_for_byte(tmp_path, base_sp_model, zh_sp_model, pad):
    out = tmp_path / "tok"
    r = merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=out, pad_token=pad))
    want = seed_reference_merge(base_sp_model.read_bytes(), zh_sp_model.read_bytes(), pad)
    assert (out / "tokenizer.model").read_bytes() == want
    base_n = processor(base_sp_model).get_piece_size()
    zh = load_model(zh_sp_model)
    base_pieces = {p.piece for p in load_model(base_sp_model).pieces}
    new = [p.piece for p in zh.pieces if p.piece not in base_pieces]
    assert r.base_pieces == base_n
    assert r.added_pieces == len(new) + int(pad) > 100
    assert r.skipped_pieces == len(zh.pieces) - len(new)
    assert r.total_pieces == base_n + r.added_pieces
    sp = processor(out / "tokenizer.model")
    assert [sp.id_to_piece(i) for i in range(base_n, base_n + len(new))] == new  # contiguous, in order
    assert all(sp.get_score(i) == 0 for i in range(base_n, sp.get_piece_size()))
    assert r.pad_id == (sp.get_piece_size() - 1 if pad else None)
    if pad:
        assert sp.id_to_piece(r.pad_id) == "[PAD]"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["added_pieces"] == r.added_pieces and report["sha256"] == r.sha256


def test_merged_roundtrip_mixed_text(merged_dir, mixed):
    sp = processor(merged_dir / "tokenizer.model")
    for line in mixed:
        assert sp.decode(sp.encode(line)) == line
    # the new pieces are used: Chinese text needs fewer tokens than with the base alone
    assert sp.get_piece_size() > 600


def test_merge_from_hf_dir_and_gguf_bases(tmp_path, merged_dir, zh_sp_model, mixed):
    from cllama_deploy.tokenizer.gguf_vocab import gguf_vocab_from_sp, write_vocab_only_gguf

    base_model = tmp_path / "base" / "tokenizer.model"
    base_model.parent.mkdir()
    # an HF dir base: the merged dir written before already is one; use a plain dir with the model
    from tests.builders import train_llama_like_sp

    train_llama_like_sp(base_model)
    r_dir = merge_tokenizers(TokenizerMergeConfig(base=base_model.parent, add=zh_sp_model,
                                                  out=tmp_path / "from_dir"))
    r_file = merge_tokenizers(TokenizerMergeConfig(base=base_model, add=zh_sp_model, out=tmp_path / "from_file"))
    assert r_dir.sha256 == r_file.sha256
    gguf_path = write_vocab_only_gguf(gguf_vocab_from_sp(base_model), tmp_path / "base.gguf")
    r_gguf = merge_tokenizers(TokenizerMergeConfig(base=gguf_path, add=zh_sp_model, out=tmp_path / "from_gguf"))
    assert r_gguf.added_pieces == r_file.added_pieces
    a, b = processor(tmp_path / "from_file" / "tokenizer.model"), processor(tmp_path / "from_gguf" / "tokenizer.model")
    assert [a.id_to_piece(i) for i in range(a.get_piece_size())] == [b.id_to_piece(i) for i in range(b.get_piece_size())]
    for line in mixed[:100]:
        assert a.encode(line) == b.encode(line)


def test_cli_merge_reports_pieces(tmp_path, base_sp_model, zh_sp_model, capsys):
    code = main(["tokenizer", "merge", "--base", str(base_sp_model), "--add", str(zh_sp_model),
                 "--out", str(tmp_path / "m"), "--pad-token"])
    assert code == 0
    out = capsys.readouterr().out
    assert "added" in out and "[PAD] id" in out
    # re-running into our own output directory is safe
    assert main(["tokenizer", "merge", "--base", str(base_sp_model), "--add", str(zh_sp_model),
                 "--out", str(tmp_path / "m")]) == 0


def test_out_dir_with_foreign_files_refused(tmp_path, base_sp_model, zh_sp_model):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="--out"):
        TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=out)
    assert (out / "weights.safetensors").exists()


def test_cli_missing_base_is_one_line_exit_2(tmp_path, zh_sp_model, capsys):
    code = main(["tokenizer", "merge", "--base", str(tmp_path / "nope.model"), "--add", str(zh_sp_model),
                 "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --base") and len(err.splitlines()) == 1


def test_not_a_model_is_reported(tmp_path, zh_sp_model):
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"\x00not a protobuf at all\xff" * 10)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        merge_tokenizers(TokenizerMergeConfig(base=bogus, add=zh_sp_model, out=tmp_path / "o"))


def test_hf_dir_without_tokenizer_model(tmp_path, zh_sp_model):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        merge_tokenizers(TokenizerMergeConfig(base=d, add=zh_sp_model, out=tmp_path / "o"))


# --- unsafe merges ---------------------------------------------------------------------------


def _proto(path):
    return load_model(path)


def test_unigram_base_refused(base_sp_model, zh_sp_model):
    with pytest.raises(TokenizerError, match="unigram"):
        check_mergeable(_proto(zh_sp_model), _proto(base_sp_model))


@pytest.mark.parametrize("kind", ["CHAR", "WORD"])
def test_char_and_word_bases_refused(base_sp_model, zh_sp_model, kind):
    base = _proto(base_sp_model)
    base.trainer_spec.model_type = getattr(pb2().TrainerSpec, kind)
    with pytest.raises(TokenizerError, match="unreachable"):
        check_mergeable(base, _proto(zh_sp_model))


def test_whitespace_side_mismatch_refused(base_sp_model, zh_sp_model):
    add = _proto(zh_sp_model)
    add.trainer_spec.treat_whitespace_as_suffix = True
    with pytest.raises(TokenizerError, match="whitespace"):
        check_mergeable(_proto(base_sp_model), add)


def test_duplicate_and_empty_pieces_refused(base_sp_model, zh_sp_model):
    base, add = _proto(base_sp_model), _proto(zh_sp_model)
    dup = add.pieces.add()
    dup.piece = add.pieces[5].piece
    with pytest.raises(TokenizerError, match="twice"):
        check_mergeable(base, add)
    add = _proto(zh_sp_model)
    add.pieces.add().piece = ""
    with pytest.raises(TokenizerError, match="empty piece"):
        check_mergeable(base, add)


def test_special_pieces_missing_from_base_refused(base_sp_model, zh_sp_model):
    add = _proto(zh_sp_model)
    p = add.pieces.add()
    p.piece = "<sep>"
    p.type = pb2().ModelProto.SentencePiece.CONTROL
    with pytest.raises(TokenizerError, match="special piece"):
        check_mergeable(_proto(base_sp_model), add)


def test_normalizer_that_rewrites_added_pieces_refused(tmp_path, base_sp_model, zh_sp_model):
    import sentencepiece as spm

    # a BPE base whose normalizer folds case: an added piece with capitals could never match
    base = _proto(base_sp_model)
    folded = spm.SentencePieceNormalizer(rule_name="nmt_nfkc_cf")
    spec = pb2().NormalizerSpec()
    spec.ParseFromString(folded.serialized_normalizer_spec())
    base.normalizer_spec.CopyFrom(spec)
    add = _proto(zh_sp_model)
    p = add.pieces.add()
    p.piece = "\u2581Debian"
    with pytest.raises(TokenizerError, match="rewrites 1"):
        check_mergeable(base, add)


def test_merge_models_does_not_mutate_inputs(base_sp_model, zh_sp_model):
    base, add = _proto(base_sp_model), _proto(zh_sp_model)
    before = base.SerializeToString()
    merged, added, skipped, pad_id = merge_models(base, add, pad_token=True)
    assert base.SerializeToString() == before
    assert added[-1] == "[PAD]" and pad_id == len(merged.pieces) - 1
    # [PAD] already present: reused, not appended twice
    merged2, added2, _, pad2 = merge_models(merged, add, pad_token=True)
    assert added2 == [] and pad2 == pad_id

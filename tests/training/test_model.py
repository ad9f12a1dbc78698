"""Vocabulary checks, resize with mean-of-pieces initialization, LoRA wiring, --auto_batch planning."""

from __future__ import annotations


import pytest

from cllama_deploy.errors import ConfigError, ShapeMismatchError, TokenizerError
from cllama_deploy.training import data as D
from cllama_deploy.training import model as M
from cllama_deploy.training.config import PTConfig
from tests import builders


def cfg_for(model_dir, tmp_path, **kw):
    (tmp_path / "d").mkdir(exist_ok=True)
    return PTConfig(model_name_or_path=str(model_dir), dataset_dir=str(tmp_path / "d"),
                    output_dir=str(tmp_path / "o"), **kw)


def test_vocab_grow_ok(tmp_path, base_model_dir, merged_tok_dir, merged_size):
    plan = M.plan_vocab(cfg_for(base_model_dir, tmp_path), D.load_text_tokenizer(merged_tok_dir))
    assert (plan.model_rows, plan.tokenizer_size) == (512, merged_size) and plan.added > 100
    assert plan.base_tokenizer == base_model_dir / "tokenizer.model"


def test_vocab_equal_ok(tmp_path, merged_model_dir, merged_tok_dir, merged_size):
    plan = M.plan_vocab(cfg_for(merged_model_dir, tmp_path), D.load_text_tokenizer(merged_tok_dir))
    assert plan.added == 0


def test_vocab_tokenizer_smaller_is_an_error(tmp_path, merged_model_dir, base_sp_model):
    with pytest.raises(ShapeMismatchError, match=r"has 512 pieces but the model has \d+ embedding rows"):
        M.plan_vocab(cfg_for(merged_model_dir, tmp_path), D.load_text_tokenizer(base_sp_model))


def test_vocab_not_an_extension_is_an_error(tmp_path, base_model_dir, merged_tok_dir):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((merged_tok_dir / "tokenizer.model").read_bytes())
    a, b = proto.pieces[300].piece, proto.pieces[301].piece  # reorder two base pieces
    proto.pieces[300].piece, proto.pieces[301].piece = b, a
    bad = tmp_path / "bad" / "tokenizer.model"
    bad.parent.mkdir()
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerError, match="not an extension of the base tokenizer .*: piece 300"):
        M.plan_vocab(cfg_for(base_model_dir, tmp_path), D.load_text_tokenizer(bad))


def test_vocab_base_tokenizer_size_mismatch(tmp_path, merged_tok_dir, base_sp_model):
    model = builders.make_tiny_llama(tmp_path / "m", 500, num_layers=1, tokenizer_model=base_sp_model)
    with pytest.raises(ShapeMismatchError, match="base tokenizer .* has 512 pieces but the model has 500"):
        M.plan_vocab(cfg_for(model, tmp_path), D.load_text_tokenizer(merged_tok_dir))


def test_vocab_grow_needs_saved_embeddings(tmp_path, base_model_dir, merged_tok_dir):
    with pytest.raises(ConfigError, match="--modules_to_save must include embed_tokens,lm_head"):
        M.plan_vocab(cfg_for(base_model_dir, tmp_path, modules_to_save="none"),
                     D.load_text_tokenizer(merged_tok_dir))


def test_vocab_grow_needs_base_tokenizer(tmp_path, merged_tok_dir):
    model = builders.make_tiny_llama(tmp_path / "m", 512, num_layers=1)  # no tokenizer.model
    with pytest.raises(ConfigError, match="--base_tokenizer_path"):
        M.plan_vocab(cfg_for(model, tmp_path), D.load_text_tokenizer(merged_tok_dir))
    plan = M.plan_vocab(cfg_for(model, tmp_path, init_new_embeddings="default"), D.load_text_tokenizer(merged_tok_dir))
    assert plan.base_tokenizer is None


def test_mean_of_pieces_numerically(tmp_path, base_model_dir, base_sp_model, merged_tok_dir, merged_size):
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    tok = D.load_text_tokenizer(merged_tok_dir)
    plan = M.plan_vocab(cfg_for(base_model_dir, tmp_path), tok)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    M.resize_vocab(model, plan, tok)
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape[0] == head.shape[0] == merged_size
    assert torch.equal(emb[:512], emb0) and torch.equal(head[:512], head0)  # old rows untouched
    merged = spm.SentencePieceProcessor(model_file=str(merged_tok_dir / "tokenizer.model"))
    base = spm.SentencePieceProcessor(model_file=str(base_sp_model))
    checked = 0
    for new_id in range(512, merged_size):
        piece = merged.id_to_piece(new_id)
        if not piece.startswith("\u2581") or piece[1:2] in ("", " ", "\u2581"):
            continue
        # A "▁word" piece is what the base tokenizer's own dummy prefix produces for "word": its standard
        # encoding is the reference decomposition, computed independently of the implementation.
        ids = base.encode(piece[1:])
        torch.testing.assert_close(emb[new_id], emb0[ids].mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head[new_id], head0[ids].mean(0), rtol=1e-5, atol=1e-6)
        checked += 1
    # rows for pieces without "▁": the mean of the rows of their (space-free) base pieces
    for new_id in range(512, merged_size):
        piece = merged.id_to_piece(new_id)
        if piece.startswith("\u2581"):
            continue
        deco = M.pieces_decomposition([""] * new_id + [piece], new_id, base_sp_model, set())[0]
        assert base.decode(deco) == piece and deco
        torch.testing.assert_close(emb[new_id], emb0[deco].mean(0), rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > 50


def test_mean_of_pieces_decomposition_known_piece(tmp_path, base_sp_model):
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_file=str(base_sp_model))
    # "▁" + a Chinese word: a leading space, then the characters (byte pieces where the base lacks them)
    deco = M.pieces_decomposition([""] * 512 + ["\u2581中国", "天气"], 512, base_sp_model, set())
    surface = lambda ids: "".join(base.id_to_piece(i) for i in ids)  # noqa: E731
    assert deco[0] and base.decode(deco[0]) in ("中国", " 中国")
    assert surface(deco[0]).startswith("\u2581")
    assert base.decode(deco[1]) == "天气" and not surface(deco[1]).startswith("\u2581")


def test_plan_batch_prefers_fast_configuration():
    seven_b = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32}
    cfg = type("C", (), {"lora_rank": 8,
                         "trainable_modules": "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj".split(","),
                         "modules_to_save_list": ["embed_tokens", "lm_head"]})()
    trainable = M.estimate_trainable(seven_b, 49953, cfg)
    assert trainable == 429_203_456  # the seed's own figure
    h200 = 139 * 2**30
    plan = M.plan_batch(h200, seven_b, 49953, trainable, 512, 1, 1, True)
    assert plan.per_device_train_batch_size >= 8 and not plan.gradient_checkpointing
    assert "batch" in plan.message and "checkpointing off" in plan.message
    small = M.plan_batch(24 * 2**30, seven_b, 49953, trainable, 512, 1, 1, False)
    assert small.gradient_checkpointing and small.per_device_train_batch_size >= 1
    keep = M.plan_batch(h200, seven_b, 49953, trainable, 512, 4, 8, True)
    assert keep.per_device_train_batch_size * keep.gradient_accumulation_steps == 32  # effective batch kept
    cpu = M.plan_batch(None, seven_b, 49953, trainable, 512, 2, 3, True)
    assert (cpu.per_device_train_batch_size, cpu.gradient_accumulation_steps, cpu.gradient_checkpointing) == (2, 3, True)
    assert "no CUDA GPU" in cpu.message

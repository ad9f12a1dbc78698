"""Parity with PEFT: our streaming merge equals PeftModel.merge_and_unload() (f32, within 1e-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cllama_deploy.merge import MergeConfig, merge, merged_source
from tests.merge.builders_lora import peft_reference

IDS = [[1, 5, 77, 300, 511, 42, 9, 128]]


def assert_same_weights(source, ref_model, atol=1e-5):
    ref = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    tied = bool(ref_model.config.tie_word_embeddings)
    expected = set(ref) - ({"lm_head.weight"} if tied else set())
    assert set(source.names()) == expected
    assert bool(source.config.get("tie_word_embeddings", False)) == tied
    assert source.config["vocab_size"] == ref["model.embed_tokens.weight"].shape[0]
    worst = 0.0
    for name in source.names():
        ours = source.get(name)
        assert ours.shape == ref[name].shape, name
        worst = max(worst, float(np.abs(ours.astype(np.float32) - ref[name]).max()))
    assert worst <= atol, worst


def logits(model, ids=IDS):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def assert_same_logits(out_dir, ref_model, rel=1e-5):
    """Logits of the merged HF directory equal the reference's within ``rel`` of the largest logit
    (the weights agree to float32 rounding; random tiny models amplify it a little)."""
    import torch
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    assert ours.config.vocab_size == ref_model.config.vocab_size
    got, want = logits(ours), logits(ref_model)
    assert np.abs(got - want).max() <= rel * np.abs(want).max()


def test_one_adapter_mha(mha_case, tmp_path):
    source = merged_source(mha_case.base, [mha_case.lora])
    ref = peft_reference(mha_case.base, [mha_case.lora])
    assert_same_weights(source, ref)
    assert source.tokenizer_dir == mha_case.base  # the adapter carries no tokenizer
    result = merge(MergeConfig(base=mha_case.base, loras=[mha_case.lora], out=tmp_path / "out", show_progress=False))
    assert result.dtype == "float32" and result.vocab_size == 512
    assert result.changed == 2 * 7  # every linear projection of both layers
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    assert_same_logits(tmp_path / "out", ref)


def test_plus_two_adapters_in_order(plus_case, tmp_path):
    source = merged_source(plus_case.base, [plus_case.pt, plus_case.sft])
    ref = peft_reference(plus_case.base, [plus_case.pt, plus_case.sft])
    assert_same_weights(source, ref)
    assert source.config["vocab_size"] == 556
    assert source.tokenizer_dir == plus_case.sft
    assert source.vocab.tokenizer.pieces == 555 and source.vocab.tokenizer.total == 556
    # rsLoRA and the patterns reached the scales
    sft = source.adapters[1]
    o = sft.lora["model.layers.0.self_attn.o_proj.weight"]
    down = sft.lora["model.layers.1.mlp.down_proj.weight"]
    q = sft.lora["model.layers.1.self_attn.q_proj.weight"]
    assert (o.rank, q.rank) == (2, 4)
    assert down.scale == pytest.approx(32 / 2.0) and q.scale == pytest.approx(8 / 2.0)

    out = tmp_path / "merged"
    result = merge(MergeConfig(base=plus_case.base, loras=[plus_case.pt, plus_case.sft], out=out,
                               shard_size="40KB", show_progress=False))
    assert len(result.shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 556
    added = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert added["555"]["content"] == "[PAD]"  # the SFT adapter's tokenizer, written complete
    assert_same_logits(out, ref)


def test_plus_pt_adapter_alone(plus_case):
    ref = peft_reference(plus_case.base, [plus_case.pt])
    source = merged_source(plus_case.base, [plus_case.pt])
    assert_same_weights(source, ref)
    assert source.config["vocab_size"] == 555 and source.tokenizer_dir == plus_case.pt


def test_tied_modules_to_save_unties(tied_case, tmp_path):
    source = merged_source(tied_case.base, [tied_case.grow])
    ref = peft_reference(tied_case.base, [tied_case.grow])
    assert not ref.config.tie_word_embeddings
    assert_same_weights(source, ref)
    merge(MergeConfig(base=tied_case.base, loras=[tied_case.grow], out=tmp_path / "o", show_progress=False))
    assert_same_logits(tmp_path / "o", ref)


def test_tied_lora_on_shared_matrix_stays_tied(tied_case, tmp_path):
    source = merged_source(tied_case.base, [tied_case.heads])
    ref = peft_reference(tied_case.base, [tied_case.heads])
    assert ref.config.tie_word_embeddings
    assert_same_weights(source, ref)
    assert source.adapters[0].lora["model.embed_tokens.weight"].embedding
    merge(MergeConfig(base=tied_case.base, loras=[tied_case.heads], out=tmp_path / "o", show_progress=False))
    assert_same_logits(tmp_path / "o", ref)


def test_tied_then_untied_in_order(tied_case):
    ref = peft_reference(tied_case.base, [tied_case.heads, tied_case.grow])
    assert_same_weights(merged_source(tied_case.base, [tied_case.heads, tied_case.grow]), ref)


def test_no_adapters_is_the_checked_base(mha_case):
    # the converter opens plain checkpoints this way: every invariant checked, tensors passed through
    from cllama_deploy.checkpoint import open_hf

    base = open_hf(mha_case.base)
    source = merged_source(mha_case.base, [])
    assert source.names() == base.names() and source.config == base.config
    assert source.tokenizer_dir == mha_case.base and source.vocab.tokenizer.total == 512
    for name in base.names():
        assert source.dtype(name) == "F32" and not source.changed(name)
        np.testing.assert_array_equal(source.get(name), base.get(name))

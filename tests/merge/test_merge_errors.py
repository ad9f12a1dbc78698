"""Every invariant checked before the merge, each as one error naming the file, the tensor and the fix;
config validation; atomic output; output dtypes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cllama_deploy import merge as merge_mod
from cllama_deploy.errors import CheckpointError, ConfigError, ShapeMismatchError
from cllama_deploy.merge import MergeConfig, merge, merged_source
from tests.merge.builders_lora import lora_pair, make_tokenizer_dir, write_adapter

Q = "model.layers.0.self_attn.q_proj"


def _base_copy(case, tmp_path, **config_updates):
    d = shutil.copytree(case.base, tmp_path / "base")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config_updates)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_sft_lora_on_resized_head_before_pt(mha_case, tmp_path):
    # an adapter trained on the 555-token model (LoRA on lm_head) applied to the 512-token base
    ad = write_adapter(tmp_path / "sft", lora_pair("lm_head", 4, 64, 555), target_modules=["lm_head"])
    with pytest.raises(ShapeMismatchError, match=r"adapter_model.safetensors: .*lm_head.lora_A.weight/.*update "
                       r"lm_head.weight with 555 vocabulary rows but it has 512 rows in the base .*pass the adapter "
                       r"that resized the vocabulary \(the pre-training LoRA"):
        merged_source(mha_case.base, [ad])


def test_tokenizer_larger_than_embeddings(plus_case, tmp_path):
    # an SFT-style adapter that ships the extended tokenizer but not the resized embeddings
    ad = write_adapter(tmp_path / "sft", lora_pair(Q, 4, 64, 64))
    shutil.copy(plus_case.ext, ad / "tokenizer.model")
    with pytest.raises(ShapeMismatchError, match=r"^512 rows in embed_tokens \(the base .*\) but the tokenizer "
                       r".*sft/tokenizer.model has 555 pieces: pass the pre-training LoRA \(which saves "
                       r"embed_tokens/lm_head with the resized vocabulary\) before the SFT LoRA"):
        merged_source(plus_case.base, [ad])


def test_tokenizer_smaller_than_embeddings(plus_case, tmp_path):
    pt = shutil.copytree(plus_case.pt, tmp_path / "pt")
    (pt / "tokenizer.model").unlink()  # the base's 512-piece tokenizer is then the last one
    with pytest.raises(ShapeMismatchError, match=r"555 rows in embed_tokens .* but the tokenizer .*base/tokenizer.model "
                       r"has 512 pieces: the tokenizer is older than the embeddings"):
        merged_source(plus_case.base, [pt])
    # and skipping the tokenizer check lets it through
    assert merged_source(plus_case.base, [pt], check_tokenizer=False).config["vocab_size"] == 555


def test_added_tokens_counted(plus_case, tmp_path):
    # 555 pieces + [PAD] = 556 tokens, but the PT adapter's embeddings have 555 rows
    pt = shutil.copytree(plus_case.pt, tmp_path / "pt")
    make_tokenizer_dir(pt, plus_case.ext, {"[PAD]": 555})
    with pytest.raises(ShapeMismatchError, match=r"555 rows in embed_tokens .* has 556 tokens"):
        merged_source(plus_case.base, [pt])


def test_config_vocab_size_disagrees(mha_case, tmp_path):
    base = _base_copy(mha_case, tmp_path, vocab_size=49953)
    with pytest.raises(ShapeMismatchError, match=r"config.json: vocab_size=49953 but model.embed_tokens.weight has 512 "
                       r"rows; set vocab_size to 512 in config.json"):
        merged_source(base, [mha_case.lora])


@pytest.mark.parametrize("update,match", [
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, "hidden_size=64 is not divisible by num_attention_heads=5"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
])
def test_head_counts(mha_case, tmp_path, update, match):
    with pytest.raises(CheckpointError, match=match):
        merged_source(_base_copy(mha_case, tmp_path, **update), [mha_case.lora])


def test_lora_shape_from_another_model(mha_case, tmp_path):
    ad = write_adapter(tmp_path / "a", lora_pair(Q, 4, 32, 64))
    with pytest.raises(ShapeMismatchError, match=rf"{Q}.lora_A.weight and .* give a \[64, 32\] update but {Q}.weight "
                       r"is \[64, 64\] in the base .*trained on another base model"):
        merged_source(mha_case.base, [ad])


def test_lora_on_missing_module(mha_case, tmp_path):
    ad = write_adapter(tmp_path / "a", lora_pair("model.layers.7.self_attn.q_proj", 4, 64, 64))
    with pytest.raises(CheckpointError, match=r"unknown key 'base_model.model.model.layers.7.self_attn.q_proj.lora_A"
                       r".weight': the base model has no tensor 'model.layers.7.self_attn.q_proj.weight'"):
        merged_source(mha_case.base, [ad])


def test_full_tensor_wrong_shape_and_unknown(mha_case, tmp_path):
    ad = write_adapter(tmp_path / "a", {"base_model.model.model.norm.weight": np.ones(32)})
    with pytest.raises(ShapeMismatchError, match=r"model.norm.weight has shape \[32\] but model.norm.weight is \[64\]"):
        merged_source(mha_case.base, [ad])
    ad = write_adapter(tmp_path / "b", {"base_model.model.model.vision.weight": np.ones(32)})
    with pytest.raises(CheckpointError, match=r"unknown key 'base_model.model.model.vision.weight'"):
        merged_source(mha_case.base, [ad])


def test_embeddings_resized_without_lm_head(mha_case, tmp_path):
    ad = write_adapter(tmp_path / "a", {"base_model.model.model.embed_tokens.weight": np.ones((555, 64))})
    with pytest.raises(ShapeMismatchError, match=r"555 rows in embed_tokens .* but 512 in lm_head .*modules_to_save="):
        merged_source(mha_case.base, [ad], check_tokenizer=False)


def test_base_without_lm_head_untied(mha_case, tmp_path):
    from safetensors.numpy import load_file, save_file

    base = _base_copy(mha_case, tmp_path)
    state = load_file(str(base / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(base / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no lm_head.weight and config.json has tie_word_embeddings=false"):
        merged_source(base, [mha_case.lora])


# -- MergeConfig -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "int8"}, "--dtype: 'int8' is not one of"),
    ({"shard_size": "5 parsecs"}, "--shard-size: cannot read"),
    ({"shard_size": 0}, "--shard-size: must be positive"),
    ({"loras": []}, "--lora: give at least one"),
    ({"base": "/nonexistent"}, "--base: /nonexistent is not a directory"),
])
def test_config_errors(mha_case, tmp_path, kwargs, match):
    args = dict(base=mha_case.base, loras=[mha_case.lora], out=tmp_path / "o")
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        MergeConfig(**args)


def test_out_must_not_overlap_inputs(mha_case):
    with pytest.raises(ConfigError, match="--out: .* overlaps the input --base"):
        MergeConfig(base=mha_case.base, loras=[mha_case.lora], out=mha_case.base)
    with pytest.raises(ConfigError, match="--out: .* overlaps the input --lora"):
        MergeConfig(base=mha_case.base, loras=[mha_case.lora], out=mha_case.lora / "sub")


def test_parse_size():
    assert merge_mod.parse_size("5GB") == 5 * 10**9
    assert merge_mod.parse_size("1.5 MiB") == 1572864
    assert merge_mod.parse_size(1234) == 1234


# -- output ----------------------------------------------------------------------------------------

def test_killed_merge_leaves_nothing(mha_case, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_get = merge_mod.MergedSource.get
    calls = []

    def failing_get(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_get(self, name)

    monkeypatch.setattr(merge_mod.MergedSource, "get", failing_get)
    with pytest.raises(KeyboardInterrupt):
        merge(MergeConfig(base=mha_case.base, loras=[mha_case.lora], out=out, show_progress=False))
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    # a finished output survives a failed re-run untouched
    monkeypatch.setattr(merge_mod.MergedSource, "get", real_get)
    merge(MergeConfig(base=mha_case.base, loras=[mha_case.lora], out=out, show_progress=False))
    before = sorted(p.name for p in out.iterdir())
    calls.clear()
    monkeypatch.setattr(merge_mod.MergedSource, "get", failing_get)
    with pytest.raises(KeyboardInterrupt):
        merge(MergeConfig(base=mha_case.base, loras=[mha_case.lora], out=out, show_progress=False))
    assert sorted(p.name for p in out.iterdir()) == before


def test_bf16_base_and_dtype_override(mha_case, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(mha_case.base)).to(torch.bfloat16).save_pretrained(str(base))
    shutil.copy(mha_case.base / "tokenizer.model", base / "tokenizer.model")
    source = merged_source(base, [mha_case.lora])
    result = merge(MergeConfig(base=base, loras=[mha_case.lora], out=tmp_path / "o", show_progress=False))
    assert result.dtype == "bfloat16"
    assert json.loads((tmp_path / "o" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    written = load_file(str(tmp_path / "o" / "model.safetensors"))
    for name in source.names():  # our f32 merge of the widened bf16 base, rounded to bf16 like torch
        want = torch.from_numpy(np.array(source.get(name), np.float32)).to(torch.bfloat16)
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], want), name
    merge(MergeConfig(base=base, loras=[mha_case.lora], out=tmp_path / "o16", dtype="float16", show_progress=False))
    written = load_file(str(tmp_path / "o16" / "model.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.float16}

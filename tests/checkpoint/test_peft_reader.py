"""The PEFT adapter reader: key naming, scales, refusals, and errors that name the key."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cllama_deploy.checkpoint import open_adapter
from cllama_deploy.errors import CheckpointError
from tests.merge.builders_lora import lora_pair, write_adapter


@pytest.fixture(scope="session")
def real_adapter(tmp_path_factory, tiny_base):
    """A real PEFT adapter on tiny_base, plus PEFT's own scaling per module for comparison."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(tiny_base)),
            LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=["lm_head"],
                       use_rslora=True, rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"up_proj": 3}),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        out = tmp_path_factory.mktemp("adapter") / "a"
        model.save_pretrained(str(out))
    scaling = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            scaling[name.replace("base_model.model.", "", 1) + ".weight"] = module.scaling["default"]
    return out, scaling


def test_real_adapter_plan(real_adapter):
    path, scaling = real_adapter
    ad = open_adapter(path)
    assert ad.r == 4 and ad.use_rslora and ad.tokenizer_dir is None
    assert set(ad.lora) == set(scaling)
    for target, pair in ad.lora.items():
        assert pair.scale == pytest.approx(scaling[target]), target
    assert ad.lora["model.layers.1.self_attn.v_proj.weight"].rank == 2
    assert ad.lora["model.layers.0.self_attn.v_proj.weight"].rank == 4
    assert ad.full == {"lm_head.weight": "base_model.model.lm_head.weight"}
    assert ad.delta_shape("model.layers.0.mlp.up_proj.weight") == (128, 64)


def test_bin_adapter_equals_safetensors(real_adapter, tmp_path):
    import torch
    from safetensors.torch import load_file

    path, _ = real_adapter
    d = shutil.copytree(path, tmp_path / "bin")
    torch.save(load_file(str(d / "adapter_model.safetensors")), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    (d / "tokenizer.model").write_bytes(b"x")
    a, b = open_adapter(path), open_adapter(d)
    assert b.weights_file.name == "adapter_model.bin" and b.tokenizer_dir == d
    assert a.lora == b.lora and a.full == b.full
    t = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(a.delta(t, (64, 64)), b.delta(t, (64, 64)))


def test_dora_refused(tmp_path, tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)),
                   LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: DoRA adapters \(use_dora=true\) are not supported"):
        open_adapter(tmp_path / "dora")
    # the magnitude vector betrays DoRA even when the config was edited
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lora_magnitude_vector.*DoRA adapter"):
        open_adapter(tmp_path / "dora")


def test_non_lora_refused(tmp_path, tiny_base):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)),
                   IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                   ).save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(CheckpointError, match="peft_type is 'IA3'; only LoRA adapters can be merged"):
        open_adapter(tmp_path / "ia3")


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("option,value,match", [
    ("lora_bias", True, "lora_B bias"),
    ("layer_replication", [[0, 1], [0, 2]], "layer_replication"),
    ("trainable_token_indices", [5, 6], "trainable_token_indices"),
    ("kasa_config", {"x": 1}, "KaSA"),
])
def test_refused_options(tmp_path, option, value, match):
    write_adapter(tmp_path / "a", lora_pair(Q, 4, 64, 64), **{option: value})
    with pytest.raises(CheckpointError, match=match):
        open_adapter(tmp_path / "a")


def test_off_options_accepted(tmp_path):
    ad = open_adapter(write_adapter(tmp_path / "a", lora_pair(Q, 4, 64, 64), layer_replication=None,
                                    trainable_token_indices=None, use_dora=False, lora_bias=False, use_qalora=False))
    assert list(ad.lora) == [f"{Q}.weight"] and ad.lora[f"{Q}.weight"].scale == 2.0


def test_unknown_key_without_prefix(tmp_path):
    tensors = lora_pair(Q, 4, 64, 64)
    tensors["model.layers.0.self_attn.q_proj.hada_w1"] = np.zeros((4, 4), np.float32)
    write_adapter(tmp_path / "a", tensors)
    with pytest.raises(CheckpointError, match="unknown key 'model.layers.0.self_attn.q_proj.hada_w1'"):
        open_adapter(tmp_path / "a")


def test_rank_mismatch_with_config(tmp_path):
    write_adapter(tmp_path / "a", lora_pair(Q, 4, 64, 64), r=8)
    with pytest.raises(CheckpointError, match=r"lora_A.weight has rank 4 but adapter_config.json says r=8"):
        open_adapter(tmp_path / "a")


def test_incomplete_pair(tmp_path):
    tensors = lora_pair(Q, 4, 64, 64)
    del tensors[f"base_model.model.{Q}.lora_B.weight"]
    write_adapter(tmp_path / "a", tensors)
    with pytest.raises(CheckpointError, match="incomplete LoRA pair"):
        open_adapter(tmp_path / "a")


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="adapter directory not found"):
        open_adapter(tmp_path / "none")
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match=r"adapter_config.json: adapter config \(adapter_config.json\) not found"):
        open_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="malformed adapter config"):
        open_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with pytest.raises(CheckpointError, match="no adapter weights"):
        open_adapter(tmp_path / "a")


def test_embedding_lora_and_fan_in_fan_out(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"base_model.model.model.embed_tokens.lora_embedding_A": rng.normal(size=(4, 300)),
               "base_model.model.model.embed_tokens.lora_embedding_B": rng.normal(size=(64, 4)),
               **lora_pair("model.layers.0.mlp.up_proj", 4, 64, 128)}
    ad = open_adapter(write_adapter(tmp_path / "a", tensors, fan_in_fan_out=True))
    pair = ad.lora["model.embed_tokens.weight"]
    assert pair.embedding and ad.delta_shape("model.embed_tokens.weight") == (300, 64)
    d = ad.delta("model.embed_tokens.weight", (300, 64))
    np.testing.assert_allclose(d, 2.0 * (tensors["base_model.model.model.embed_tokens.lora_embedding_B"]
                                         @ tensors["base_model.model.model.embed_tokens.lora_embedding_A"]).T,
                               rtol=1e-5, atol=1e-5)
    # fan_in_fan_out: ignored on an (out, in) nn.Linear weight like PEFT does, honoured for (in, out) storage
    up = "model.layers.0.mlp.up_proj.weight"
    with pytest.warns(UserWarning, match="fan_in_fan_out=true ignored"):
        assert ad.delta(up, (128, 64)).shape == (128, 64)
    assert ad.delta(up, (64, 128)).shape == (64, 128)

"""The HF directory reader: safetensors (single, sharded, bf16/f16) and pickle .bin, lazily."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from cllama_deploy.checkpoint import TensorSource, open_hf
from cllama_deploy.checkpoint.safetensors_io import ShardWriter, bf16_bits_to_f32, f32_to_bf16_bits
from cllama_deploy.errors import CheckpointError, DependencyError


def assert_equal_to(source, state, dtype=np.float32):
    assert sorted(source.names()) == sorted(state)
    for name, ref in state.items():
        got = source.get(name)
        assert got.dtype == dtype and got.shape == tuple(ref.shape) == source.shape(name)
        np.testing.assert_array_equal(got, ref.float().numpy().astype(dtype))


def test_single_safetensors(tiny_base, tiny_state):
    ckpt = open_hf(tiny_base)
    assert isinstance(ckpt, TensorSource)
    assert ckpt.format == "safetensors" and ckpt.config["vocab_size"] == 300
    assert ckpt.tokenizer_dir is None
    assert_equal_to(ckpt, tiny_state)
    # file order: by position in the file
    from cllama_deploy.checkpoint.safetensors_io import read_header

    infos, _ = read_header(tiny_base / "model.safetensors")
    assert ckpt.names() == list(infos)
    # zero copy: a read-only view of the mapped file
    w = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    assert isinstance(w.base, np.memmap) or isinstance(w, np.memmap)
    assert not w.flags.writeable
    assert ckpt.dtype("model.norm.weight") == "F32" and ckpt.storage_dtype() == "F32"
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        ckpt.get("nope")


def test_sharded_safetensors(tmp_path, tiny_base, tiny_state):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tiny_base)).save_pretrained(str(tmp_path), max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    ckpt = open_hf(tmp_path)
    assert len(ckpt.weight_files) > 1 and ckpt.tokenizer_dir == tmp_path
    assert_equal_to(ckpt, tiny_state)


@pytest.mark.parametrize("dtype,npdtype,tag", [("bfloat16", np.float32, "BF16"), ("float16", np.float16, "F16")])
def test_half_precision(tmp_path, tiny_base, dtype, npdtype, tag):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tiny_base)).to(getattr(torch, dtype)).save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    ckpt = open_hf(tmp_path)
    assert ckpt.storage_dtype() == tag and ckpt.dtype("lm_head.weight") == tag
    assert_equal_to(ckpt, state, npdtype)  # bf16 widens to f32 exactly


def _save_bin(directory, state, shards=1):
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    if shards == 1:
        torch.save(dict(state), directory / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards]}
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, directory / fname)
        weight_map.update({n: fname for n in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pickle_bin(tmp_path, tiny_base, tiny_state, shards):
    import torch

    state = dict(tiny_state)
    # transformers < 4.31 saved this buffer; it is not a weight and must be hidden
    extra = dict(state, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    extra["lm_head.weight"] = state["lm_head.weight"].to(torch.bfloat16)
    _save_bin(tmp_path, extra, shards)
    shutil.copy(tiny_base / "config.json", tmp_path / "config.json")
    ckpt = open_hf(tmp_path)
    assert ckpt.format == "bin" and len(ckpt.weight_files) == shards
    assert ckpt.dtype("lm_head.weight") == "BF16"
    state["lm_head.weight"] = extra["lm_head.weight"]
    assert_equal_to(ckpt, state)


def test_pickle_bin_without_torch(tmp_path, tiny_base, tiny_state, monkeypatch):
    _save_bin(tmp_path, tiny_state)
    shutil.copy(tiny_base / "config.json", tmp_path / "config.json")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(DependencyError, match=r"cllama-deploy\[train\]"):
        open_hf(tmp_path)


def test_safetensors_preferred_over_bin(tmp_path, tiny_base):
    shutil.copytree(tiny_base, tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not a pickle")
    assert open_hf(tmp_path / "m").format == "safetensors"


# -- errors ----------------------------------------------------------------------------------------

def _copy(tiny_base, tmp_path):
    return shutil.copytree(tiny_base, tmp_path / "m")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        open_hf(tmp_path / "nope")


def test_missing_config(tmp_path, tiny_base):
    d = _copy(tiny_base, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: model config \(config\.json\) not found"):
        open_hf(d)


@pytest.mark.parametrize("text,match", [
    ("{not json", "malformed model config"),
    ("[1, 2]", "expected a JSON object"),
    ('{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}', "'vocab_size' must be a positive integer"),
    ('{"hidden_size": "64", "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 3}', "'hidden_size'"),
])
def test_malformed_config(tmp_path, tiny_base, text, match):
    d = _copy(tiny_base, tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        open_hf(d)


def test_no_weights(tmp_path, tiny_base):
    d = _copy(tiny_base, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found .*save_pretrained"):
        open_hf(d)


def test_index_names_missing_shard(tmp_path, tiny_base):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tiny_base)).save_pretrained(str(tmp_path), max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in model.safetensors.index.json is missing"):
        open_hf(tmp_path)


def test_index_names_missing_tensor(tmp_path, tiny_base):
    d = _copy(tiny_base, tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors",
                            "model.extra.weight": "model-00001-of-00001.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.extra.weight' listed in the index is not in that shard"):
        open_hf(d)


def test_truncated_safetensors(tmp_path, tiny_base):
    d = _copy(tiny_base, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated download"):
        open_hf(d)
    (d / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="too short"):
        open_hf(d)


def test_integer_tensor_refused(tmp_path, tiny_base):
    from safetensors.numpy import save_file

    d = _copy(tiny_base, tmp_path)
    save_file({"model.embed_tokens.weight": np.zeros((300, 64), np.int8)}, str(d / "model.safetensors"))
    ckpt = open_hf(d)
    with pytest.raises(CheckpointError, match="dtype I8; only F32/F16/BF16"):
        ckpt.get("model.embed_tokens.weight")


# -- the safetensors codec -------------------------------------------------------------------------

def test_bf16_round_trip_matches_torch():
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=4000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 4000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1.00390625, 1.01171875, 3.4e38], np.float32)])
    ours = f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(bf16_bits_to_f32(theirs), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32)))).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shard_writer_read_by_safetensors(tmp_path, dtype):
    import torch
    from safetensors.torch import load_file

    rng = np.random.default_rng(1)
    tensors = {"b": rng.normal(size=(3, 5)).astype(np.float32), "a": rng.normal(size=(7,)).astype(np.float32),
               "s": np.array(2.5, np.float32)}
    with open(tmp_path / "x.safetensors", "wb") as fh:
        w = ShardWriter(fh, [(n, t.shape) for n, t in tensors.items()], dtype)
        for n, t in tensors.items():
            w.write(n, t)
        w.close()
    loaded = load_file(str(tmp_path / "x.safetensors"))
    for n, t in tensors.items():
        assert loaded[n].dtype == getattr(torch, dtype)
        np.testing.assert_array_equal(loaded[n].float().numpy(), torch.from_numpy(t).to(getattr(torch, dtype)).float().numpy())

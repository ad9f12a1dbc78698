"""Builders for LoRA merge tests: extended tokenizers, real PEFT adapters, the PEFT reference merge,
and hand-written adapter files for the error cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_sp_model(path: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """A small LLaMA-like SentencePiece BPE model (byte fallback) trained on generated English text."""
    import io

    import sentencepiece as spm

    from cllama_deploy.quickstart.corpus import english_lines

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(english_lines(1500, seed=seed)), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def extend_sp_model(src: Path, dst: Path, n_new: int) -> Path:
    """Copy a SentencePiece model and append ``n_new`` Han characters as normal pieces (the way a
    merged Chinese tokenizer grows LLaMA's vocabulary)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(Path(src).read_bytes())
    existing = {p.piece for p in model.pieces}
    code, added = 0x4E00, 0
    while added < n_new:
        ch = chr(code)
        code += 1
        if ch in existing:
            continue
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = ch, -1000.0 - added, pb.ModelProto.SentencePiece.NORMAL
        added += 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(model.SerializeToString())
    return dst


def make_tokenizer_dir(directory: Path, sp_model: Path, added: dict[str, int] | None = None) -> Path:
    """A tokenizer directory: ``tokenizer.model`` and, optionally, ``added_tokens.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, directory / "tokenizer.model")
    if added:
        (directory / "added_tokens.json").write_text(json.dumps(added))
    return directory


def make_adapter(model, out_dir: Path, *, target_modules=ALL_LINEAR, modules_to_save=None, r: int = 4,
                 alpha: float = 8, seed: int = 0, tokenizer_dir: Path | None = None, **lora_kwargs) -> Path:
    """Wrap ``model`` (mutated) with a real PEFT LoRA, give every LoRA matrix and every
    modules_to_save copy random non-zero values, and ``save_pretrained`` it into ``out_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                        modules_to_save=modules_to_save, task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, Path(out_dir) / f.name)
    return Path(out_dir)


def saved_vocab(adapter_dir: Path) -> int | None:
    """Rows of the embeddings an adapter saves (modules_to_save), read with the safetensors package."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "np") as f:
        for key in f.keys():
            if key.endswith("embed_tokens.weight") or key.endswith("lm_head.weight"):
                return f.get_slice(key).get_shape()[0]
    return None


def peft_reference(base_dir: Path, adapter_dirs: list[Path]):
    """The reference merge, as the seed did it: load the base with transformers, and for each adapter
    resize the embeddings to the adapter's vocabulary, PeftModel.from_pretrained, merge_and_unload."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    for adapter in adapter_dirs:
        rows = saved_vocab(adapter)
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


def write_adapter(directory: Path, tensors: dict[str, np.ndarray], **config) -> Path:
    """A hand-written adapter directory (numpy tensors in PEFT key naming), for error cases."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "fan_in_fan_out": False,
           "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none"}
    cfg.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(directory / "adapter_model.safetensors"))
    return directory


def lora_pair(module: str, r: int, in_features: int, out_features: int, seed: int = 0) -> dict[str, np.ndarray]:
    """PEFT keys and random values for one LoRA pair on ``module`` (e.g. ``model.layers.0.self_attn.q_proj``)."""
    rng = np.random.default_rng(seed)
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": rng.normal(size=(r, in_features)).astype(np.float32),
            f"{prefix}.lora_B.weight": rng.normal(size=(out_features, r)).astype(np.float32)}


def train_adapter(stage: str, base_dir: Path, tokenizer, data_dir: Path, out_dir: Path, *, lora=(), steps: int = 3,
                  **options) -> Path:
    """A real adapter from ``cllama-deploy train`` (its defaults: modules_to_save embed_tokens,lm_head; weight
    decay; the training record next to the adapter). Returns the ``{stage}_lora_model`` directory."""
    import torch

    from cllama_deploy.training.config import PTConfig, SFTConfig
    from cllama_deploy.training.run import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train faster on one thread of the shared cores
    try:
        common = dict(model_name_or_path=str(base_dir), tokenizer_name_or_path=str(tokenizer),
                      dataset_dir=str(data_dir), output_dir=str(out_dir), lora=[str(p) for p in lora],
                      max_steps=steps, per_device_train_batch_size=4, validation_split_percentage=0.0,
                      logging_steps=5, save_steps=1000, progress_bar=False, lora_rank=4, lora_alpha=8.0,
                      lora_dropout=0.0, seed=3)
        common.update(options)
        if stage == "pt":
            cfg = PTConfig(block_size=32, **common)
        else:
            cfg = SFTConfig(max_seq_length=160, **common)
        return Path(train(cfg).adapter_dir)
    finally:
        torch.set_num_threads(threads)

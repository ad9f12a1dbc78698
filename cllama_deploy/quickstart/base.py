"""The quickstart's tiny "base LLaMA": a ``LlamaForCausalLM`` pre-trained (all weights) on generated text.

No real LLaMA is downloaded, so the base gets its knowledge the way LLaMA did, on a tiny scale: a short
full pre-training on text in its own (base) tokenizer. The data pipeline and the training arguments are
those of ``train pt`` (``cllama_deploy.training``: the same blocks, cache and HF Trainer); only the
model differs: every weight is trained, where ``train pt`` trains LoRA adapters.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BaseShape:
    """Architecture of the tiny base (LLaMA's, scaled down)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 256

    def describe(self) -> str:
        return (f"{self.num_layers} layers, hidden {self.hidden_size}, MLP {self.intermediate_size}, "
                f"{self.num_heads} heads, context {self.max_position_embeddings}")


@dataclass
class BaseResult:
    model_dir: Path
    parameters: int
    steps: int
    tokens: int
    seconds: float
    train_loss: float | None
    final_loss: float | None


def init_base(out_dir: Path, tokenizer_model: Path, shape: BaseShape, seed: int) -> int:
    """Write a randomly initialized LLaMA in HF format with the base tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cllama_deploy.tokenizer.spm import processor

    sp = processor(tokenizer_model)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads, max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _write_tokenizer(tokenizer_model, out_dir)
    return sum(p.numel() for p in model.parameters())


def _write_tokenizer(tokenizer_model: Path, out_dir: Path) -> None:
    from cllama_deploy.tokenizer.hf import write_hf_tokenizer_dir

    write_hf_tokenizer_dir(tokenizer_model, out_dir)
    if not (out_dir / "tokenizer.model").is_file():  # transformers 5 does not always write it
        shutil.copy2(tokenizer_model, out_dir / "tokenizer.model")


def pretrain_base(model_dir: Path, text_dir: Path, work_dir: Path, *, steps: int, batch_size: int,
                  block_size: int, learning_rate: float, seed: int, callbacks: list | None = None,
                  show_progress: bool = True) -> BaseResult:
    """Pre-train every weight of the model in ``model_dir`` on the ``.txt`` files of ``text_dir``; the
    trained weights replace the initial ones in ``model_dir`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer
    from transformers.trainer_callback import PrinterCallback

    from cllama_deploy.files import atomic_dir
    from cllama_deploy.training import data as data_mod
    from cllama_deploy.training.config import PTConfig
    from cllama_deploy.training.run import _make_progress_callback, _quiet_libraries, build_training_args

    _quiet_libraries()
    cfg = PTConfig(model_name_or_path=str(model_dir), dataset_dir=str(text_dir), output_dir=str(work_dir),
                   block_size=block_size, max_steps=steps, per_device_train_batch_size=batch_size,
                   learning_rate=learning_rate, warmup_ratio=0.05, weight_decay=0.01, seed=seed,
                   validation_split_percentage=0.0, logging_steps=max(1, steps // 5), save_steps=10 ** 9,
                   save_total_limit=None, do_eval=False, progress_bar=show_progress)
    tok = data_mod.load_text_tokenizer(model_dir)
    data = data_mod.load_pt_data(cfg, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args = build_training_args(cfg)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=data_mod.PTCollator(),
                      callbacks=[_make_progress_callback(show_progress)] + list(callbacks or []))
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        (tmp / "quickstart_base.json").write_text(json.dumps(
            {"pretraining": {"steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen),
                             "block_size": block_size, "batch_size": batch_size, "learning_rate": learning_rate,
                             "text": [p.name for p in data.files]}}, indent=1) + "\n")
    shutil.rmtree(work_dir, ignore_errors=True)
    return BaseResult(model_dir=model_dir, parameters=sum(p.numel() for p in model.parameters()),
                      steps=trainer.state.global_step, tokens=int(trainer.state.num_input_tokens_seen or 0),
                      seconds=seconds, train_loss=out.training_loss, final_loss=losses[-1] if losses else None)

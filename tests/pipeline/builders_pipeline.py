"""LoRA adapters for the deploy tests, made with peft on the tiny LLaMAs of tests/builders.py."""

from __future__ import annotations

import shutil
from pathlib import Path

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(base_dir: Path, out_dir: Path, *, base_model=None, new_vocab: int | None = None,
              tokenizer_model: Path | None = None, r: int = 4, alpha: int = 8, seed: int = 0,
              lora_std: float = 0.07):
    """Save a PEFT LoRA (all 7 projections, non-zero lora_B) for ``base_dir`` or ``base_model``.

    With ``new_vocab`` the embeddings are resized first and saved whole through modules_to_save
    (embed_tokens, lm_head), as the seed's pre-training LoRA does. Returns the PeftModel.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = base_model
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if new_vocab is not None:
        old_vocab = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(new_vocab, mean_resizing=False)
        with torch.no_grad():
            embs = {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())}
            for emb in embs.values():
                emb.weight[old_vocab:].normal_(0.0, 0.5)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0,
                     modules_to_save=["embed_tokens", "lm_head"] if new_vocab is not None else None)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.normal_(0.0, lora_std)
    peft_model.save_pretrained(out_dir)
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, Path(out_dir) / "tokenizer.model")
    return peft_model.eval()

"""Builders for tiny fixtures (no network, no shared data). Used by conftest.py and by tests that
need a variant (another shape, another vocabulary)."""

from __future__ import annotations

import io
from pathlib import Path

from cllama_deploy.quickstart.corpus import chinese_lines, english_lines


def train_llama_like_sp(path: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """A SentencePiece BPE model trained like LLaMA's (byte fallback, identity normalizer,
    split digits, dummy prefix), mostly on English with some Chinese so a few Han pieces exist."""
    import sentencepiece as spm

    lines = english_lines(1500, seed=seed) + chinese_lines(150, seed=seed + 1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        # 0.995, not LLaMA's 0.99995: 256 byte pieces + every Han character of the text would not fit
        # in 512 pieces; the rare characters fall back to bytes, as in LLaMA
        character_coverage=0.995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_surface=" \u2047 ",
        max_sentencepiece_length=16,
        minloglevel=2,
        num_threads=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def train_zh_sp(path: Path, vocab_size: int = 700, seed: int = 0) -> Path:
    """A Chinese SentencePiece model with the seed's settings (unigram, nmt_nfkc, coverage 0.9995).

    700 pieces: coverage 0.9995 of the generated text already requires ~610 single characters."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chinese_lines(3000, seed=seed + 7)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
        num_threads=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def make_tiny_llama(out_dir: Path, vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 4, intermediate_size: int = 128,
                    tie_word_embeddings: bool = False, max_position_embeddings: int = 256,
                    rope_theta: float = 10000.0, seed: int = 0,
                    tokenizer_model: Path | None = None) -> Path:
    """Save a random ``LlamaForCausalLM`` (f32 safetensors) in HF format; copy ``tokenizer.model``."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger-than-default weights so logits differ clearly between tokens
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() > 1 else 0.1)
            if p.dim() == 1:
                p.add_(1.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, out_dir / "tokenizer.model")
    return out_dir

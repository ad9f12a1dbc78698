"""Fixtures for the GGUF tests: a merged (LLaMA + Chinese) tiny tokenizer, tiny LLaMAs of several
shapes, and the reference computations in transformers and llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests import builders

# Mixed Chinese/English text for tokenizer and logits checks.
MIXED_TEXT = "The weather is nice today. 今天天气很好，我们去公园散步吧！ LLaMA 2 和 Alpaca 的中文词表有 49953 个词。"


def base_tokenizer(path: Path) -> Path:
    """LLaMA-like BPE tokenizer with byte fallback; 1000 pieces (the Han characters in the training
    text need more than 512)."""
    return builders.train_llama_like_sp(path, vocab_size=1000)


def zh_tokenizer(path: Path) -> Path:
    """Chinese unigram tokenizer (1000 pieces: the generated text needs ~600 for its characters)."""
    return builders.train_zh_sp(path, vocab_size=1000)


def merge_sp(base: Path, add: Path, out: Path) -> Path:
    """Append the pieces of ``add`` that ``base`` lacks, score 0, as the seed's merge script does."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(Path(base).read_bytes())
    extra = pb.ModelProto()
    extra.ParseFromString(Path(add).read_bytes())
    have = {p.piece for p in model.pieces}
    for p in extra.pieces:
        if p.piece not in have:
            new = model.pieces.add()
            new.piece = p.piece
            new.score = 0
            have.add(p.piece)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    return out


def sp_size(model: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()


def tame(model_dir: Path, scale: float = 0.15) -> Path:
    """Scale the attention and MLP projections (N(0, 0.5) in make_tiny_llama) to std 0.075, within the
    range of trained LLaMAs. At std 0.5 the tiny network is chaotic (near-hard attention, huge MLP
    activations): any rounding, even llama.cpp's f16 KV cache, flips its argmax at 10-15% of positions,
    which would test the random weights rather than the converter."""
    from safetensors.numpy import load_file, save_file

    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(path)
    for name, value in tensors.items():
        if value.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
            tensors[name] = value * np.asarray(scale, dtype=value.dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return Path(model_dir)


def snap_weights(model_dir: Path, levels: str, step: float = 0.075) -> Path:
    """Replace every attention/MLP projection with ``step`` times its sign (``levels="binary"``) or its
    ternary rounding {-1, 0, 1} (``"ternary"``; |w| > 0.35 of make_tiny_llama's N(0, 0.5) is ±1): the
    weights Q1_0 (one bit) and TQ1_0/TQ2_0 (ternary-trained models) represent exactly, so those
    types can be checked on the models they are made for."""
    from safetensors.numpy import load_file, save_file

    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(path)
    for name, value in tensors.items():
        if value.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
            if levels == "binary":
                q = np.sign(value)
            else:
                q = np.where(value > 0.35, 1.0, np.where(value < -0.35, -1.0, 0.0))
            tensors[name] = (q * step).astype(value.dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return Path(model_dir)


def teacher_forced_top1(gguf_path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's most likely next token at every position of ``tokens`` (teacher forcing)."""
    llm = load_llama(gguf_path, n_ctx=len(tokens))
    try:
        return llama_logits(llm, tokens).argmax(axis=-1)
    finally:
        llm.close()


def hf_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    """transformers' logits (float32) for one sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return torch_logits(model, tokens)


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def torch_greedy(model, tokens: list[int], n: int) -> list[int]:
    import torch

    out = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(torch.argmax(logits)))
    return out[len(tokens):]


def load_llama(path: Path, n_ctx: int = 96, **kw):
    """llama.cpp on one thread, every logit kept, f32 KV cache (the default f16 cache alone moves logits
    by ~1e-2, more than the parity tolerance)."""
    import llama_cpp
    from llama_cpp import Llama

    kw.setdefault("type_k", llama_cpp.GGML_TYPE_F32)
    kw.setdefault("type_v", llama_cpp.GGML_TYPE_F32)
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1, n_threads_batch=1,
                 logits_all=True, verbose=False, seed=0, **kw)


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_greedy(llm, tokens: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out

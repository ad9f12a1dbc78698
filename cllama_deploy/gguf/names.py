"""HF LLaMA tensor names → GGUF tensor names, as data.

Each row: (HF name pattern, GGUF name pattern, where the GGUF name comes from). ``{bid}`` is the
decoder block index. The GGUF names are llama.cpp's ``LLM_ARCH_LLAMA`` tensor names (gguf-py
``constants.TENSOR_NAMES`` / llama.cpp ``src/llama-arch.cpp``); the HF names are the module paths of
transformers' ``LlamaForCausalLM``.
"""

from __future__ import annotations

import re

from cllama_deploy.errors import CheckpointError

LLAMA_TENSOR_NAMES: tuple[tuple[str, str, str], ...] = (
    # token embeddings (nn.Embedding, vocab × hidden); llama.cpp MODEL_TENSOR.TOKEN_EMBD
    ("model.embed_tokens.weight", "token_embd.weight", "TOKEN_EMBD"),
    # final RMSNorm before the LM head; MODEL_TENSOR.OUTPUT_NORM
    ("model.norm.weight", "output_norm.weight", "OUTPUT_NORM"),
    # LM head (absent when tie_word_embeddings: llama.cpp then reuses token_embd); MODEL_TENSOR.OUTPUT
    ("lm_head.weight", "output.weight", "OUTPUT"),
    # RMSNorm before attention; MODEL_TENSOR.ATTN_NORM
    ("model.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight", "ATTN_NORM"),
    # attention projections; MODEL_TENSOR.ATTN_Q/K/V/OUT (q and k rows are permuted, see convert.py)
    ("model.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight", "ATTN_Q"),
    ("model.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight", "ATTN_K"),
    ("model.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight", "ATTN_V"),
    ("model.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight", "ATTN_OUT"),
    # optional attention biases (config attention_bias=true)
    ("model.layers.{bid}.self_attn.q_proj.bias", "blk.{bid}.attn_q.bias", "ATTN_Q bias"),
    ("model.layers.{bid}.self_attn.k_proj.bias", "blk.{bid}.attn_k.bias", "ATTN_K bias"),
    ("model.layers.{bid}.self_attn.v_proj.bias", "blk.{bid}.attn_v.bias", "ATTN_V bias"),
    ("model.layers.{bid}.self_attn.o_proj.bias", "blk.{bid}.attn_output.bias", "ATTN_OUT bias"),
    # RMSNorm before the MLP; MODEL_TENSOR.FFN_NORM
    ("model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight", "FFN_NORM"),
    # SwiGLU MLP; MODEL_TENSOR.FFN_GATE/UP/DOWN
    ("model.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight", "FFN_GATE"),
    ("model.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight", "FFN_UP"),
    ("model.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight", "FFN_DOWN"),
    # optional MLP biases (config mlp_bias=true)
    ("model.layers.{bid}.mlp.gate_proj.bias", "blk.{bid}.ffn_gate.bias", "FFN_GATE bias"),
    ("model.layers.{bid}.mlp.up_proj.bias", "blk.{bid}.ffn_up.bias", "FFN_UP bias"),
    ("model.layers.{bid}.mlp.down_proj.bias", "blk.{bid}.ffn_down.bias", "FFN_DOWN bias"),
)

# Tensors we generate rather than read: llama3 rope scaling factors; MODEL_TENSOR.ROPE_FREQS
ROPE_FREQS = "rope_freqs.weight"

# HF q/k projections whose rows llama.cpp expects in its own rotary layout (see convert.permute_qk).
QK_PERMUTED = {"self_attn.q_proj": "q", "self_attn.k_proj": "k"}


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$")


_TABLE = [(_compile(hf), gg) for hf, gg, _ in LLAMA_TENSOR_NAMES]


def gguf_name(hf_name: str, n_layers: int | None = None) -> str:
    """The GGUF name of an HF LLaMA tensor.

    Raises:
        CheckpointError: the name is not part of a LLaMA model (or its block index is out of range).
    """
    for regex, target in _TABLE:
        m = regex.match(hf_name)
        if m is None:
            continue
        bid = m.groupdict().get("bid")
        if bid is None:
            return target
        if n_layers is not None and int(bid) >= n_layers:
            raise CheckpointError(
                f"tensor {hf_name!r} belongs to block {bid} but config.json says num_hidden_layers={n_layers}; "
                "fix num_hidden_layers in config.json or remove the extra tensors"
            )
        return target.format(bid=bid)
    raise CheckpointError(
        f"unknown tensor {hf_name!r}: not part of a LLaMA (LlamaForCausalLM) model, so there is no GGUF name "
        "for it; convert a plain LLaMA checkpoint (merge adapters first, drop extra heads)"
    )

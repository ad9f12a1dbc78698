"""HF model directories that transformers 4.x and 5.x load the same way (issue 13).

A config saved by transformers 5 keeps RoPE settings only in ``rope_parameters`` and the dtype in
``dtype``; transformers 4.57 does not know ``rope_parameters`` and silently uses its defaults
(rope_theta 10000, no scaling): a transformers-5-saved model with rope_theta 1e6 gave logits off by 10.7
on 4.57 (measured). transformers 5 still reads the 4.x keys, so the configs we write carry both forms.
The tokenizer half lives in :mod:`cllama_deploy.tokenizer.hf` (:func:`write_hf_tokenizer`).

No transformers import: the deploy path writes these files.
"""

from __future__ import annotations

import copy


def portable_config(config: dict, dtype: str | None = None) -> dict:
    """``config.json`` for a LLaMA directory that transformers 4.x and 5.x read identically.

    Adds the 4.x keys derived from 5.x ones (``rope_theta``, ``rope_scaling`` from ``rope_parameters``;
    ``torch_dtype`` beside ``dtype``), sets the dtype when given, and drops ``auto_map``: we write a
    standard ``LlamaForCausalLM`` checkpoint, which never needs ``trust_remote_code`` (and a custom
    model's code files are not copied, so the key would point at nothing).
    """
    out = copy.deepcopy(config)
    out.pop("auto_map", None)
    if dtype is not None:
        out["dtype"] = out["torch_dtype"] = dtype
    elif "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    return out


def generation_config(config: dict, pad_token_id: int | None = None) -> dict:
    """A minimal ``generation_config.json`` (special token ids only, no sampling defaults: serving stacks
    such as vLLM take sampling defaults from this file, and a model's author should choose them)."""
    out = {key: config[key] for key in ("bos_token_id", "eos_token_id") if config.get(key) is not None}
    pad = pad_token_id if pad_token_id is not None else config.get("pad_token_id")
    if pad is not None:
        out["pad_token_id"] = pad
    return out

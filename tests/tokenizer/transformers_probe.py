"""Load our HF directories with whatever transformers this interpreter has, and report as JSON.

Run as a script by tests/tokenizer/test_transformers4.py and benchmarks/transformers4_compat.py, under
transformers 4.x (its own venv) and 5.x (the project's venv). It imports only transformers, torch,
sentencepiece and numpy (the other venv has no cllama_deploy), never passes ``trust_remote_code=True``.

    python transformers_probe.py JOB.json  ->  JSON on stdout

Per tokenizer and mode: lines whose ids differ from ``[bos] + sp.encode(line)`` (``mismatches``) and whose
``decode(sp.encode(line))`` differs from ``sp.decode`` (``decode_mismatches``).

JOB: ``{"tokenizers": [{"dir", "modes": [...], "lines": FILE, "chat": [messages]}],
"models": [{"dir", "ids": [[int]], "out": FILE.npy}]}``. Modes: ``auto`` (AutoTokenizer defaults),
``auto_slow`` (``use_fast=False``), ``llama`` (``LlamaTokenizer.from_pretrained``: slow on 4.x),
``sentencepiece_backend`` (``SentencePieceBackend.from_pretrained``, 5.x only).
"""

from __future__ import annotations

import json
import sys
import time


def _load(directory: str, mode: str):
    import transformers

    if mode == "auto":
        return transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    if mode == "auto_slow":
        return transformers.AutoTokenizer.from_pretrained(directory, use_fast=False, trust_remote_code=False)
    if mode == "llama":
        return transformers.LlamaTokenizer.from_pretrained(directory)
    if mode == "sentencepiece_backend":
        return transformers.SentencePieceBackend.from_pretrained(directory)
    raise SystemExit(f"unknown mode {mode}")


def probe_tokenizer(job: dict) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=f"{job['dir']}/tokenizer.model")
    with open(job["lines"], encoding="utf-8") as fh:
        lines = [line.rstrip("\n") for line in fh if line.strip()]
    out = {}
    for mode in job["modes"]:
        try:
            t0 = time.perf_counter()
            tok = _load(job["dir"], mode)
            seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a failed load is a result here
            out[mode] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        bad, bad_decode, example = 0, 0, None
        for line in lines:
            ids = sp.encode(line)
            want = [sp.bos_id()] + ids
            got = list(tok(line)["input_ids"])
            if got != want:
                bad += 1
                if example is None:
                    example = {"line": line[:60], "sentencepiece": want[:12], "hf": got[:12]}
            bad_decode += tok.decode(ids) != sp.decode(ids)
        res = {"class": type(tok).__name__, "lines": len(lines), "mismatches": bad, "example": example,
               "decode_mismatches": bad_decode,
               "load_seconds": round(seconds, 3), "len": len(tok), "pad_token": tok.pad_token,
               "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        if job.get("chat"):
            try:
                res["chat"] = tok.apply_chat_template(job["chat"], tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001
                res["chat_error"] = f"{type(exc).__name__}: {exc}"[:300]
        out[mode] = res
    return out


def probe_model(job: dict) -> dict:
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(job["dir"], trust_remote_code=False)
    dtype_arg = "dtype" if _version() >= (4, 56) else "torch_dtype"  # renamed in 4.56
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=False, **{dtype_arg: torch.float32})
    model.eval()
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0].float().numpy() for ids in job["ids"]]
    np.save(job["out"], np.concatenate(logits, axis=0))
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None),
                                                         "rope_scaling": getattr(config, "rope_scaling", None)}
    return {"class": type(model).__name__, "vocab_size": config.vocab_size, "rope": rope,
            "generation_config": model.generation_config.to_dict().get("eos_token_id")}


def _version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def main() -> None:
    import transformers

    with open(sys.argv[1], encoding="utf-8") as fh:
        job = json.load(fh)
    result = {"transformers": transformers.__version__,
              "tokenizers": [probe_tokenizer(t) for t in job.get("tokenizers", [])],
              "models": [probe_model(m) for m in job.get("models", [])]}
    json.dump(result, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()

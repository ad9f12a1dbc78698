"""Acceptance check: our converter against llama.cpp's own convert_hf_to_gguf.py.

Downloads the llama-cpp-python sdist (the llama.cpp it vendors is the one our quantizer and runtime use),
builds tiny random LLaMAs (MHA + untied output, GQA + tied output, bf16 storage), converts each with both
converters to every output type and compares: tensor names, shapes, types and data (byte for byte), and the
metadata (keys on one side only, differing values; the vocabulary arrays included).

    .venv/bin/python benchmarks/compare_with_llamacpp.py [--sdist DIR] [--keep DIR]

Exit status 0 when every tensor is identical and the metadata differ only in the documented ways
(see EXPECTED_DIFFERENCES); 1 otherwise. Needs torch, transformers and sentencepiece (the [train] extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cllama_deploy.gguf import keys  # noqa: E402  (after the sys.path insert)

# Keys only llama.cpp writes, and why that is fine:
EXPECTED_ONLY_THEIRS = {
    keys.SIZE_LABEL: "a leaderboard label computed from the parameter count (e.g. '1.1B')",
    keys.BASENAME: "derived from the directory name for llama.cpp's file naming",
    keys.FINETUNE: "derived from the directory name for llama.cpp's file naming",
}
# Keys only we write, and why:
EXPECTED_ONLY_OURS = {
    keys.CHAT_TEMPLATE: "the Alpaca template (llama.cpp copies one only from tokenizer_config.json)",
    keys.ADD_SPECIAL_KEYS["bos"]: "written explicitly (llama.cpp takes it from tokenizer_config.json, absent here)",
    keys.ADD_SPECIAL_KEYS["eos"]: "written explicitly (same)",
    keys.SPECIAL_ID_KEYS["unk"]: "from the SentencePiece model (llama.cpp reads config.json/tokenizer_config.json)",
}
# Keys whose values may differ:
EXPECTED_VALUE_DIFFS = {keys.NAME: "llama.cpp derives it from the directory name"}


def get_sdist(dest: Path) -> Path:
    from importlib import metadata

    version = metadata.version("llama-cpp-python")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                    f"llama-cpp-python=={version}", "-d", str(dest)], check=True)
    archive = next(dest.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return next(p for p in dest.iterdir() if p.is_dir() and p.name.startswith("llama_cpp_python-"))


def build_models(root: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    from tests import builders

    zh = builders.train_zh_sp(root / "zh" / "zh.model", vocab_size=1000)
    base_tok = builders.train_llama_like_sp(root / "tok" / "tokenizer.model", vocab_size=1000)
    from tests.gguf.builders_gguf import merge_sp, sp_size

    tok = merge_sp(base_tok, zh, root / "merged" / "tokenizer.model")
    n = sp_size(tok)
    models = {
        "mha_untied": builders.make_tiny_llama(root / "mha_untied", n, tokenizer_model=tok, seed=1),
        "gqa_tied": builders.make_tiny_llama(root / "gqa_tied", n, num_heads=8, num_kv_heads=2, hidden_size=128,
                                             intermediate_size=200, tie_word_embeddings=True, tokenizer_model=tok,
                                             rope_theta=500000.0, seed=2),
    }
    # bf16 storage, as most published checkpoints
    bf = builders.make_tiny_llama(root / "bf16", n, num_heads=4, num_kv_heads=1, tokenizer_model=tok, seed=3)
    state = load_file(bf / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, bf / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((bf / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (bf / "config.json").write_text(json.dumps(cfg))
    models["bf16"] = bf
    # Chinese-Alpaca style: one added [PAD] token past the SentencePiece pieces, HF tokenizer files
    pad = builders.make_tiny_llama(root / "alpaca_pad", n + 1, tokenizer_model=tok, seed=4)
    (pad / "added_tokens.json").write_text(json.dumps({"[PAD]": n}))
    (pad / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "unk_token": "<unk>", "pad_token": "[PAD]"}))
    (pad / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]",
        "model_max_length": 2048}))
    cfg = json.loads((pad / "config.json").read_text())
    cfg["pad_token_id"] = n
    (pad / "config.json").write_text(json.dumps(cfg))
    models["alpaca_pad"] = pad
    return models


def read(path: Path):
    from cllama_deploy.gguf.reader import open_gguf, read_fields

    r = open_gguf(path)
    meta = read_fields(r)
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, np.asarray(t.data).tobytes())
               for t in r.tensors}
    return meta, tensors


def compare(ours: Path, theirs: Path) -> tuple[bool, list[str]]:
    m1, t1 = read(ours)
    m2, t2 = read(theirs)
    lines: list[str] = []
    ok = True
    if set(t1) != set(t2):
        ok = False
        lines.append(f"tensor names differ: only ours {sorted(set(t1) - set(t2))}, only theirs {sorted(set(t2) - set(t1))}")
    same = 0
    for name in sorted(set(t1) & set(t2)):
        (s1, q1, d1), (s2, q2, d2) = t1[name], t2[name]
        if s1 != s2 or q1 != q2 or d1 != d2:
            ok = False
            lines.append(f"tensor {name}: ours {q1} {s1}, theirs {q2} {s2}, data {'equal' if d1 == d2 else 'DIFFERENT'}")
        else:
            same += 1
    lines.append(f"{same}/{len(t2)} tensors identical (name, shape, type, bytes)")
    for k in sorted(set(m1) | set(m2)):
        if k not in m2:
            why = EXPECTED_ONLY_OURS.get(k)
            ok &= why is not None
            lines.append(f"  only ours: {k} = {str(m1[k])[:60]!r}" + (f"  ({why})" if why else "  UNEXPECTED"))
        elif k not in m1:
            why = EXPECTED_ONLY_THEIRS.get(k)
            ok &= why is not None
            lines.append(f"  only theirs: {k} = {str(m2[k])[:60]!r}" + (f"  ({why})" if why else "  UNEXPECTED"))
        elif m1[k] != m2[k] and not (isinstance(m1[k], float) and np.isclose(m1[k], m2[k])):
            why = EXPECTED_VALUE_DIFFS.get(k)
            ok &= why is not None
            lines.append(f"  differs: {k}: ours {str(m1[k])[:50]!r}, theirs {str(m2[k])[:50]!r}"
                         + (f"  ({why})" if why else "  UNEXPECTED"))
    n_equal = sum(1 for k in set(m1) & set(m2) if m1[k] == m2[k])
    lines.append(f"{n_equal} metadata keys equal (vocabulary arrays included)")
    return ok, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, help="an unpacked llama-cpp-python sdist (default: download it)")
    ap.add_argument("--keep", type=Path, help="keep the models and GGUFs in this directory")
    ap.add_argument("--models", nargs="*", help="only these models (mha_untied gqa_tied bf16 alpaca_pad)")
    args = ap.parse_args()

    from cllama_deploy.gguf.convert import ConvertConfig, convert

    work = args.keep or Path(tempfile.mkdtemp(prefix="cmp-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    sdist = args.sdist or get_sdist(work / "sdist")
    script = sdist / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    print(f"llama.cpp converter: {script}")
    models = build_models(work / "models")
    all_ok = True
    for name, model in models.items():
        if args.models and name not in args.models:
            continue
        for outtype in ("f32", "f16", "bf16", "q8_0"):
            ours, theirs = work / f"{name}-{outtype}-ours.gguf", work / f"{name}-{outtype}-llamacpp.gguf"
            convert(ConvertConfig(model_dir=model, out=ours, outtype=outtype, show_progress=False))
            env = dict(os.environ)
            env.pop("NO_LOCAL_GGUF", None)  # the script uses the sdist's own gguf-py
            proc = subprocess.run([sys.executable, str(script), str(model), "--outfile", str(theirs),
                                   "--outtype", outtype], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:])
                all_ok = False
                print(f"== {name} {outtype}: llama.cpp's converter FAILED")
                continue
            ok, lines = compare(ours, theirs)
            all_ok &= ok
            print(f"== {name} {outtype}: {'OK' if ok else 'MISMATCH'}")
            for line in lines:
                print("   " + line)
    print("RESULT:", "identical tensors, equivalent metadata" if all_ok else "MISMATCH")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

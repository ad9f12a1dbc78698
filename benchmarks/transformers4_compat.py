"""Issue 13 acceptance on the real artifacts: the HF directories we write, loaded by transformers 4.x (its own venv,
torch 2.13.0 CPU) and by this venv's transformers 5, on real Chinese text.

1. `tokenizer merge` of LLaMA's tokenizer.model + chinese_sp.model (Chinese-LLaMA 49953 pieces, Chinese-Alpaca 49954
   with [PAD]) for each --hf-target; the tokenizer.model keeps the seed's published SHA256.
2. Lines encoded exactly like SentencePiece (``[bos] + sp.encode(line)``), per transformers version and load call:
   AutoTokenizer's default, ``use_fast=False``, ``LlamaTokenizer.from_pretrained`` (the seed's scripts), and on 5.x
   ``SentencePieceBackend.from_pretrained``. Texts from Debian packages (benchmarks/debian_text.py): the Debian
   Reference zh-cn (lines with Han characters), Tang poems, Song lyrics, the `chinese` fortunes.
3. A tiny LLaMA (hidden 64) with LLaMA's 32000-row vocabulary, a PT LoRA that grows it to 49953 rows and carries only
   tokenizer.model, merged by `merge --hf-target transformers4`: logits of both transformers on real Chinese lines.

Run: .venv/bin/python benchmarks/transformers4_compat.py [--data ../shared/data] [--json out.json]
     [--oldest]  also transformers 4.31.0 (Chinese-LLaMA-Alpaca-2's pin; numpy<2, hub 0.16.4, tokenizers 0.13.3)
Exit code 0 only if every documented way is exact and the logits agree within 1e-4.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from debian_text import clean_fortune_file, debian_texts  # noqa: E402

from tests.tokenizer.venv4 import TRANSFORMERS4, transformers4_python, venv_dir  # noqa: E402
from tests.tokenizer.venv4 import run_probe as probe  # noqa: E402

SHA = {"chinese-llama": "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0",
       "chinese-alpaca": "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8"}
OLDEST = ("4.31.0", ("numpy<2", "huggingface-hub==0.16.4", "tokenizers==0.13.3"))
HAN = re.compile(r"[\u4e00-\u9fff]")


def texts(work: Path) -> dict[str, Path]:
    src = debian_texts()
    out = {}
    with gzip.open(src["debian_reference"], "rt", encoding="utf-8") as fh:
        lines = [line.rstrip("\n") for line in fh if HAN.search(line)]
    out["debian_reference"] = work / "debian_reference.txt"
    out["debian_reference"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name in ("tang300", "song100", "chinese"):
        out[name] = clean_fortune_file(src[name], work / f"{name}.txt")
    return out


def merge_tokenizers(data: Path, work: Path) -> dict[tuple[str, str], Path]:
    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers as merge

    dirs = {}
    for name, pad in (("chinese-llama", False), ("chinese-alpaca", True)):
        for target in ("transformers5", "transformers4"):
            r = merge(TokenizerMergeConfig(base=data / "llama-tokenizer" / "tokenizer.model",
                                           add=data / "chinese_sp.model", out=work / f"{name}-{target}",
                                           pad_token=pad, hf_target=target))
            if r.sha256 != SHA[name]:
                raise SystemExit(f"{name}: sha256 {r.sha256} is not the seed's {SHA[name]}")
            dirs[(name, target)] = r.out_dir
    return dirs


def tokenizer_table(pythons: dict[str, Path | str], dirs: dict, corpora: dict[str, Path], work: Path) -> dict:
    """{version: {dir: {text: {mode: mismatches or error}}}} plus line counts."""
    modes4 = {"transformers4": ["auto", "auto_slow", "llama"], "transformers5": ["auto", "llama"]}
    modes5 = {"transformers4": ["auto", "sentencepiece_backend"], "transformers5": ["auto"]}
    out: dict = {}
    for version, python in pythons.items():
        modes = modes5 if version.startswith("5") else modes4
        jobs, keys = [], []
        for (name, target), d in dirs.items():
            for text, path in corpora.items():
                jobs.append({"dir": str(d), "modes": modes[target], "lines": str(path)})
                keys.append((f"{name}-{target}", text))
        t0 = time.perf_counter()
        result = probe(python, {"tokenizers": jobs}, work)
        table: dict = {"transformers": result["transformers"], "seconds": round(time.perf_counter() - t0, 1)}
        for (d, text), res in zip(keys, result["tokenizers"]):
            table.setdefault(d, {})[text] = {
                mode: ({"class": r["class"], "lines": r["lines"], "exact": r["lines"] - r["mismatches"],
                        "decode_exact": r["lines"] - r["decode_mismatches"]}
                       if "error" not in r else {"error": r["error"][:120]})
                for mode, r in res.items()}
        out[version] = table
    return out


def logits_check(pythons: dict[str, Path | str], merged_tok: Path, corpora: dict[str, Path], work: Path) -> dict:
    import numpy as np
    import sentencepiece as spm

    from cllama_deploy.merge import MergeConfig, merge
    from tests import builders
    from tests.gguf import builders_gguf as bg
    from tests.pipeline import builders_pipeline as bp

    base = bg.tame(builders.make_tiny_llama(work / "base", 32000, num_heads=4, num_kv_heads=2, seed=5,
                                            tokenizer_model=None))
    (base / "generation_config.json").unlink(missing_ok=True)
    bp.make_lora(base, work / "pt_lora", new_vocab=bg.sp_size(merged_tok), tokenizer_model=merged_tok, seed=3)
    merged = merge(MergeConfig(base=base, loras=[work / "pt_lora"], out=work / "merged", hf_target="transformers4",
                               show_progress=False)).out
    sp = spm.SentencePieceProcessor(model_file=str(merged / "tokenizer.model"))
    lines = corpora["debian_reference"].read_text(encoding="utf-8").splitlines()[100:108]
    ids = [[sp.bos_id()] + sp.encode(line)[:48] for line in lines]
    logits = {}
    for version, python in pythons.items():
        out = work / f"logits-{version}.npy"
        probe(python, {"models": [{"dir": str(merged), "ids": ids, "out": str(out)}]}, work)
        logits[version] = np.load(out)
    ref = logits.pop(next(v for v in logits if v.startswith("5")))
    return {"tokens": int(sum(map(len, ids))), "vocab": int(ref.shape[1]),
            "max_abs_logit": float(np.abs(ref).max()),
            "max_abs_diff_vs_5": {v: float(np.abs(a - ref).max()) for v, a in logits.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--oldest", action="store_true", help="also transformers 4.31.0 (the seed's -2 pin)")
    args = ap.parse_args()
    import transformers

    results: dict = {}
    setup = {}
    pythons: dict[str, Path | str] = {}
    versions = [(TRANSFORMERS4, ())] + ([OLDEST] if args.oldest else [])
    for version, extra in versions:
        cached = (venv_dir(version) / "bin" / "python").is_file()
        t0 = time.perf_counter()
        pythons[version] = transformers4_python(version, extra=extra)
        setup[version] = "cached" if cached else f"built in {time.perf_counter() - t0:.0f} s"
    pythons[transformers.__version__] = sys.executable
    results["venv_setup"] = setup
    with tempfile.TemporaryDirectory(prefix="tf4-compat-") as tmp:
        work = Path(tmp)
        corpora = texts(work)
        results["lines"] = {name: len(p.read_text(encoding="utf-8").splitlines()) for name, p in corpora.items()}
        dirs = merge_tokenizers(args.data, work)
        results["tokenizers"] = tokenizer_table(pythons, dirs, corpora, work)
        results["logits"] = logits_check(pythons, dirs[("chinese-llama", "transformers4")] / "tokenizer.model",
                                         corpora, work)
    print(json.dumps(results, indent=1, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    ok = all(d < 1e-4 for d in results["logits"]["max_abs_diff_vs_5"].values())
    for version, table in results["tokenizers"].items():
        for d, per_text in table.items():
            if not isinstance(per_text, dict):
                continue
            documented = ("auto" if d.endswith("transformers5") else "sentencepiece_backend") \
                if version.startswith("5") else ("auto_slow" if d.endswith("transformers4") else None)
            for text, modes in per_text.items():
                if documented and modes[documented].get("exact") != modes[documented].get("lines"):
                    ok = False
                    print(f"NOT EXACT: transformers {version} {d} {text} {documented}: {modes[documented]}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

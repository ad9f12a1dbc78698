"""Acceptance checks of the vocabulary extension on the real artifacts (shared data + Debian text).

1. ``tokenizer merge`` on LLaMA's tokenizer.model + chinese_sp.model reproduces the seed's published
   SHA256 (Chinese-LLaMA 49953 pieces, and with --pad-token Chinese-Alpaca 49954 pieces).
2. On real Chinese text (Debian Reference zh-cn, Tang poems, Song lyrics), the HF directory we write
   encodes exactly like SentencePiece through ``AutoTokenizer``; the transformers-5 default
   (``LlamaTokenizer``, tokenizers-backed) is measured for comparison.
3. llama.cpp (llama-cpp-python) on a GGUF vocabulary written by ``gguf_vocab_from_sp`` encodes the
   same text like SentencePiece.
4. ``tokenizer from-gguf``: llama.cpp's own vocab test vectors (ggml-vocab-llama-spm.gguf .inp/.out from
   the llama-cpp-python sdist, downloaded with ``pip download``) are reproduced exactly.

Run: .venv/bin/python benchmarks/tokenizer_acceptance.py [--data ../shared/data] [--json out.json]
Exit code 0 only if every check passes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from debian_text import CACHE, clean_fortune_file, debian_texts  # noqa: E402

LLAMA_SHA = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0"
ALPACA_SHA = "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8"


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh if line.strip()]


def check_merge(data: Path, work: Path) -> dict:
    from cllama_deploy.cli import main

    out = {}
    for name, pad, want, pieces in (("chinese-llama", False, LLAMA_SHA, 49953), ("chinese-alpaca", True, ALPACA_SHA, 49954)):
        d = work / name
        args = ["tokenizer", "merge", "--base", str(data / "llama-tokenizer" / "tokenizer.model"),
                "--add", str(data / "chinese_sp.model"), "--out", str(d)] + (["--pad-token"] if pad else [])
        assert main(args) == 0
        report = json.loads((d / "merge_report.json").read_text())
        out[name] = {"sha256": report["sha256"], "ok": report["sha256"] == want and report["total_pieces"] == pieces,
                     "pieces": report["total_pieces"], "added": report["added_pieces"],
                     "already_in_base": report["already_in_base"], "dir": str(d)}
    return out


def check_hf_parity(merged: Path, texts: dict[str, list[str]], work: Path) -> dict:
    from transformers import AutoTokenizer

    from cllama_deploy.tokenizer.hf import compare_with_sentencepiece

    ours = AutoTokenizer.from_pretrained(str(merged))
    # the transformers-5 default: an HF dir that says LlamaTokenizer (what save_pretrained of the seed wrote)
    default_dir = work / "default-llama-tokenizer"
    default_dir.mkdir(exist_ok=True)
    (default_dir / "tokenizer.model").write_bytes((merged / "tokenizer.model").read_bytes())
    (default_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    default = AutoTokenizer.from_pretrained(str(default_dir))
    result = {"ours_class": type(ours).__name__, "default_class": type(default).__name__, "texts": {}}
    for name, lines in texts.items():
        o = compare_with_sentencepiece(ours, merged / "tokenizer.model", lines)
        d = compare_with_sentencepiece(default, merged / "tokenizer.model", lines)
        result["texts"][name] = {"lines": o["lines"], "ours_mismatches": o["mismatches"],
                                 "default_mismatches": d["mismatches"], "default_rate": d["rate"],
                                 "default_example": d["examples"][:1]}
    result["ok"] = all(t["ours_mismatches"] == 0 for t in result["texts"].values())
    return result


def check_llama_cpp(merged: Path, texts: dict[str, list[str]], work: Path) -> dict:
    import llama_cpp

    from cllama_deploy.tokenizer.gguf_vocab import gguf_vocab_from_sp, write_vocab_only_gguf
    from cllama_deploy.tokenizer.spm import processor

    path = write_vocab_only_gguf(gguf_vocab_from_sp(merged / "tokenizer.model"), work / "merged-vocab.gguf")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    sp = processor(merged / "tokenizer.model")
    out = {}
    for name, lines in texts.items():
        bad = sum(llm.tokenize(line.encode("utf-8"), add_bos=False, special=False) != sp.encode(line) for line in lines)
        out[name] = {"lines": len(lines), "mismatches": bad}
    out["ok"] = all(v["mismatches"] == 0 for v in out.values() if isinstance(v, dict))
    return out


def check_gguf_vectors(work: Path) -> dict:
    from cllama_deploy.cli import main
    from cllama_deploy.tokenizer.spm import processor

    sdist_dir = CACHE.parent / "llama-cpp-python-sdist"
    tarballs = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        sdist_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "llama-cpp-python", "-d", str(sdist_dir)], check=True, capture_output=True)
        tarballs = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    tarball = tarballs[-1]
    results = {"sdist": tarball.name}
    with tarfile.open(tarball) as tar:
        for vocab in ("ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf"):
            members = {m.name.split("/vendor/llama.cpp/models/")[-1]: m for m in tar.getmembers()
                       if "/vendor/llama.cpp/models/" + vocab in m.name}
            for suffix in ("", ".inp", ".out"):
                (work / (vocab + suffix)).write_bytes(tar.extractfile(members[vocab + suffix]).read())
            model = work / (vocab + ".model")
            assert main(["tokenizer", "from-gguf", str(work / vocab), "--out", str(model)]) == 0
            sp = processor(model)
            # .inp: cases separated by "\n__ggml_vocab_test__\n"; .out: one line of ids per case (no BOS)
            inputs = (work / (vocab + ".inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
            outputs = (work / (vocab + ".out")).read_text(encoding="utf-8").split("\n")[: len(inputs)]
            bad = [text for text, ids in zip(inputs, outputs) if sp.encode(text) != [int(x) for x in ids.split()]]
            results[vocab] = {"cases": len(inputs), "mismatches": len(bad), "failing": [b[:40] for b in bad[:3]]}
    results["ok"] = all(v["mismatches"] == 0 for v in results.values() if isinstance(v, dict))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tok-accept-") as tmp:
        work = Path(tmp)
        src = debian_texts()
        texts = {
            "debian_reference": read_lines(src["debian_reference"]),
            # most lines of the reference are indented; stripped lines isolate the score-0 merge issue
            "debian_reference_stripped": [line.strip() for line in read_lines(src["debian_reference"])],
            "tang300": read_lines(clean_fortune_file(src["tang300"], work / "tang300.txt")),
            "song100": read_lines(clean_fortune_file(src["song100"], work / "song100.txt")),
        }
        results = {"merge": check_merge(args.data, work)}
        merged = Path(results["merge"]["chinese-llama"]["dir"])
        results["hf_parity"] = check_hf_parity(merged, texts, work)
        results["llama_cpp_parity"] = check_llama_cpp(merged, texts, work)
        results["gguf_test_vectors"] = check_gguf_vectors(work)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["ok"] = all(r["ok"] for r in results.values() if isinstance(r, dict) and "ok" in r) and all(
        m["ok"] for m in results["merge"].values())
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

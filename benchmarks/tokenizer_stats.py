"""Token statistics of the vocabulary extension on real Chinese text (Debian packages).

Measures, with ``cllama-deploy tokenizer stats`` (per non-blank line, no BOS/EOS):

* A = LLaMA's tokenizer.model vs B = the seed's merged tokenizer (Chinese-LLaMA, 49953 pieces), built
  from ../shared/data with our ``tokenizer merge``;
* A vs B' = LLaMA + a Chinese model we train ourselves with ``tokenizer train`` (the seed's settings:
  unigram, 20000 pieces, coverage 0.9995, nmt_nfkc) on a *different* corpus: the ``chinese`` fortune
  file of fortunes-zh (Debian community texts and quotes, ~2 MB), which is not among the measured texts.

Measured texts: the Debian Reference (zh-cn), the Tang poems (tang300) and Song lyrics (song100).
Prints a Markdown section for benchmarks/RESULTS.md (the seed reports ≈1.43× and ≈1.68×).

Run: .venv/bin/python benchmarks/tokenizer_stats.py [--data ../shared/data] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from debian_text import clean_fortune_file, debian_texts  # noqa: E402


def run_cli(args: list[str]) -> None:
    from cllama_deploy.cli import main

    code = main(args)
    if code != 0:
        raise SystemExit(f"cllama-deploy {' '.join(args)} failed with exit code {code}")


def stats_json(base: Path, tok: Path, files: list[Path], out: Path) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_cli(["tokenizer", "stats", "--base", str(base), "--tokenizer", str(tok), *map(str, files), "--json"])
    out.write_text(buf.getvalue())
    return json.loads(buf.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--markdown", type=Path, help="write the RESULTS.md section here")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    llama = args.data / "llama-tokenizer" / "tokenizer.model"
    with tempfile.TemporaryDirectory(prefix="tok-stats-") as tmp:
        work = Path(tmp)
        src = debian_texts()
        # measured as shipped (fortune files keep their `%` separators and colour codes, as in the seed's figures)
        files = [src["debian_reference"], src["tang300"], src["song100"]]
        train_corpus = clean_fortune_file(src["chinese"], work / "fortunes-chinese.txt")

        t0 = time.perf_counter()
        run_cli(["tokenizer", "merge", "--base", str(llama), "--add", str(args.data / "chinese_sp.model"),
                 "--out", str(work / "seed-merged")])
        t_merge = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_cli(["tokenizer", "train", str(train_corpus), "--out", str(work / "own_zh.model"),
                 "--num-threads", str(args.threads)])
        t_train = time.perf_counter() - t0
        run_cli(["tokenizer", "merge", "--base", str(llama), "--add", str(work / "own_zh.model"),
                 "--out", str(work / "own-merged")])
        own_report = json.loads((work / "own-merged" / "merge_report.json").read_text())
        seed = stats_json(llama, work / "seed-merged", files, work / "seed.json")
        own = stats_json(llama, work / "own-merged", files, work / "own.json")
        # the table as the CLI prints it, for the log
        run_cli(["tokenizer", "stats", "--base", str(llama), "--tokenizer", str(work / "seed-merged"), *map(str, files)])
        corpus_lines = sum(1 for line in train_corpus.read_text(encoding="utf-8").splitlines() if line.strip())
        corpus_mb = train_corpus.stat().st_size / 1e6

    names = {"debian-reference.zh-cn.txt.gz": "Debian Reference zh-cn", "tang300": "Tang poems (tang300)",
             "song100": "Song lyrics (song100)"}
    rows = []
    for s_file, o_file in zip(seed["files"], own["files"]):
        name = names.get(Path(s_file["file"]).name, Path(s_file["file"]).name)
        rows.append(
            f"| {name} | {s_file['lines']} | {s_file['han_chars'] / s_file['chars']:.2f} | "
            f"{s_file['base_tokens_per_char']:.3f} | {s_file['tokens_per_char']:.3f} | {o_file['tokens_per_char']:.3f} | "
            f"{s_file['base_tokens_per_han']:.2f} | {s_file['tokens_per_han']:.2f} | {o_file['tokens_per_han']:.2f} | "
            f"**{s_file['ratio']:.3f}×** | {o_file['ratio']:.3f}× |"
        )
    today = datetime.date.today().isoformat()
    md = f"""
## Tokenizer: vocabulary extension statistics ({today})

Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.
Command: `.venv/bin/python benchmarks/tokenizer_stats.py` (texts: `apt-get download fortunes-zh debian-reference-zh-cn`).
Tokens counted per non-blank line without BOS/EOS by `cllama-deploy tokenizer stats`; files as shipped. A = LLaMA (32000 pieces);
B = the seed's merged tokenizer (49953 pieces, rebuilt with `tokenizer merge`, SHA256 e2676d4c…70c0);
B' = LLaMA + our own Chinese model ({own_report['total_pieces']} pieces, {own_report['added_pieces']} added), trained with
`tokenizer train` (seed settings: unigram 20000, coverage 0.9995, nmt_nfkc) on the `chinese` fortune file of
fortunes-zh ({corpus_lines} lines, {corpus_mb:.1f} MB; ANSI colour codes and `%` separators removed), a different
corpus from the measured texts (it shares the Debian-community domain with the Debian Reference, not its text).
Training took {t_train:.0f} s, the merge {t_merge:.1f} s.

| text | lines | Han/char | A tok/char | B tok/char | B' tok/char | A tok/Han | B tok/Han | B' tok/Han | A/B | A/B' |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
""" + "\n".join(rows) + "\n\nThe seed reports ≈1.43× (Debian Reference) and ≈1.68× (Tang poems) for A/B.\n"
    print(md)
    if args.markdown:
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fixture builders for the training tests: text and Alpaca data."""

from __future__ import annotations

import json
from pathlib import Path

from cllama_deploy.quickstart.corpus import chinese_lines, english_lines


def piece_count(model: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()


def write_pt_texts(directory: Path, n_files: int = 2, lines: int = 120, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        text = chinese_lines(lines, seed=seed + 11 * k) + english_lines(lines // 4, seed=seed + 5 + k)
        (directory / f"part{k}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    return directory


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """Instruction data with a learnable pattern: the answer repeats the input's first words."""
    lines = chinese_lines(n, seed=seed + 3)
    recs = []
    for i, line in enumerate(lines):
        line = line[:30]
        head = line[:8]
        recs.append({"instruction": "重复下面句子的开头。" if i % 2 else "Repeat the start of the sentence.",
                     "input": line, "output": head})
    return recs


def write_alpaca(directory: Path, n: int = 120, seed: int = 0, jsonl: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    recs = alpaca_records(n, seed)
    if jsonl:
        (directory / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n",
                                              encoding="utf-8")
    else:
        (directory / "data.json").write_text(json.dumps(recs, ensure_ascii=False, indent=2), encoding="utf-8")
    return directory

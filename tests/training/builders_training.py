"""Fixture builders for the training tests: a merged tokenizer, text and Alpaca data."""

from __future__ import annotations

import json
from pathlib import Path

from cllama_deploy.quickstart.corpus import chinese_lines, english_lines


def merge_sp_models(base_model: Path, extra_model: Path, out: Path) -> Path:
    """Append the pieces of ``extra_model`` missing from ``base_model`` (the Chinese-LLaMA recipe).

    Kept independent of the tokenizer package so these tests only depend on SentencePiece itself.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    base = pb.ModelProto()
    base.ParseFromString(Path(base_model).read_bytes())
    extra = pb.ModelProto()
    extra.ParseFromString(Path(extra_model).read_bytes())
    have = {p.piece for p in base.pieces}
    for p in extra.pieces:
        if p.type != pb.ModelProto.SentencePiece.NORMAL or p.piece in have:
            continue
        new = base.pieces.add()
        new.piece, new.score, new.type = p.piece, 0.0, pb.ModelProto.SentencePiece.NORMAL
        have.add(p.piece)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base.SerializeToString())
    return out


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

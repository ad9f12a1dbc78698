"""Compare how many tokens two tokenizers need for the same text.

Every non-blank line is encoded on its own, without BOS/EOS, as a training pipeline feeds lines;
characters are counted without the line break. A Han character is one of the CJK Unified
Ideographs blocks (basic, extensions A to H) or the compatibility ideographs. ``.gz`` files are read
transparently (the Debian Reference ships as ``.txt.gz``).
"""

from __future__ import annotations

import gzip
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from cllama_deploy.errors import ConfigError, InputError

# Unicode blocks whose characters count as Han.
HAN_RANGES = (
    (0x3400, 0x4DBF),    # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),    # CJK Unified Ideographs
    (0xF900, 0xFAFF),    # CJK Compatibility Ideographs
    (0x20000, 0x2A6DF),  # Extension B
    (0x2A700, 0x2EE5F),  # Extensions C to I
    (0x30000, 0x323AF),  # Extensions G and H
)


def is_han(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in HAN_RANGES)


def count_han(text: str) -> int:
    return sum(1 for ch in text if "\u3400" <= ch and is_han(ch))


@dataclass
class StatsConfig:
    """Settings of ``cllama-deploy tokenizer stats``."""

    base: Path = field(metadata={"help": "reference tokenizer (A): tokenizer.model, HF dir or GGUF"})
    tokenizer: Path = field(metadata={"help": "tokenizer to compare (B): tokenizer.model, HF dir or GGUF"})
    files: Sequence[Path] = field(default_factory=list, metadata={"help": "UTF-8 text files to measure (.gz ok)",
                                                                  "argument": True, "metavar": "FILES"})

    def __post_init__(self) -> None:
        self.base, self.tokenizer = Path(self.base), Path(self.tokenizer)
        self.files = [Path(f) for f in self.files]
        if not self.files:
            raise ConfigError("FILES: give at least one text file to measure")
        for option, path in (("--base", self.base), ("--tokenizer", self.tokenizer)):
            if not path.exists():
                raise ConfigError(f"{option} {path}: no such file or directory")
        for f in self.files:
            if not f.is_file():
                raise ConfigError(f"FILES: {f}: no such file")


@dataclass
class FileStats:
    file: str
    lines: int
    chars: int
    han_chars: int
    base_tokens: int
    tokens: int

    @property
    def ratio(self) -> float:
        """Compression ratio A/B: how many times fewer tokens B needs."""
        return self.base_tokens / self.tokens if self.tokens else float("nan")

    def per_char(self, tokens: int) -> float:
        return tokens / self.chars if self.chars else float("nan")

    def per_han(self, tokens: int) -> float:
        return tokens / self.han_chars if self.han_chars else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            base_tokens_per_char=self.per_char(self.base_tokens), tokens_per_char=self.per_char(self.tokens),
            base_tokens_per_han=self.per_han(self.base_tokens), tokens_per_han=self.per_han(self.tokens),
            ratio=self.ratio,
        )
        return d


@dataclass
class StatsResult:
    base: str
    tokenizer: str
    base_pieces: int
    pieces: int
    files: list[FileStats]
    seconds: float = 0.0

    @property
    def total(self) -> FileStats:
        return FileStats(
            file="(all)", lines=sum(f.lines for f in self.files), chars=sum(f.chars for f in self.files),
            han_chars=sum(f.han_chars for f in self.files),
            base_tokens=sum(f.base_tokens for f in self.files), tokens=sum(f.tokens for f in self.files),
        )

    def as_dict(self) -> dict:
        return {
            "base": self.base, "tokenizer": self.tokenizer, "base_pieces": self.base_pieces,
            "pieces": self.pieces, "files": [f.as_dict() for f in self.files],
            "total": self.total.as_dict(),
        }


def iter_text_lines(path: Path) -> Iterator[str]:
    """Non-blank lines of a UTF-8 (optionally gzip) file; a decoding error names file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise InputError(f"{path}: not UTF-8 text (line {number}, byte {exc.start} of the line)") from None
                if line.strip():
                    yield line
    except (OSError, EOFError) as exc:
        if isinstance(exc, gzip.BadGzipFile) or "gzip" in str(exc).lower():
            raise InputError(f"{path}: not a readable gzip file ({exc})") from exc
        raise


def tokenizer_stats(config: StatsConfig) -> StatsResult:
    """Tokens per character / per Han character for both tokenizers and the ratio A/B per file.

    Raises:
        TokenizerError: a tokenizer path is not a SentencePiece model, HF dir with one, or GGUF.
        InputError: a file is not UTF-8.
    """
    from cllama_deploy.progress import progress
    from cllama_deploy.tokenizer.hf import resolve_sp_model
    from cllama_deploy.tokenizer.spm import processor

    start = time.perf_counter()
    sp_a = processor(resolve_sp_model(config.base))
    sp_b = processor(resolve_sp_model(config.tokenizer))
    results: list[FileStats] = []
    with progress(transient=True) as bar:
        task = bar.add_task("counting tokens", total=len(config.files))
        for path in config.files:
            st = FileStats(file=str(path), lines=0, chars=0, han_chars=0, base_tokens=0, tokens=0)
            batch: list[str] = []

            def flush() -> None:
                st.base_tokens += sum(len(ids) for ids in sp_a.encode(batch))
                st.tokens += sum(len(ids) for ids in sp_b.encode(batch))
                batch.clear()

            for line in iter_text_lines(path):
                st.lines += 1
                st.chars += len(line)
                st.han_chars += count_han(line)
                batch.append(line)
                if len(batch) >= 2048:
                    flush()
            flush()
            if st.lines == 0:
                raise InputError(f"{path}: no text (the file has no non-blank lines)")
            results.append(st)
            bar.advance(task)
    return StatsResult(
        base=str(config.base), tokenizer=str(config.tokenizer), base_pieces=sp_a.get_piece_size(),
        pieces=sp_b.get_piece_size(), files=results, seconds=time.perf_counter() - start,
    )


def stats_table(result: StatsResult, labels: tuple[str, str] | None = None):
    """A Rich table of the result (one row per file, plus a total row when several files)."""
    from rich import box
    from rich.table import Table

    a, b = labels or (result.base, result.tokenizer)
    table = Table(title=f"A = {a} ({result.base_pieces} pieces)\nB = {b} ({result.pieces} pieces)",
                  box=box.SIMPLE_HEAD)
    table.add_column("file", no_wrap=True, min_width=12)
    for col in ("lines", "A tok/char", "B tok/char", "A tok/Han", "B tok/Han", "A/B"):
        table.add_column(col, justify="right")
    rows = list(result.files) + ([result.total] if len(result.files) > 1 else [])
    for st in rows:
        table.add_row(
            Path(st.file).name if st.file != "(all)" else st.file, str(st.lines),
            f"{st.per_char(st.base_tokens):.3f}", f"{st.per_char(st.tokens):.3f}",
            f"{st.per_han(st.base_tokens):.3f}" if st.han_chars else "-",
            f"{st.per_han(st.tokens):.3f}" if st.han_chars else "-",
            f"{st.ratio:.2f}x",
        )
    return table

"""Train a SentencePiece model (the Chinese vocabulary that gets merged into LLaMA's).

The defaults reproduce the seed's Chinese model: unigram, 20000 pieces, character coverage 0.9995,
``nmt_nfkc`` normalization. Input files are streamed line by line twice: a first pass checks that
every file exists, is UTF-8 and holds text (an error names the file, line and byte offset), the second
feeds SentencePiece through an iterator, so the corpus is never held in memory by us (SentencePiece
keeps at most ``input_sentence_size`` sampled sentences).

Sampling (``--input-sentence-size``) is ours, not SentencePiece's: its reservoir sampler draws from a
generator that ``set_random_generator_seed`` does not make reproducible, so the same ``--seed`` gave a
different model on every run. We draw the line numbers from ``random.Random(seed)`` after the first
pass has counted the lines, and hand SentencePiece exactly those lines (in corpus order, fewer than its
limit, so its sampler keeps them all and draws nothing).
"""

from __future__ import annotations

import io
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from cllama_deploy.errors import ConfigError, InputError, TokenizerError

MODEL_TYPES = ("unigram", "bpe", "char", "word")
NORMALIZATIONS = ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity")


@dataclass
class TokenizerTrainConfig:
    """Settings of ``cllama-deploy tokenizer train`` (defaults: the seed's Chinese model)."""

    inputs: Sequence[Path] = field(default_factory=list, metadata={
        "help": "UTF-8 text files, one sentence per line (streamed)", "argument": True, "metavar": "INPUTS"})
    out: Path = field(default=Path("chinese_sp.model"), metadata={"help": "output .model file",
                                                                  "flag": ("--out", "-o")})
    model_type: str = field(default="unigram", metadata={"help": "unigram, bpe, char or word"})
    vocab_size: int = field(default=20000, metadata={"help": "number of pieces"})
    character_coverage: float = field(default=0.9995, metadata={"help": "share of characters covered by pieces"})
    normalization: str = field(default="nmt_nfkc", metadata={"help": "SentencePiece normalization rule"})
    input_sentence_size: int = field(default=0, metadata={"help": "sample this many lines (0: use all)"})
    shuffle_input_sentence: bool = field(default=True, metadata={"help": "sample randomly, not the first lines",
                                                                 "flag": "--shuffle/--no-shuffle"})
    max_sentence_length: int = field(default=4192, metadata={"help": "lines longer than this (bytes) are skipped"})
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1, metadata={"help": "trainer threads",
                                                                                    "default_text": "all cores"})
    max_sentencepiece_length: int = field(default=16, metadata={"help": "longest piece, in characters"})
    byte_fallback: bool = field(default=False, metadata={"help": "add <0xXX> byte pieces for unknown characters"})
    split_digits: bool = field(default=False, metadata={"help": "split numbers into single digits"})
    add_dummy_prefix: bool = field(default=True, metadata={"help": "prepend a space to every input"})
    remove_extra_whitespaces: bool = field(default=True, metadata={"help": "collapse runs of whitespace"})
    allow_whitespace_only_pieces: bool = field(default=False, metadata={"help": "allow pieces of only spaces"})
    unk_surface: str = field(default=" \u2047 ", metadata={"help": "text that <unk> decodes to"})
    seed: int = field(default=0, metadata={"help": "random seed of the sentence sampling"})
    quiet: bool = field(default=True, metadata={"help": "hide SentencePiece's own log"})

    def __post_init__(self) -> None:
        self.inputs = [Path(p) for p in self.inputs]
        self.out = Path(self.out)
        if not self.inputs:
            raise ConfigError("INPUTS: give at least one text file to train on")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"--model-type {self.model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"--normalization {self.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
        if self.vocab_size < 4:
            raise ConfigError(f"--vocab-size {self.vocab_size}: must be at least 4 (unk, bos, eos and one piece)")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"--character-coverage {self.character_coverage}: must be in (0, 1]")
        if self.input_sentence_size < 0:
            raise ConfigError("--input-sentence-size must be >= 0 (0 uses every line)")
        if self.max_sentence_length < 1:
            raise ConfigError("--max-sentence-length must be >= 1")
        if self.num_threads < 1:
            raise ConfigError("--num-threads must be >= 1")
        if self.max_sentencepiece_length < 1:
            raise ConfigError("--max-sentencepiece-length must be >= 1")
        if self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a directory; give the path of the .model file to write")

    @classmethod
    def llama_like(cls, inputs: Sequence[Path], out: Path, vocab_size: int = 32000,
                   **overrides) -> "TokenizerTrainConfig":
        """LLaMA's own settings: BPE, byte fallback, split digits, identity normalizer, spaces kept."""
        settings = dict(model_type="bpe", vocab_size=vocab_size, character_coverage=0.99995,
                        normalization="identity", byte_fallback=True, split_digits=True,
                        add_dummy_prefix=True, remove_extra_whitespaces=False,
                        allow_whitespace_only_pieces=True)
        settings.update(overrides)
        return cls(inputs=list(inputs), out=out, **settings)


@dataclass
class TokenizerTrainResult:
    model_path: Path
    pieces: int
    lines: int
    bytes: int
    sha256: str
    seconds: float


@dataclass
class _Scan:
    lines: int = 0
    bytes: int = 0


def _iter_lines(path: Path) -> Iterator[tuple[int, int, str]]:
    """Yield ``(line_number, byte_offset, text)``; a UTF-8 error names the file, line and offset."""
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}: not UTF-8 text: invalid byte 0x{raw[exc.start]:02x} at byte offset "
                    f"{offset + exc.start} (line {number}); convert the file to UTF-8 "
                    f"(e.g. iconv -f GB18030 -t UTF-8) or leave it out"
                ) from None
            yield number, offset, text.rstrip("\r\n")
            offset += len(raw)


def scan_inputs(paths: Sequence[Path], on_bytes=None) -> _Scan:
    """First pass: every file exists, is UTF-8 and has at least one non-blank line."""
    total = _Scan()
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        useful = 0
        for _, _, text in _iter_lines(path):
            if text.strip():
                useful += 1
        size = path.stat().st_size
        if useful == 0:
            raise InputError(f"{path}: the file is empty (no non-blank lines); give a text corpus to train on")
        total.lines += useful
        total.bytes += size
        if on_bytes:
            on_bytes(size)
    return total


def sample_line_numbers(lines: int, size: int, shuffle: bool, seed: int) -> set[int] | None:
    """Which of ``lines`` non-blank lines to train on: all (None) when ``size`` is 0 or covers them, else
    ``size`` line numbers drawn with ``seed`` (``shuffle``) or the first ``size`` lines."""
    if size <= 0 or size >= lines:
        return None
    if not shuffle:
        return set(range(size))
    return set(random.Random(seed).sample(range(lines), size))


def _sentences(paths: Sequence[Path], on_bytes=None, keep: set[int] | None = None) -> Iterator[str]:
    number = 0
    for path in paths:
        last = 0
        for _, offset, text in _iter_lines(path):
            if on_bytes and offset - last >= 1 << 16:
                on_bytes(offset - last)
                last = offset
            if text.strip():
                if keep is None or number in keep:
                    yield text
                number += 1
        if on_bytes:
            on_bytes(path.stat().st_size - last)


def trainer_kwargs(config: TokenizerTrainConfig) -> dict:
    """Keyword arguments for ``SentencePieceTrainer.train`` (besides the input and the writer)."""
    return dict(
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        character_coverage=config.character_coverage,
        normalization_rule_name=config.normalization,
        input_sentence_size=config.input_sentence_size,
        shuffle_input_sentence=config.shuffle_input_sentence,
        max_sentence_length=config.max_sentence_length,
        num_threads=config.num_threads,
        max_sentencepiece_length=config.max_sentencepiece_length,
        byte_fallback=config.byte_fallback,
        split_digits=config.split_digits,
        add_dummy_prefix=config.add_dummy_prefix,
        remove_extra_whitespaces=config.remove_extra_whitespaces,
        allow_whitespace_only_pieces=config.allow_whitespace_only_pieces,
        unk_surface=config.unk_surface,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2 if config.quiet else 0,
    )


def train_tokenizer(config: TokenizerTrainConfig) -> TokenizerTrainResult:
    """Train a SentencePiece model on ``config.inputs`` and write it atomically to ``config.out``.

    Raises:
        InputError: a missing, empty or non-UTF-8 input file (the message names file, line, offset).
        TokenizerError: SentencePiece refused the settings (e.g. a vocabulary too large for the corpus).
    """
    import sentencepiece as spm

    from cllama_deploy.files import atomic_path, sha256_file
    from cllama_deploy.progress import progress
    from cllama_deploy.tokenizer.spm import processor

    start = time.perf_counter()
    total_bytes = sum(p.stat().st_size for p in config.inputs if p.is_file())
    with progress(transient=True) as bar:
        task = bar.add_task("checking input", total=total_bytes or None)
        scan = scan_inputs(config.inputs, lambda n: bar.advance(task, n))
        task = bar.add_task("reading sentences", total=scan.bytes)
        spm.set_random_generator_seed(config.seed)  # SentencePiece's other random choices
        keep = sample_line_numbers(scan.lines, config.input_sentence_size, config.shuffle_input_sentence,
                                   config.seed)
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sentences(config.inputs, lambda n: bar.advance(task, n), keep),
                model_writer=buffer,
                **trainer_kwargs(config),
            )
        except RuntimeError as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            low = message.lower()
            hint = ""
            if "required_chars" in low:
                hint = "; raise --vocab-size or lower --character-coverage"
            elif "vocab" in low:
                hint = "; lower --vocab-size or give more text"
            raise TokenizerError(f"SentencePiece training failed: {message}{hint}") from exc
    data = buffer.getvalue()
    pieces = processor(data).get_piece_size()
    with atomic_path(config.out) as tmp:
        tmp.write_bytes(data)
    return TokenizerTrainResult(
        model_path=config.out, pieces=pieces, lines=scan.lines, bytes=scan.bytes,
        sha256=sha256_file(config.out), seconds=time.perf_counter() - start,
    )

"""`cllama-deploy tokenizer ...`: train, merge, stats, from-gguf (no logic here: see cllama_deploy.tokenizer)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import typer

app = typer.Typer(
    help="Train a Chinese SentencePiece model, merge it into LLaMA's vocabulary, compare, rebuild from GGUF.",
    no_args_is_help=True,
)


def _out():
    from rich.console import Console

    return Console()


@app.command("train")
def train_cmd(
    inputs: List[Path] = typer.Argument(..., help="UTF-8 text files, one sentence per line (streamed)."),
    out: Path = typer.Option(Path("chinese_sp.model"), "--out", "-o", help="Output SentencePiece .model file."),
    model_type: str = typer.Option("unigram", "--model-type", help="unigram, bpe, char or word."),
    vocab_size: int = typer.Option(20000, "--vocab-size", help="Number of pieces."),
    character_coverage: float = typer.Option(0.9995, "--character-coverage",
                                             help="Share of characters the pieces cover (rest: unknown/bytes)."),
    normalization: str = typer.Option("nmt_nfkc", "--normalization",
                                      help="nmt_nfkc, nfkc, nmt_nfkc_cf, nfkc_cf or identity."),
    input_sentence_size: int = typer.Option(0, "--input-sentence-size",
                                            help="Sample this many lines for training (0: all lines)."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle",
                                 help="Sample lines at random (else the first ones)."),
    max_sentence_length: int = typer.Option(4192, "--max-sentence-length",
                                            help="Skip lines longer than this many bytes."),
    num_threads: int = typer.Option(os.cpu_count() or 1, "--num-threads", help="Trainer threads."),
    byte_fallback: bool = typer.Option(False, "--byte-fallback", help="Add <0xXX> pieces for unknown characters."),
    split_digits: bool = typer.Option(False, "--split-digits", help="Split numbers into single digits."),
    seed: int = typer.Option(0, "--seed", help="Random seed for the line sampling."),
) -> None:
    """Train a SentencePiece model (defaults: the seed's Chinese model, unigram 20000, nmt_nfkc)."""
    from cllama_deploy.tokenizer.train import TrainConfig, train_tokenizer

    config = TrainConfig(
        inputs=inputs, out=out, model_type=model_type, vocab_size=vocab_size,
        character_coverage=character_coverage, normalization=normalization,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=shuffle,
        max_sentence_length=max_sentence_length, num_threads=num_threads,
        byte_fallback=byte_fallback, split_digits=split_digits, seed=seed,
    )
    r = train_tokenizer(config)
    _out().print(
        f"trained {config.model_type} model: {r.pieces} pieces from {r.lines} lines ({r.bytes / 1e6:.1f} MB) "
        f"in {r.seconds:.1f}s -> {r.model_path}  sha256 {r.sha256[:16]}…"
    )


@app.command("merge")
def merge_cmd(
    base: Path = typer.Option(..., "--base", help="Base tokenizer: tokenizer.model, HF tokenizer directory or GGUF."),
    add: Path = typer.Option(..., "--add", help="Model whose pieces are appended (e.g. chinese_sp.model; HF dir or GGUF also accepted)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: tokenizer.model + HF tokenizer files."),
    pad_token: bool = typer.Option(False, "--pad-token", help="Append [PAD] and use it as the pad token (Alpaca)."),
    chat_template: str = typer.Option("alpaca", "--chat-template", help="alpaca, alpaca-2 or a .jinja file."),
) -> None:
    """Append the pieces of --add to --base (the seed's recipe, byte for byte) and write an HF tokenizer dir."""
    from cllama_deploy.tokenizer.merge import MergeConfig, merge_tokenizers

    r = merge_tokenizers(MergeConfig(base=base, add=add, out=out, pad_token=pad_token, chat_template=chat_template))
    pad = f", [PAD] id {r.pad_id}" if r.pad_id is not None else ""
    _out().print(
        f"merged: {r.base_pieces} base + {r.added_pieces} added = {r.total_pieces} pieces "
        f"(added ids {r.first_added_id}..{r.total_pieces - 1}{pad}; {r.skipped_pieces} already in the base)\n"
        f"  {r.model_path}  sha256 {r.sha256}\n  HF tokenizer dir: {r.out_dir} (AutoTokenizer encodes like SentencePiece)"
    )


@app.command("stats")
def stats_cmd(
    files: List[Path] = typer.Argument(..., help="UTF-8 text files to measure (.gz accepted)."),
    base: Path = typer.Option(..., "--base", help="Tokenizer A (e.g. LLaMA's): tokenizer.model, HF dir or GGUF."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer B (e.g. the merged one)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Tokens per character and per Han character for A and B, and the compression ratio A/B."""
    from cllama_deploy.tokenizer.stats import StatsConfig, stats_table, tokenizer_stats

    r = tokenizer_stats(StatsConfig(base=base, tokenizer=tokenizer, files=files))
    if as_json:
        typer.echo(json.dumps(r.as_dict(), indent=2, ensure_ascii=False))
    else:
        _out().print(stats_table(r))


@app.command("from-gguf")
def from_gguf_cmd(
    gguf_file: Path = typer.Argument(..., help="GGUF file with a SentencePiece ('llama') vocabulary."),
    out: Path = typer.Option(Path("tokenizer.model"), "--out", "-o", help="Output SentencePiece .model file."),
) -> None:
    """Rebuild a SentencePiece tokenizer.model from a GGUF's vocabulary (encodes like llama.cpp)."""
    from cllama_deploy.errors import ConfigError
    from cllama_deploy.tokenizer.gguf_vocab import write_sp_model_from_gguf

    if not gguf_file.is_file():
        raise ConfigError(f"GGUF_FILE {gguf_file}: no such file")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the path of the .model file to write")
    s = write_sp_model_from_gguf(gguf_file, out)
    _out().print(
        f"rebuilt {s['pieces']} pieces (unk {s['unk_id']}, bos {s['bos_id']}, eos {s['eos_id']}, pad {s['pad_id']}, "
        f"byte fallback {s['byte_fallback']}) -> {out}  sha256 {s['sha256'][:16]}…"
    )

"""`cllama-deploy tokenizer ...`: train, merge, stats, from-gguf (options from each stage's config;
no logic here: see cllama_deploy.tokenizer)."""

from __future__ import annotations

import json

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.tokenizer.gguf_vocab import FromGGUFConfig
from cllama_deploy.tokenizer.merge import TokenizerMergeConfig
from cllama_deploy.tokenizer.stats import StatsConfig
from cllama_deploy.tokenizer.train import TokenizerTrainConfig

app = typer.Typer(
    help="Train a Chinese SentencePiece model, merge it into LLaMA's vocabulary, compare, rebuild from GGUF.",
    no_args_is_help=True,
)


def _out():
    from rich.console import Console

    return Console()


@config_command(app, "train", TokenizerTrainConfig)
def train_cmd(config: TokenizerTrainConfig) -> None:
    """Train a SentencePiece model (defaults: the seed's Chinese model, unigram 20000, nmt_nfkc)."""
    from cllama_deploy.tokenizer.train import train_tokenizer

    r = train_tokenizer(config)
    _out().print(
        f"trained {config.model_type} model: {r.pieces} pieces from {r.lines} lines ({r.bytes / 1e6:.1f} MB) "
        f"in {r.seconds:.1f}s -> {r.model_path}  sha256 {r.sha256[:16]}…"
    )


@config_command(app, "merge", TokenizerMergeConfig)
def merge_cmd(config: TokenizerMergeConfig) -> None:
    """Append the pieces of --add to --base (the seed's recipe, byte for byte) and write an HF tokenizer dir."""
    from cllama_deploy.tokenizer.merge import merge_tokenizers

    r = merge_tokenizers(config)
    pad = f", [PAD] id {r.pad_id}" if r.pad_id is not None else ""
    _out().print(
        f"merged: {r.base_pieces} base + {r.added_pieces} added = {r.total_pieces} pieces "
        f"(added ids {r.first_added_id}..{r.total_pieces - 1}{pad}; {r.skipped_pieces} already in the base)\n"
        f"  {r.model_path}  sha256 {r.sha256}\n  HF tokenizer dir: {r.out_dir} "
        f"({r.summary()['hf_tokenizer_class']}, --hf-target {r.hf_target})\n  {r.hf_note}"
    )


@config_command(app, "stats", StatsConfig)
def stats_cmd(
    config: StatsConfig,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Tokens per character and per Han character for A and B, and the compression ratio A/B."""
    from cllama_deploy.tokenizer.stats import stats_table, tokenizer_stats

    r = tokenizer_stats(config)
    if as_json:
        typer.echo(json.dumps(r.as_dict(), indent=2, ensure_ascii=False))
    else:
        _out().print(stats_table(r))


@config_command(app, "from-gguf", FromGGUFConfig)
def from_gguf_cmd(config: FromGGUFConfig) -> None:
    """Rebuild a SentencePiece tokenizer.model from a GGUF's vocabulary (encodes like llama.cpp)."""
    from cllama_deploy.tokenizer.gguf_vocab import write_sp_model_from_gguf

    s = write_sp_model_from_gguf(config.gguf_file, config.out)
    _out().print(
        f"rebuilt {s['pieces']} pieces (unk {s['unk_id']}, bos {s['bos_id']}, eos {s['eos_id']}, pad {s['pad_id']}, "
        f"byte fallback {s['byte_fallback']}) -> {config.out}  sha256 {s['sha256'][:16]}…"
    )

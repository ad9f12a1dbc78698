"""`cllama-deploy merge`: streaming LoRA merge."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @app.command("merge")
    def merge_cmd(
        base: Path = typer.Option(..., "--base", help="Hugging Face base model directory (config.json + weights)."),
        lora: List[Path] = typer.Option(..., "--lora", help="PEFT LoRA adapter directory; repeat to apply "
                                        "several in order (pre-training LoRA first, then the SFT LoRA)."),
        out: Path = typer.Option(..., "--out", help="Output directory for the merged HF model (replaced atomically)."),
        dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (the base's), float32, float16, bfloat16."),
        shard_size: str = typer.Option("5GB", "--shard-size", help="Largest safetensors shard, e.g. 5GB or 500MB."),
        no_check_tokenizer: bool = typer.Option(False, "--no-check-tokenizer",
                                                help="Skip comparing the tokenizer's size with the vocabulary."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Merge LoRA adapters into a base model, in order, and write an HF model directory."""
        from cllama_deploy.merge import MergeConfig, merge
        from cllama_deploy.progress import console

        config = MergeConfig(base=base, loras=list(lora), out=out, shard_size=shard_size, dtype=dtype,
                             check_tokenizer=not no_check_tokenizer, show_progress=not quiet)
        result = merge(config)
        if not quiet:
            for line in result.vocab.lines():
                console.print(f"  {line}")
        console.print(
            f"merged {len(config.loras)} adapter(s): {result.changed} of {result.tensors} tensors changed, "
            f"vocab {result.vocab_size}, {result.dtype}, {len(result.shards)} shard(s) -> {result.out} "
            f"({result.seconds:.1f}s)"
        )

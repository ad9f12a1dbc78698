"""`cllama-deploy merge`: streaming LoRA merge (options from :class:`~cllama_deploy.merge.MergeConfig`)."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.merge import MergeConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "merge", MergeConfig)
    def merge_cmd(config: MergeConfig) -> None:
        """Merge LoRA adapters into a base model, in order, and write an HF model directory."""
        from cllama_deploy.merge import merge
        from cllama_deploy.progress import console

        result = merge(config)
        if config.show_progress:
            for line in result.vocab.lines():
                console.print(f"  {line}")
        console.print(
            f"merged {len(config.loras)} adapter(s): {result.changed} of {result.tensors} tensors changed, "
            f"vocab {result.vocab_size}, {result.dtype}, {len(result.shards)} shard(s) -> {result.out} "
            f"({result.seconds:.1f}s)"
        )

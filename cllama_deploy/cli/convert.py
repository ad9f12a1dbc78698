"""`cllama-deploy convert`: HF LLaMA → GGUF (options from :class:`~cllama_deploy.gguf.convert.ConvertConfig`)."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.cli.report import mib, type_counts
from cllama_deploy.gguf.convert import ConvertConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "convert", ConvertConfig)
    def convert_cmd(config: ConvertConfig) -> None:
        """Convert an HF LLaMA model to GGUF (our converter; llama.cpp-compatible output)."""
        from cllama_deploy.gguf.convert import convert
        from cllama_deploy.progress import console

        result = convert(config)
        o = result.outputs[0]
        console.print(f"wrote {o.path} ({mib(o.size_bytes)}, {result.n_tensors} tensors: {type_counts(o.tensor_types)}; "
                      f"vocab {result.vocab_size}; {result.seconds:.1f}s)")

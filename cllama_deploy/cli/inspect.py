"""`cllama-deploy inspect`: a GGUF's metadata, tensors, vocabulary and chat template."""

from __future__ import annotations

import json

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.gguf.inspect import InspectConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "inspect", InspectConfig)
    def inspect_cmd(
        config: InspectConfig,
        as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of tables."),
        no_tensors: bool = typer.Option(False, "--no-tensors", help="Leave out the per-tensor table."),
    ) -> None:
        """Show a GGUF's metadata, tensors, vocabulary summary and chat template."""
        from rich.console import Console

        from cllama_deploy.gguf.inspect import inspect_gguf, render

        info = inspect_gguf(config.model)
        if as_json:
            d = info.to_dict()
            if no_tensors:
                d.pop("tensors")
            typer.echo(json.dumps(d, indent=2, ensure_ascii=False))
        else:
            render(info, Console(), show_tensors=not no_tensors)

"""`cllama-deploy quickstart`: the embedded default end to end (see cllama_deploy.quickstart.run)."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.quickstart.run import QuickstartConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "quickstart", QuickstartConfig)
    def quickstart_cmd(config: QuickstartConfig) -> None:
        """Run the embedded default on generated text: train a base and a Chinese tokenizer, merge, compare."""
        from rich.console import Console
        from rich.table import Table

        from cllama_deploy.quickstart.run import run_quickstart

        r = run_quickstart(config)
        table = Table(title=f"quickstart output in {r.out} ({r.seconds:.1f}s)")
        table.add_column("what")
        table.add_column("path")
        for what, path in r.files.items():
            table.add_row(what, str(path))
        console = Console()
        console.print(table)
        zh, en = r.stats["files"][0], r.stats["files"][1]
        parity = (f"AutoTokenizer = SentencePiece on {r.parity['lines']} held-out lines"
                  if r.parity.get("checked") else "HF parity not checked (transformers not installed)")
        console.print(
            f"added {r.added_pieces} Chinese pieces -> {r.total_pieces}; held-out Chinese needs "
            f"{zh['ratio']:.2f}x fewer tokens ({zh['base_tokens']} -> {zh['tokens']}), English {en['ratio']:.2f}x; {parity}"
        )

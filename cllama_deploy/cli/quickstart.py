"""`cllama-deploy quickstart`: the embedded default end to end (see cllama_deploy.quickstart.run)."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.quickstart.run import QuickstartConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "quickstart", QuickstartConfig)
    def quickstart_cmd(config: QuickstartConfig) -> None:
        """Run the whole path on generated data: tokenizers, a tiny base, LoRA PT and SFT, GGUFs, the server."""
        from rich.console import Console
        from rich.markdown import Markdown

        from cllama_deploy.quickstart.run import run_quickstart

        r = run_quickstart(config)
        console = Console()
        console.print(Markdown(r.table))
        console.print(f"\n[bold]quickstart output in {r.out}[/] ({r.seconds:.0f} s)")
        for what, path in r.files.items():
            console.print(f"  {what}: {r.out / path if not ',' in path else path}")
        console.print(f"\nServe the 4-bit model:  [bold]{r.serve_command}[/]")
        if r.server is not None:
            console.print(f"[bold green]serving at {r.server.url}[/] (web chat at /, API at /v1); Ctrl-C stops it")
            try:
                r.server.wait()
            except KeyboardInterrupt:
                pass
            finally:
                r.server.stop()

"""`cllama-deploy deploy`: merge → convert → quantize in one pass, with a manifest (options from
:class:`~cllama_deploy.pipeline.DeployConfig`)."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.cli.report import mib
from cllama_deploy.pipeline import DeployConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "deploy", DeployConfig)
    def deploy_cmd(config: DeployConfig) -> None:
        """Merge LoRA adapters, convert and quantize to every requested type in one pass, with a manifest."""
        from cllama_deploy.pipeline import deploy
        from cllama_deploy.progress import console

        result = deploy(config)
        for s in result.steps:
            mem = f", peak RSS {mib(s.peak_rss_bytes)}" if s.peak_rss_bytes else ""
            console.print(f"  {s.name}: {s.status} ({s.seconds:.1f}s{mem})")
        for o in result.outputs:
            extra = f", {o.bits_per_weight:.2f} bpw" if o.bits_per_weight else ""
            fb = f", {len(o.fallbacks)} tensor(s) fell back" if o.fallbacks else ""
            console.print(f"{o.type}: {o.path} ({mib(o.size_bytes)}{extra}{fb}); Ollama: {o.modelfile.name}")
        console.print(f"manifest: {result.manifest} ({result.seconds:.1f}s)")

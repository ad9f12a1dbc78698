"""`cllama-deploy generate`: a file of instructions → predictions, batched through the engine (options from
:class:`~cllama_deploy.inference.generate.GenerateConfig`); the summary goes to stdout, progress to stderr."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.inference.generate import GenerateConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "generate", GenerateConfig)
    def generate_cmd(config: GenerateConfig) -> None:
        """Predict every instruction of --data-file (all at once through the batching engine) into
        --predictions."""
        from cllama_deploy.inference.generate import generate

        r = generate(config)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.finish_reasons.items()))
        typer.echo(f"{r.items} predictions from {r.backend} -> {r.predictions}")
        typer.echo(f"{r.prompt_tokens} prompt + {r.completion_tokens} generated tokens in {r.seconds:.1f} s "
                   f"({r.tokens_per_second:.1f} generated tokens/s); finish: {reasons}")
        if r.shortened:
            typer.echo(f"note: {r.shortened} prompt(s) left less than --max-tokens in the context; their replies "
                       "were limited to what fits")

"""`cllama-deploy train pt|sft`: flags are parsed by cllama_deploy.training.config (the seed's names,
shared with `python -m cllama_deploy.training` under torchrun); this module only forwards them."""

from __future__ import annotations

import typer

from cllama_deploy.training.stages import STAGES

app = typer.Typer(help="LoRA pre-training (pt) and instruction fine-tuning (sft).", no_args_is_help=True)

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _run(stage: str, ctx: typer.Context) -> None:
    from cllama_deploy.training.config import parse_args

    cfg = parse_args(stage, list(ctx.args))
    if cfg is None:  # --help was printed
        return
    from cllama_deploy.training.run import train

    train(cfg)


def _command(name: str):
    def command(ctx: typer.Context) -> None:
        _run(name, ctx)

    command.__doc__ = STAGES[name].summary
    app.command(name, context_settings=_PASS_THROUGH, add_help_option=False)(command)


for _name in STAGES:
    _command(_name)
